"""`lorafleet merge`: adapter + full-precision base -> a merged model directory, verified.

Never merges into a 4-bit base: the weights come from the base's fp16/bf16/fp32 safetensors
(the seed tutorial reloads the base unquantized for the same reason); a QLoRA adapter is merged
into those weights as its 4-bit training saw them, dequantized (merge/qlora.py). The output is
built in a temp dir and renamed into place only after the parity check passes.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from lorafleet.adapter import TOKENIZER_FILES, check_against_base, read_adapter, unsupported
from lorafleet.atomic import atomic_dir
from lorafleet.errors import UserError
from lorafleet.models import adapter_base, local_model_dir

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SIDE_FILES = ("generation_config.json",)


def check_tokenizer_fits(info, base_config: dict) -> None:
    """A tokenizer saved with the adapter replaces the base's in the merged model: it must not
    have more tokens than the merged model has embedding rows (the adapter's resized ones, or
    the base's), or its new tokens would index past the matrix."""
    if not info.has_tokenizer():
        return
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(info.path))
    rows = info.vocab_size() or base_config.get("vocab_size") or (base_config.get("text_config") or {}).get("vocab_size")
    if rows and n > rows:
        raise UserError(f"the tokenizer saved with adapter {info.name} has {n} tokens but the merged model would have "
                        f"{rows} embedding rows: the adapter does not carry resized embeddings (train with "
                        "modules_to_save embed_tokens and lm_head after adding tokens), or the tokenizer is not the one "
                        "it was trained with; remove it from the adapter directory to use the base's")


BASE_WEIGHTS = ("auto", "original", "dequantized")


def merge_adapter(adapter: Path, out: Path, base: str | None = None, dtype: str = "bfloat16", method: str = "auto",
                  tolerance: float | None = None, verify: bool = True, overwrite: bool = False,
                  allow_pickle: bool = False, log: Callable[[str], None] = print,
                  max_shard_bytes: int = 2 * 1024**3, base_weights: str = "auto") -> Path:
    """Merge `adapter` into its base and write the model to `out` (atomically), with
    merge_report.json. `base_weights` for an adapter trained on a 4-bit base (QLoRA, as its
    manifest records): `dequantized` merges into dequant(NF4(W)), the weights it was trained
    against; `original` into W; `auto` is dequantized for such adapters and original for all
    others (merge/qlora.py). Raises UserError for every refusal, having written nothing."""
    import tempfile

    from lorafleet.models import base_fingerprint, module_shapes
    from merge.qlora import as_trained_report, dequantized_base, trained_quantization
    from merge.streaming import stream_merge
    from merge.verify import DEFAULT_TOLERANCE, parity_report, probe_ids

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: use float16 or bfloat16 (float32 also works); never a 4-bit dtype")
    if method not in ("auto", "streaming", "peft"):
        raise UserError(f"--method {method}: use auto, streaming or peft")
    if base_weights not in BASE_WEIGHTS:
        raise UserError(f"--base-weights {base_weights}: use auto, original or dequantized")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output directory {out} already exists; choose another path or pass --overwrite")
    info = read_adapter(adapter, allow_pickle=allow_pickle)
    base_ref = adapter_base(info, base)
    base_dir = local_model_dir(base_ref)
    cfg = json.loads((base_dir / "config.json").read_text())
    if cfg.get("quantization_config"):
        raise UserError(f"base {base_ref} is a quantized checkpoint ({cfg['quantization_config'].get('quant_method')}); "
                        "merge into the full-precision (fp16/bf16) base, not the 4-bit one used for training")
    fp = base_fingerprint(str(base_dir))
    check_against_base(info, module_shapes(str(base_dir)), fp["fingerprint"])
    refused = unsupported(info, "peft")
    if refused:
        raise UserError(f"adapter {info.name} cannot be merged: {refused}")
    why_not = unsupported(info, "streaming")
    if method == "streaming" and why_not:
        raise UserError(f"the streaming merge cannot handle adapter {info.name}: {why_not}; use --method peft")
    check_tokenizer_fits(info, cfg)
    quant = trained_quantization(info)
    if base_weights == "dequantized" and quant is None:
        raise UserError(f"--base-weights dequantized: adapter {info.name} was not trained on a 4-bit base (its "
                        "manifest records no used_4bit); merge it into the original weights")
    into = "dequantized" if quant is not None and base_weights != "original" else "original"
    use_streaming = method == "streaming" or (method == "auto" and why_not is None)
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE[dtype]
    t0 = time.time()
    with atomic_dir(out, overwrite=overwrite) as tmp, tempfile.TemporaryDirectory(
            prefix=".lorafleet-dequantized-", dir=out.parent) as scratch:
        merge_base, dequantized_layers = base_dir, None
        if into == "dequantized":
            log(f"{info.name} was trained on a 4-bit {quant.bnb_4bit_quant_type} base: merging into those weights, "
                "dequantized (--base-weights original: into the full-precision ones)")
            merge_base = Path(scratch)
            dequantized_layers = dequantized_base(base_dir, quant, merge_base)
        if use_streaming:
            log(f"merging {info.name} into {base_ref} ({dtype}, streaming: one tensor at a time)")
            stats = stream_merge(merge_base, info, tmp, DTYPES[dtype], max_shard_bytes=max_shard_bytes)
            cfg_out = dict(cfg, dtype=dtype)
            cfg_out.pop("torch_dtype", None)
            (tmp / "config.json").write_text(json.dumps(cfg_out, indent=2) + "\n")
            for f in SIDE_FILES:
                if (base_dir / f).is_file():
                    shutil.copy2(base_dir / f, tmp / f)
        else:
            log(f"merging {info.name} into {base_ref} ({dtype}, peft merge_and_unload"
                f"{': ' + why_not if why_not else ''})")
            stats = _peft_merge(merge_base, info, tmp, DTYPES[dtype], max_shard_bytes)
        # The merged model is prompted the way the adapter was trained: its tokenizer (the
        # adapter's own when it carries one: added tokens) and its template.
        template = copy_tokenizer(info.path if info.has_tokenizer() else base_dir, tmp, info.template)
        merge_seconds = time.time() - t0
        report = {"base_model": base_ref, "base_fingerprint": fp["fingerprint"], "adapter": str(adapter),
                  "dtype": dtype, "method": "streaming" if use_streaming else "peft", **stats,
                  "merge_seconds": round(merge_seconds, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "tolerance": tol}
        if quant is not None:
            report["qlora"] = {"base_weights": into, "quantization": quant.model_dump(),
                               "dequantized_layers": dequantized_layers}
        if verify:
            log("verifying: base+adapter (peft, unmerged) vs merged, float32 logits on probe prompts")
            report["parity"] = parity_report(str(merge_base), info, str(tmp), template)
            p = report["parity"]
            log(f"max |Δlogits| {p['max_abs_logits_diff']:.4g} (adapter effect {p['adapter_effect_max_abs']:.4g}), "
                f"mean {p['mean_abs_logits_diff']:.3g}, greedy tokens agree: {p['greedy_tokens_agree']}")
            if p["max_abs_logits_diff"] > tol:
                raise UserError(f"merge parity check failed: max |Δlogits| {p['max_abs_logits_diff']:.4g} is above "
                                f"the tolerance {tol}; nothing was written. Check the adapter/base pair, or raise "
                                "--tolerance if the difference is expected")
            if quant is not None:
                from transformers import AutoTokenizer

                log("measuring against the model as trained (the 4-bit base + the adapter)")
                ids = probe_ids(AutoTokenizer.from_pretrained(tmp), template)
                q = report["qlora"] | as_trained_report(base_dir, info, quant, tmp, ids)
                report["qlora"] = q
                log(f"vs the model as trained: max |Δlogits| {q['max_abs_logits_diff']:.4g}, greedy agreement "
                    f"{q['greedy_agreement']:.1%} of {q['positions']} positions, answer log-likelihood "
                    f"{q['answer_loglik_merged']:.3f} (as trained {q['answer_loglik_trained']:.3f})")
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"merged model at {out} ({time.time() - t0:.1f}s)")
    return out


def copy_tokenizer(source: Path, out: Path, template: str | None) -> str | None:
    """Copy the tokenizer files of `source` (the base, or the adapter when it carries its own);
    the adapter's recorded template (if any) becomes the chat template.

    Plain file copies, not a transformers round trip: the streaming merge then never imports
    transformers, which alone costs ~200 MB of RSS.
    """
    for f in TOKENIZER_FILES:
        if (source / f).is_file():
            shutil.copy2(source / f, out / f)
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    if template is None:
        jinja = out / "chat_template.jinja"
        return jinja.read_text() if jinja.is_file() else cfg.get("chat_template")
    if "chat_template" in cfg:  # one source of truth: the .jinja file
        del cfg["chat_template"]
        cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.json").unlink(missing_ok=True)
    (out / "chat_template.jinja").write_text(template)
    return template


def _peft_merge(base_dir: Path, info, tmp: Path, dtype: torch.dtype, max_shard_bytes: int) -> dict:
    from lorafleet.adapter import load_with_peft

    try:
        model = load_with_peft(base_dir, info, dtype).merge_and_unload()
    except (RuntimeError, ValueError) as e:  # peft's merge refusing a layer it cannot fold
        raise UserError(f"peft cannot merge adapter {info.name}: {str(e).splitlines()[0][:400]}") from None
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_bytes)
    return {"tensors": len(model.state_dict()), "merged_modules": None, "shards": len(list(tmp.glob("*.safetensors"))),
            "vocab_size": model.get_input_embeddings().weight.shape[0]}
