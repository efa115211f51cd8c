"""The adapter directory: the contract between train, merge and serve, read as PEFT reads it.

A PEFT directory (`adapter_config.json` + `adapter_model.safetensors`, optionally the tokenizer
it was trained with) plus, when lorafleet wrote it, `lorafleet.json` (the manifest: base
fingerprint, template, data, results). Adapters made by other PEFT code have no manifest and are
accepted; they are rendered with the base model's chat template.

What an adapter means is PEFT's to say, so this module asks PEFT instead of restating it:
- the config is peft's `LoraConfig` (its defaults, e.g. `lora_alpha` 8 when a file leaves it
  out, and its validation);
- a module's rank and alpha come from `rank_pattern` / `alpha_pattern` through peft's own
  `get_pattern_key` (keys are regular expressions matched at a `.` boundary, first match wins),
  its scale is alpha / r, or alpha / sqrt(r) with rsLoRA, as `LoraLayer.update_layer` sets it;
- what the vLLM engine can serve is vLLM's `PEFTHelper`'s to say.
lorafleet's own part is the tensor-name parsing, the base-shape check, the manifest and
`unsupported(adapter, target)`: one answer, naming the config key, for the streaming merge,
peft's merge, the edge (ONNX) export and the vLLM engine.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.errors import UserError
from lorafleet.safetensors_header import shapes as safetensors_shapes

MANIFEST = "lorafleet.json"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
TARGETS = ("streaming", "peft", "edge", "vllm")

# A tensor of a saved adapter: `[base_model.model.]<module>.<kind>[.<adapter name>][.weight|.bias]`.
# peft strips the adapter name when it saves; other tools keep it (`lora_A.default.weight`).
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.|base_model\.)?(?P<module>.+?)\."
    r"(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>(?!weight$|bias$)[^.]+))?(?:\.(?P<param>weight|bias))?$")

# Initialisations that change the base weights when PEFT builds the adapter (PiSSA, OLoRA:
# the residual W - B0 A0; CorDA; LoftQ: the quantised residual). A saved adapter of this kind
# is the difference to that changed base, not to the base the user has.
# PEFT recomputes the residual on load only where the init is a deterministic function of the
# base weights: full-SVD PiSSA and OLoRA (QR). Randomised SVD, CorDA (needs data) and LoftQ do not.
_RECOMPUTED_INITS = ("pissa", "olora")
_CONVERT_HINT = ("convert it to a plain LoRA of the original base with peft's "
                 "`save_pretrained(out_dir, path_initial_model_for_weight_conversion=<the initial adapter>)` "
                 "(peft's PiSSA/OLoRA/CorDA examples show how)")


@dataclass(frozen=True)
class TensorKey:
    """One saved tensor's place: the base module it belongs to (`model.layers.0.self_attn.q_proj`),
    its kind (`lora_A`, `lora_B`, `lora_embedding_A`, `lora_embedding_B`, `lora_magnitude_vector`,
    or `full` for a whole-module copy such as `modules_to_save`), and `weight`/`bias`/``."""

    module: str
    kind: str
    param: str


def parse_tensor_key(key: str) -> TensorKey:
    """Parse a saved adapter tensor name; names that are not LoRA factors are `full` copies."""
    m = _LORA_KEY.match(key)
    if m:
        return TensorKey(m["module"], m["kind"], m["param"] or "")
    mod, _, param = strip_peft_prefix(key).rpartition(".")
    # peft's ModulesToSaveWrapper saves the trained copy and sometimes the original beside it
    # and LoRA on a resized embedding saves the resized base weight as `<module>.base_layer`
    mod = re.sub(r"\.(modules_to_save(\.[^.]+)?|original_module|base_layer)$", "", mod)
    return TensorKey(mod, "full", param)


def strip_peft_prefix(key: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


@dataclass
class AdapterInfo:
    """An adapter directory as read: `config` (the file's JSON, as written), `lora` (peft's
    LoraConfig of it), `manifest` (lorafleet.json or None), `tensors` (name -> shape)."""

    path: Path
    config: dict[str, Any]
    lora: Any  # peft.LoraConfig
    manifest: dict[str, Any] | None
    weights: Path
    pickled: bool = False
    tensors: dict[str, list[int]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def rank(self) -> int:
        """The largest rank of any module (what vLLM's max_lora_rank must cover), as peft's
        LoraModel computes it: max(r, *rank_pattern.values())."""
        return int(max([self.lora.r, *(self.lora.rank_pattern or {}).values()]))

    @property
    def target_modules(self) -> list[str]:
        tm = self.lora.target_modules or []
        return [tm] if isinstance(tm, str) else sorted(tm)

    @property
    def template(self) -> str | None:
        return (self.manifest or {}).get("template", {}).get("text")

    @property
    def base_fingerprint(self) -> str | None:
        return (self.manifest or {}).get("base_model", {}).get("fingerprint")

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """(r, lora_alpha) of a base module (`model.layers.1.self_attn.q_proj`), matched exactly
        as peft's `LoraModel._create_and_replace` does, with peft's `get_pattern_key`."""
        from peft.utils.other import get_pattern_key

        rp, ap = self.lora.rank_pattern or {}, self.lora.alpha_pattern or {}
        r = rp.get(get_pattern_key(rp.keys(), module), self.lora.r)
        alpha = ap.get(get_pattern_key(ap.keys(), module), self.lora.lora_alpha)
        return r, alpha

    def scale_for(self, module: str) -> float:
        """LoRA scale of a base module: alpha / r, or alpha / sqrt(r) with rsLoRA
        (peft `LoraLayer.update_layer`; rsLoRA: Kalajdzievski 2023, arXiv:2312.03732)."""
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.lora.use_rslora else alpha / r

    @property
    def init(self) -> str | None:
        """The init method's name when it changes the base weights (pissa, olora, corda, loftq…)."""
        init = self.lora.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
            return init.lower()
        return None

    @property
    def kinds(self) -> set[str]:
        return {parse_tensor_key(k).kind for k in self.tensors}

    @property
    def full_modules(self) -> list[str]:
        """Modules the adapter carries whole (modules_to_save copies, resized embeddings)."""
        return sorted({key.module for key in map(parse_tensor_key, self.tensors) if key.kind == "full"})

    def vocab_size(self) -> int | None:
        """Rows of the embedding matrix the adapter carries (resized vocabularies), else None."""
        for k, shape in self.tensors.items():
            key = parse_tensor_key(k)
            if key.kind == "full" and key.module.endswith(("embed_tokens", "lm_head", "wte", "embed_out")):
                return shape[0]
        return None

    def has_tokenizer(self) -> bool:
        return (self.path / "tokenizer_config.json").is_file() and any(
            (self.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def read_adapter(path: str | Path, allow_pickle: bool = False, read_tensors: bool = True) -> AdapterInfo:
    """Open and check an adapter directory; every failure is a UserError naming the file and the fix."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"adapter directory {p} does not exist")
    cfg_file = p / CONFIG
    if not cfg_file.is_file():
        raise UserError(f"{p} is not a PEFT adapter: {CONFIG} is missing")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_file} is not valid JSON ({e}); the adapter is corrupt, re-export it") from None
    if not isinstance(config, dict):
        raise UserError(f"{cfg_file} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{p}: peft_type {config.get('peft_type')} is not supported; only LoRA adapters are")
    manifest = None
    if (p / MANIFEST).is_file():
        try:
            manifest = json.loads((p / MANIFEST).read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{p / MANIFEST} is not valid JSON ({e})") from None
    weights = p / WEIGHTS
    pickled = False
    if not weights.is_file():
        if (p / PICKLE_WEIGHTS).is_file():
            if not allow_pickle:
                raise UserError(
                    f"{p} holds only {PICKLE_WEIGHTS}, a pickle file that can run code when loaded; convert it to "
                    "safetensors, or pass --allow-pickle if you trust its author")
            weights, pickled = p / PICKLE_WEIGHTS, True
        else:
            raise UserError(f"{p}: {WEIGHTS} is missing; the adapter directory is incomplete")
    info = AdapterInfo(path=p, config=config, lora=peft_config(config, cfg_file), manifest=manifest,
                       weights=weights, pickled=pickled)
    if read_tensors and not pickled:
        info.tensors = safetensors_shapes(weights)
        if not info.kinds & {"lora_A", "lora_embedding_A"}:
            raise UserError(f"{weights} has no lora_A/lora_B tensors; it is not a LoRA adapter")
        check_ranks(info)
    return info


def peft_config(config: dict[str, Any], where: Path | str = CONFIG):
    """peft's LoraConfig for an adapter_config.json's content (peft's defaults fill what is left
    out; keys a newer peft wrote are dropped, as peft itself does). Raises UserError on a config
    peft refuses."""
    from peft import LoraConfig

    known = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    if known.get("lora_alpha", 0) is None:
        del known["lora_alpha"]  # written as null: peft's default, as for a key left out
    _check_types(known, where)
    # The init's own checks (LoftQ wants scipy, CorDA its data) are for making an adapter, not
    # reading one: validate the rest, keep the init as written.
    init = known.pop("init_lora_weights", True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora = LoraConfig(**known)
        lora.init_lora_weights = init
        return lora
    except (TypeError, ValueError, ImportError) as e:
        raise UserError(f"{where}: peft refuses this LoRA config ({e}); fix or re-export the adapter") from None


def _check_types(cfg: dict[str, Any], where: Path | str) -> None:
    """What peft's LoraConfig takes without checking, checked (a wrong type would surface later
    as a traceback in the middle of a merge)."""
    def number(v, positive_int=False):
        ok = isinstance(v, int) if positive_int else isinstance(v, (int, float))
        return ok and not isinstance(v, bool) and v > 0

    if "r" in cfg and not number(cfg["r"], positive_int=True):
        raise UserError(f"{where}: r must be a positive integer (got {cfg['r']!r})")
    if "lora_alpha" in cfg and not number(cfg["lora_alpha"]):
        raise UserError(f"{where}: lora_alpha must be a positive number (got {cfg['lora_alpha']!r})")
    for key, positive_int in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise UserError(f"{where}: {key} must be an object of pattern -> value (got {pattern!r})")
        for k, v in pattern.items():
            try:
                re.compile(k)
            except re.error as e:
                raise UserError(f"{where}: {key} key {k!r} is not a regular expression ({e})") from None
            if not number(v, positive_int):
                raise UserError(f"{where}: {key}[{k!r}] must be a positive {'integer' if positive_int else 'number'} "
                                f"(got {v!r})")


def check_ranks(info: AdapterInfo) -> None:
    """Each module's rank in the config (r, or its rank_pattern key) must be its tensors' rank.

    peft writes adapter_config.json with sorted keys; where two rank_pattern keys match one
    module, "first match wins" can then pick another key than when the adapter was made, and
    the config no longer describes the tensors (peft itself then fails to load it).
    """
    for mod, (a, _) in lora_pairs(info.tensors, info.name).items():
        r = info.rank_and_alpha(mod)[0]
        if a[0] != r:
            raise UserError(
                f"adapter {info.name}: {mod} has rank {a[0]} in its tensors but rank {r} by its config "
                f"(r / rank_pattern {info.lora.rank_pattern}); peft sorts pattern keys when it saves, which can "
                "change which key matches first. Fix rank_pattern so that one key matches each module")


def normalised_config(info: AdapterInfo) -> dict[str, Any]:
    """The adapter's config with what peft assumes written out (`lora_alpha`: vLLM refuses a
    config without it, although peft defaults it), so an engine reads it as peft does."""
    cfg = dict(info.config)
    if cfg.get("lora_alpha") is None:
        cfg["lora_alpha"] = info.lora.lora_alpha
    return cfg


def write_manifest(adapter_dir: Path, manifest: dict[str, Any]) -> None:
    """Write lorafleet.json into an adapter directory (the caller's temp dir: see atomic.py)."""
    (Path(adapter_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def load_adapter_tensors(info: AdapterInfo) -> dict[str, Any]:
    if info.pickled:
        import torch

        return torch.load(info.weights, map_location="cpu", weights_only=True)
    from safetensors.torch import load_file

    return load_file(str(info.weights))


def lora_pairs(tensors: dict[str, Any], adapter_name: str) -> dict[str, tuple[Any, Any]]:
    """Base module key (`model.layers.0.self_attn.q_proj`) -> (lora_A, lora_B) of its linear LoRA;
    values are whatever `tensors` holds (tensors, or shapes from `AdapterInfo.tensors`)."""
    parts: dict[str, dict[str, Any]] = {}
    for k, v in tensors.items():
        key = parse_tensor_key(k)
        if key.kind in ("lora_A", "lora_B") and key.param in ("weight", ""):
            parts.setdefault(key.module, {})[key.kind] = v
    for mod, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise UserError(f"adapter {adapter_name}: {mod} has only {sorted(ab)[0]}, no matching "
                            f"{'lora_B' if 'lora_A' in ab else 'lora_A'}; the adapter is corrupt")
    return {mod: (ab["lora_A"], ab["lora_B"]) for mod, ab in sorted(parts.items())}


def lora_deltas(info: AdapterInfo) -> dict[str, tuple[Any, Any, float]]:
    """Base weight key (`...q_proj.weight`) -> (A [r, in], B [out, r], scale): W' = W + scale·(B @ A)."""
    pairs = lora_pairs(load_adapter_tensors(info), info.name)
    return {mod + ".weight": (a, b, info.scale_for(mod)) for mod, (a, b) in pairs.items()}


# --------------------------------------------------------------------------- what each target takes
def unsupported(info: AdapterInfo, target: str, max_lora_rank: int | None = None) -> str | None:
    """None when `target` handles the adapter exactly, else one sentence naming the config key or
    tensor that stops it and what to do instead.

    target: "streaming" (lorafleet's tensor-by-tensor merge; otherwise peft's merge is used),
    "peft" (peft's merge_and_unload), "edge" (ONNX export with switchable adapters), "vllm" (the
    engine; asks vLLM's PEFTHelper, with `max_lora_rank` the server's setting).
    """
    if target not in TARGETS:
        raise ValueError(f"target {target!r}: one of {TARGETS}")
    if target == "vllm":
        return _vllm_refusal(info, max_lora_rank)
    c, kinds, init = info.lora, info.kinds, info.init
    if init and (init.startswith("pissa_niter") or not init.startswith(_RECOMPUTED_INITS)):
        return (f"init_lora_weights={c.init_lora_weights!r}: the adapter is relative to a base PEFT changed when "
                f"it made it, which PEFT cannot rebuild from the original base; {_CONVERT_HINT}")
    if c.alora_invocation_tokens:
        return ("alora_invocation_tokens: an activated LoRA applies only after its invocation tokens, a merged model "
                "would apply it everywhere; serve it unmerged with peft")
    if c.layer_replication:
        return "layer_replication: the adapter duplicates base layers; merge it with peft's own code in Python"
    if target == "peft":
        return None
    # streaming and edge: plain linear LoRA factors only, on the base the user has.
    reasons = [
        (info.init, f"init_lora_weights={c.init_lora_weights!r} (PEFT rebuilds the changed base when it loads it)"),
        (c.use_dora or "lora_magnitude_vector" in kinds, "use_dora (DoRA needs the weight norms peft computes)"),
        ("lora_embedding_A" in kinds, "LoRA on embeddings (lora_embedding_A/B)"),
        (getattr(c, "trainable_token_indices", None), "trainable_token_indices (trained token rows)"),
        (c.modules_to_save, f"modules_to_save {c.modules_to_save} (whole-module copies)"),
        (info.full_modules, f"whole-module tensors ({', '.join(info.full_modules)})"),
        (c.bias != "none", f"bias={c.bias!r} (trained base biases)"),
        (c.lora_bias, "lora_bias (a bias on lora_B)"),
        (c.fan_in_fan_out, "fan_in_fan_out (Conv1D layers)"),
        (getattr(c, "target_parameters", None), f"target_parameters {c.target_parameters} (LoRA on raw parameters)"),
        (info.pickled, f"{PICKLE_WEIGHTS} (pickle weights)"),
    ]
    for hit, why in reasons:
        if hit:
            # streaming: the reason alone (merge falls back to peft); edge: what to do instead
            return why if target == "streaming" else f"{why}: merge it (lorafleet merge) and export the merged model"
    return None


def _vllm_refusal(info: AdapterInfo, max_lora_rank: int | None) -> str | None:
    try:
        from typing import get_args

        from vllm.config.lora import LoRAConfig, MaxLoRARanks
        from vllm.lora.peft_helper import PEFTHelper
    except ImportError:
        return None  # no engine here to ask; the replica's load is the final word
    from vllm.lora.utils import is_base_embedding_weights, parse_fine_tuned_lora_name

    try:
        helper = PEFTHelper.from_dict(normalised_config(info))
        # unset max_lora_rank: the rank is not in question here, only the features
        helper.validate_legal(LoRAConfig(max_lora_rank=max_lora_rank or max(get_args(MaxLoRARanks)), max_loras=1))
        for key in info.tensors:  # the names the engine's loader parses (LoRAModel.from_local_checkpoint)
            if not is_base_embedding_weights(key) and "base_layer" not in key:
                parse_fine_tuned_lora_name(key)
    except (ValueError, TypeError) as e:
        merge_why = unsupported(info, "peft")
        instead = (f"it cannot be merged either ({merge_why})" if merge_why
                   else "merge it instead (lorafleet merge) and serve the merged model")
        return f"vLLM refuses it ({e}); {instead}"
    return None


def check_against_base(info: AdapterInfo, base_shapes: dict[str, list[int]], base_fingerprint: str | None) -> None:
    """Refuse an adapter made for another base: fingerprint first, then every LoRA factor's shape.

    A resized vocabulary (whole embedding copies with more rows than the base) passes when the
    adapter directory holds the tokenizer that goes with it; without it, it is refused.
    """
    if base_fingerprint and info.base_fingerprint and info.base_fingerprint != base_fingerprint:
        trained_on = (info.manifest or {}).get("base_model", {}).get("name", "?")
        raise UserError(
            f"adapter {info.name} was trained on another base model ({trained_on}, fingerprint "
            f"{info.base_fingerprint}) than this one (fingerprint {base_fingerprint}); use the base it was trained on")
    if not base_shapes:
        return
    vocab = info.vocab_size()
    absent = [k for k in info.tensors if parse_tensor_key(k).kind not in ("full", "lora_magnitude_vector")
              and parse_tensor_key(k).module + ".weight" not in base_shapes]
    if absent:
        raise UserError(f"adapter {info.name} has {len(absent)} LoRA tensors for modules the base model does not "
                        f"have, which would not be applied: {name_some(absent)}; it was made for another "
                        "architecture, or saved with other module names")
    for k, shape in info.tensors.items():
        key = parse_tensor_key(k)
        wkey = key.module + ".weight"
        if key.kind in ("lora_magnitude_vector",) or key.param == "bias":
            continue
        if wkey not in base_shapes:
            continue  # a whole-module copy the base lacks (a classifier head): peft's load decides
        out_f, in_f = base_shapes[wkey][0], base_shapes[wkey][-1]
        if key.kind == "full":
            if shape[1:] != base_shapes[wkey][1:] or (shape[0] != out_f and shape[0] != vocab):
                raise UserError(f"adapter {info.name}: {k} has shape {shape} but the base's {wkey} has "
                                f"{base_shapes[wkey]}; the adapter was made for another base model")
            if shape[0] != out_f and not info.has_tokenizer():
                raise UserError(f"adapter {info.name} has a vocabulary of {shape[0]} tokens ({k}), the base "
                                f"{out_f}, and no tokenizer next to it; save the tokenizer it was trained with "
                                "into the adapter directory (tokenizer.save_pretrained)")
            continue
        checks = {"lora_A": (shape[-1], in_f, "input"), "lora_B": (shape[0], out_f, "output"),
                  "lora_embedding_A": (shape[-1], vocab or out_f, "vocabulary"),
                  "lora_embedding_B": (shape[0], in_f, "embedding")}
        got, want, what = checks[key.kind]
        if got != want:
            raise UserError(f"adapter {info.name}: {k} has {what} size {got} but the base's {wkey} has "
                            f"{want}; the adapter was made for another base model")


def name_some(keys: list[str], most: int = 4) -> str:
    """The first `most` of `keys`, and how many more: for messages that must name what is wrong."""
    more = f" (and {len(keys) - most} more)" if len(keys) > most else ""
    return ", ".join(keys[:most]) + more


def load_with_peft(base_dir: str | Path, info: AdapterInfo, dtype: Any, base_model: Any = None) -> Any:
    """peft's PeftModel of the adapter on the base: the reference every merge is checked against.

    A resized vocabulary is applied first (`resize_token_embeddings` to the rows the adapter
    carries, as the trainer did before saving; rows the adapter does not carry become the mean
    of the existing ones, so two loads agree). Raises UserError when peft refuses the pair.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = base_model or AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    vocab = info.vocab_size()
    old = model.get_input_embeddings().weight.shape[0]
    resized = bool(vocab and vocab != old)
    if resized:
        model.resize_token_embeddings(vocab, mean_resizing=False)
        with torch.no_grad():  # rows the adapter must bring: NaN until it does
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                if emb is not None and emb.weight.shape[0] > old:
                    emb.weight[old:] = float("nan")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(model, str(info.path))
    except (RuntimeError, ValueError, KeyError) as e:  # size mismatches, unknown modules
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise UserError(f"peft cannot load adapter {info.name} onto {base_dir}: {msg[:600]}") from None
    if resized:
        missing = sorted({k.removesuffix(".weight") for k, v in peft_model.state_dict().items()
                          if "original_module" not in k and v.is_floating_point() and torch.isnan(v).any()})
        if missing:
            raise UserError(f"adapter {info.name} has a vocabulary of {vocab} tokens (base {old}) but does not carry "
                            f"the new rows of {', '.join(missing)}; save it with those modules in modules_to_save")
    return peft_model
