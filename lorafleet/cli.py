"""`lorafleet`: one command, one subcommand per stage.

Heavy imports (torch, vLLM, Ray) happen inside the subcommands so `lorafleet --help` is instant.
A `UserError` prints as one line naming the problem and the fix, and exits 2.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from lorafleet.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune LoRA adapters, merge or export them, and serve many behind one OpenAI API.")
console = Console(stderr=True)


def log(msg: str) -> None:
    console.print(f"[bold cyan]lorafleet[/] {msg}", highlight=False, soft_wrap=True)


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except UserError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(2)
    return wrapper


@app.command("prepare-base")
@user_errors
def prepare_base(out: Optional[Path] = typer.Option(None, help="Directory to write (default: the cache)."),
                 dtype: str = typer.Option("bfloat16", help="Weight dtype to save.")):
    """Build the embedded base model (SmolLM2-135M-Instruct) as an HF directory, once."""
    from lorafleet.models import prepare_embedded_base

    path = prepare_embedded_base(out, dtype=dtype, log=log)
    typer.echo(str(path))


@app.command()
@user_errors
def train(config: Path = typer.Argument(..., help="Training YAML (see examples/)."),
          set_: list[str] = typer.Option([], "--set", help="Override a key: section.key=value (repeatable)."),
          resume: bool = typer.Option(False, help="Continue from the last checkpoint of this output_dir; "
                                                   "a finished adapter is left as it is.")):
    """Fine-tune a LoRA adapter (QLoRA on CUDA) and write a PEFT adapter directory."""
    from lorafleet.config import TrainConfig, load_config
    from train.recipe import run

    cfg = load_config(TrainConfig, config, set_)
    run(cfg, resume=resume, log=log)


@app.command()
@user_errors
def merge(base: str = typer.Option(None, help="Base model (HF id or path); default: the adapter's manifest base."),
          adapter: Path = typer.Option(..., help="Adapter directory."),
          out: Path = typer.Option(..., help="Merged model directory to write."),
          dtype: str = typer.Option("bfloat16", help="bfloat16, float16 or float32 (never 4-bit)."),
          method: str = typer.Option("auto", help="auto | streaming | peft"),
          tolerance: float = typer.Option(None, help="Max abs logits difference allowed in the parity check."),
          skip_verify: bool = typer.Option(False, help="Do not run the parity check."),
          overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
          allow_pickle: bool = typer.Option(False, help="Accept pickle (.bin) adapter weights."),
          base_weights: str = typer.Option(
              "auto", help="For a QLoRA adapter: dequantized (the 4-bit base's weights it was trained on), "
                           "original (the full-precision ones); auto: dequantized for QLoRA adapters.")):
    """Merge an adapter into a full-precision copy of its base; verify logits parity."""
    from merge.run import merge_adapter

    merge_adapter(base=base, adapter=adapter, out=out, dtype=dtype, method=method, tolerance=tolerance,
                  verify=not skip_verify, overwrite=overwrite, allow_pickle=allow_pickle, log=log,
                  base_weights=base_weights)


@app.command("export-onnx")
@user_errors
def export_onnx(model: str = typer.Option(..., help="Merged model directory, or the base (a path, HF id or "
                                                     "embedded:NAME) with --adapters."),
                out: Path = typer.Option(..., help="Directory for the ONNX model."),
                precision: str = typer.Option("fp32", help="fp32 | int8 | int4 (weight-only quantization)."),
                tolerance: float = typer.Option(None, help="Max |Δlogits| vs PyTorch that fails the export."),
                adapters: Optional[list[Path]] = typer.Option(
                    None, help="Adapter directory (repeatable): export MODEL (the base) with LoRA inputs and "
                               "convert each into adapters/NAME/, switchable at run time (the LoRA path stays "
                               "float at int8/int4)."),
                lora_target_modules: Optional[list[str]] = typer.Option(
                    None, help="Give the base LoRA inputs on these modules (repeatable; default with --adapters or "
                               "--max-lora-rank: q,k,v,o,gate,up,down_proj), for adapters trained later."),
                max_lora_rank: Optional[int] = typer.Option(
                    None, min=1, help="Largest rank a later adapter may have (vLLM's max_lora_rank; default: the "
                                      "adapters' largest, at least 16)."),
                allow_pickle: bool = typer.Option(False, help="Accept pickle-only adapter_model.bin files."),
                quant_option: Optional[list[str]] = typer.Option(
                    None, help="int8/int4: a builder quantization option KEY=VALUE (repeatable): block_size=16|32|"
                               "64|128|256, accuracy_level=1 (float activations; the CPU default 4 quantizes them "
                               "to int8), algo_config=rtn|k_quant, matmul_mixed_precision=last_matmul:int8."),
                overwrite: bool = typer.Option(False)):
    """Export to ONNX (decoder with KV cache) for onnxruntime on edge CPUs; verify parity."""
    from merge.onnx import export_onnx as run

    opts = {}
    for item in quant_option or []:
        if "=" not in item:
            raise UserError(f"--quant-option {item}: write KEY=VALUE, e.g. block_size=16")
        k, v = item.split("=", 1)
        opts[k] = v
    run(model, out, precision=precision, tolerance=tolerance, overwrite=overwrite, log=log,
        adapters=adapters or None, allow_pickle=allow_pickle, lora_target_modules=lora_target_modules or None,
        max_lora_rank=max_lora_rank, quant_options=opts)


@app.command("onnx-adapter")
@user_errors
def onnx_adapter(adapter: Path = typer.Argument(..., help="PEFT adapter directory (trained on the export's base)."),
                 onnx: Path = typer.Option(..., help="The ONNX export (with LoRA inputs) it is for."),
                 out: Optional[Path] = typer.Option(None, help="Where NAME/ goes (default: the export's adapters/; "
                                                              "a running edge server's adapter source works too)."),
                 allow_pickle: bool = typer.Option(False, help="Accept a pickle-only adapter_model.bin.")):
    """Convert one adapter for an existing ONNX export, without exporting the base again."""
    from merge.onnx_adapters import convert_adapter

    path = convert_adapter(onnx, adapter, out, allow_pickle=allow_pickle)
    log(f"edge adapter at {path.parent} (rescan a running edge server, or POST /v1/load_lora_adapter)")


@app.command("eval")
@user_errors
def eval_cmd(target: str = typer.Argument(..., help="Adapter directory, model directory or id; with --url, a served "
                                                    "model id (an adapter's name)."),
             data: str = typer.Option(..., help="Held-out records (any training format, or preference pairs)."),
             base: bool = typer.Option(False, "--base", help="Also answer with the base model and compare."),
             url: Optional[str] = typer.Option(None, help="Ask a served OpenAI-compatible endpoint instead of "
                                                          "loading the model here (e.g. http://127.0.0.1:8000)."),
             api_key: Optional[str] = typer.Option(None, help="The endpoint's key (default: LORAFLEET_API_KEY)."),
             base_model: Optional[str] = typer.Option(None, help="The base to compare with: a model path/id, or the "
                                                                 "served base's id with --url (default: the adapter's "
                                                                 "recorded base, or the server's)."),
             out: Optional[Path] = typer.Option(None, help="Report directory (default: eval/<name>)."),
             data_format: str = typer.Option("auto", "--format", help="Record format, as data.format in training."),
             limit: Optional[int] = typer.Option(None, min=1, help="Only the first N records."),
             max_new_tokens: int = typer.Option(64, help="Longest answer, in tokens."),
             judge_url: Optional[str] = typer.Option(None, help="An OpenAI-compatible endpoint whose model judges "
                                                                "each answer against the expected one."),
             judge_model: Optional[str] = typer.Option(None, help="The judge's model id on --judge-url."),
             judge_api_key: Optional[str] = typer.Option(None, help="The judge endpoint's key."),
             record: bool = typer.Option(True, help="Write the summary into the adapter's lorafleet.json (what "
                                                    "registry.require_eval reads).")):
    """Answer held-out questions with an adapter (and its base), score them, write eval.json + a report."""
    from lorafleet.evaluation.run import evaluate, metric_cell, metric_names

    if bool(judge_url) != bool(judge_model):
        raise UserError("an LLM judge needs both --judge-url and --judge-model")
    name = Path(target.rstrip("/")).name or "model"
    report = evaluate(target, data, out or Path("eval") / name, with_base=base, url=url, api_key=api_key,
                      base_model=base_model, fmt=data_format, limit=limit, max_new_tokens=max_new_tokens,
                      judge={"url": judge_url, "model": judge_model, "api_key": judge_api_key} if judge_url else None,
                      record=record, log=log)
    whos = [w for w in ("base", "adapter") if w in report["totals"]]
    for m in metric_names(report):
        log(f"{m:12s} " + "   ".join(f"{w} {metric_cell(report, w, m)}" for w in whos))
    log(f"report: {out or Path('eval') / name}/eval.md")


@app.command("fetch-model")
@user_errors
def fetch_model_cmd(source: str = typer.Argument(..., help="org/name (HF hub), s3://bucket/prefix, or a directory."),
                    out: Path = typer.Option(..., help="Where the model directory goes (written all at once).")):
    """Copy a base model onto a volume (the Kubernetes model-loader Job runs this)."""
    from lorafleet.models import fetch_model

    fetch_model(source, out, log=log)


@app.command()
@user_errors
def generate(prompt: str = typer.Argument(...),
             onnx: Path = typer.Option(..., help="Exported ONNX model directory."),
             max_new_tokens: int = typer.Option(128),
             temperature: float = typer.Option(0.0),
             system: Optional[str] = typer.Option(None, help="System message."),
             adapter: Optional[str] = typer.Option(None, help="Name of an adapter exported with --adapters.")):
    """Generate with an exported ONNX model (onnxruntime-genai), using its chat template."""
    from merge.onnx import generate_text

    typer.echo(generate_text(onnx, prompt, max_new_tokens=max_new_tokens, temperature=temperature, system=system,
                             adapter=adapter))


@app.command()
@user_errors
def serve(config: Optional[Path] = typer.Argument(None, help="Serve YAML (optional: flags alone work)."),
          model: Optional[str] = typer.Option(None, help="Base or merged model: HF id or path."),
          adapters: list[str] = typer.Option([], help="Adapter source: dir, s3://bucket/prefix, hf://org/name."),
          served_model_name: Optional[str] = typer.Option(None),
          host: Optional[str] = typer.Option(None),
          port: Optional[int] = typer.Option(None),
          api_key: list[str] = typer.Option([], help="A key clients must send (vLLM's flag; repeatable). "
                                                      "LORAFLEET_API_KEY or api_keys_file keep keys out of `ps`."),
          enable_auto_tool_choice: bool = typer.Option(
              False, "--enable-auto-tool-choice", help="vLLM's flag: tool_choice auto may answer with tool calls."),
          tool_call_parser: Optional[str] = typer.Option(
              None, help="vLLM's flag: hermes for ChatML bases (the embedded one), llama3_json, mistral, ..."),
          reasoning_parser: Optional[str] = typer.Option(None, help="vLLM's flag, e.g. deepseek_r1, qwen3."),
          set_: list[str] = typer.Option([], "--set", help="Override a key: section.key=value.")):
    """Serve the base model and adapters behind an OpenAI-compatible API on Ray Serve + vLLM."""
    from lorafleet.config import ServeConfig, load_config
    from serve.launch import launch, needs_supervisor, supervise

    flags = {k: v for k, v in {"model": model, "served_model_name": served_model_name, "host": host,
                                "port": port, "enable_auto_tool_choice": enable_auto_tool_choice or None,
                                "tool_call_parser": tool_call_parser, "reasoning_parser": reasoning_parser}.items()
             if v is not None}
    if adapters:
        flags["adapters"] = list(adapters)
    if api_key:  # the replicas read keys from the environment (launch passes it on)
        keys = [k for k in os.environ.get("LORAFLEET_API_KEY", "").split(",") if k.strip()]
        os.environ["LORAFLEET_API_KEY"] = ",".join(keys + list(api_key))
    cfg = load_config(ServeConfig, config, set_)
    cfg = cfg.model_copy(update=flags)
    cfg = ServeConfig.model_validate(cfg.model_dump())
    if needs_supervisor(cfg):  # signals to the whole process group reach this process only
        raise typer.Exit(supervise([sys.executable, "-m", "lorafleet.cli", *sys.argv[1:]]))
    launch(cfg, log=log)


@app.command("serve-edge")
@user_errors
def serve_edge(config: Optional[Path] = typer.Argument(None, help="Serve YAML (optional): served_model_name, "
                                                                  "adapters, keys, limits, host, port."),
               onnx: Optional[Path] = typer.Option(None, help="The ONNX export (lorafleet export-onnx) to serve."),
               adapters: list[str] = typer.Option([], help="More sources of converted edge adapters "
                                                            "(lorafleet onnx-adapter); the export's adapters/ always."),
               served_model_name: Optional[str] = typer.Option(None, help="The base's id (default: the export's "
                                                                           "directory name)."),
               host: Optional[str] = typer.Option(None),
               port: Optional[int] = typer.Option(None),
               set_: list[str] = typer.Option([], "--set", help="Override a key: section.key=value.")):
    """Serve an ONNX export and its adapters behind the OpenAI API on onnxruntime (no Ray, no vLLM): continuous
    batching, each request with its own adapter in one batch."""
    from lorafleet.config import ServeConfig, load_config
    from serve.edge.server import serve_edge as run

    flags = {k: v for k, v in {"model": str(onnx) if onnx else None, "served_model_name": served_model_name,
                                "host": host, "port": port}.items() if v is not None}
    if adapters:
        flags["adapters"] = list(adapters)
    cfg = load_config(ServeConfig, config, set_)
    cfg = ServeConfig.model_validate({**cfg.model_dump(), **flags})
    run(cfg, log_fn=log)


fleet_app = typer.Typer(no_args_is_help=True, help="Adapter aliases and rollouts in the fleet file (fleet.yaml): "
                        "check it, start a canary, promote, roll back. Serving replicas follow the file.")
app.add_typer(fleet_app, name="fleet")
FLEET_FILE = typer.Option(Path(os.environ.get("LORAFLEET_FLEET_FILE", "fleet.yaml")), "--file",
                          help="The fleet file (default: $LORAFLEET_FLEET_FILE or ./fleet.yaml).")
SERVE_CONFIG = typer.Option(None, "--config", help="Serve YAML whose registry.require_eval is the default gate.")


def _gate_of(config: Optional[Path]):
    if config is None:
        return None
    from lorafleet.config import ServeConfig, load_config

    return load_config(ServeConfig, config, []).registry.require_eval


@fleet_app.command("check")
@user_errors
def fleet_check(file: Path = FLEET_FILE, config: Optional[Path] = SERVE_CONFIG):
    """Check the fleet file as a server would (syntax, versions, sources, traffic) and print it."""
    from lorafleet.fleet import read_fleet

    fleet = read_fleet(file, _gate_of(config))
    for a in fleet.aliases.values():
        log(f"{a.name}: " + ", ".join(f"{v} {w}%" for v, w in a.traffic.items())
            + f"  (versions: {', '.join(a.versions)})")


@fleet_app.command("canary")
@user_errors
def fleet_canary(alias: str, version: str, weight: int = typer.Option(10, help="Percent of callers for VERSION."),
                 file: Path = FLEET_FILE, config: Optional[Path] = SERVE_CONFIG):
    """Send WEIGHT percent of ALIAS's callers to VERSION (the rest stay on the current version),
    if VERSION's recorded evaluation passes the gate and is not below the current version's."""
    from lorafleet.fleet import canary

    log(canary(file, alias, version, weight, _gate_of(config)))


@fleet_app.command("promote")
@user_errors
def fleet_promote(alias: str, version: str, file: Path = FLEET_FILE, config: Optional[Path] = SERVE_CONFIG):
    """Send all of ALIAS's callers to VERSION, under the same checks as a canary."""
    from lorafleet.fleet import promote

    log(promote(file, alias, version, _gate_of(config)))


@fleet_app.command("rollback")
@user_errors
def fleet_rollback(alias: str, file: Path = FLEET_FILE):
    """End ALIAS's canary, or go back to the version promoted before the current one."""
    from lorafleet.fleet import rollback

    log(rollback(file, alias))


@app.command("config-reference")
def config_reference_cmd(kind: str = typer.Argument("train", help="train | serve")):
    """Print the config reference (Markdown table) generated from the schema."""
    from lorafleet.config import ServeConfig, TrainConfig, config_reference

    schema = TrainConfig if kind == "train" else ServeConfig
    typer.echo("| key | type | default | meaning |\n|---|---|---|---|")
    for key, tname, default, desc in config_reference(schema):
        typer.echo(f"| `{key}` | {tname} | `{default}` | {desc} |")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_worker_niceness", "0")
    app()


if __name__ == "__main__":
    main()
