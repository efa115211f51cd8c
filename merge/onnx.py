"""The edge path: export a (merged) model to ONNX with a KV cache, check it, generate with it.

Exporter: onnxruntime-genai's model builder. It writes a decoder with past key values that
onnxruntime runs on CPU, keeps weights in an external data file (no 2 GB protobuf limit),
understands transformers 5 configs (`rope_parameters`), and quantizes weights to int4/int8
(MatMulNBits). optimum's exporter requires transformers < 4.58, and `torch.onnx.export`
gives no KV cache.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lorafleet.atomic import atomic_dir
from lorafleet.errors import UserError

# Max |Δlogits| vs PyTorch float32 that fails the export. Quantized exports differ by design:
# their numbers are reported, and they fail only when the user sets a tolerance.
DEFAULT_TOLERANCE = {"fp32": 1e-2, "int8": None, "int4": None}
# onnxruntime-genai's builder options for weight-only (MatMulNBits) quantization that an export passes on.
QUANT_OPTIONS = {"block_size", "accuracy_level", "algo_config", "matmul_mixed_precision", "is_symmetric"}
# A quantized export whose greedy tokens agree with the float model's less often than this is
# written with a loud warning (and the share recorded in onnx_report.json's "warnings").
LOW_AGREEMENT = 0.9


def export_onnx(model: Path, out: Path, precision: str = "fp32", tolerance: float | None = None,
                overwrite: bool = False, gen_tokens: int = 16, log: Callable[[str], None] = print,
                adapters: list[Path] | None = None, allow_pickle: bool = False,
                lora_target_modules: list[str] | None = None, max_lora_rank: int | None = None,
                quant_options: dict[str, str] | None = None) -> Path:
    """Export `model` to `out`. With `adapters`, `lora_target_modules` or `max_lora_rank`, the
    base gets LoRA inputs on the adapters' modules plus every `lora_target_modules` module (by
    default merge.onnx_adapters.DEFAULT_TARGETS), at rank up to `max_lora_rank` (default: the
    adapters' largest, at least 16), and each adapter is converted into adapters/NAME/; later
    adapters are converted with `lorafleet onnx-adapter`. UserError (nothing written) on bad input
    or a parity check above the tolerance. `quant_options`: the builder's weight-only quantization
    options for int8/int4 (`block_size`, `accuracy_level`, `algo_config`, `matmul_mixed_precision`:
    onnxruntime-genai's builder --extra_options, passed as they are)."""
    from merge import onnx_adapters

    if precision not in DEFAULT_TOLERANCE:
        raise UserError(f"--precision {precision}: use fp32, int8 or int4")
    quant_options = dict(quant_options or {})
    unknown = sorted(set(quant_options) - QUANT_OPTIONS)
    if unknown or (quant_options and precision == "fp32"):
        raise UserError(f"--quant-option {unknown[0] if unknown else next(iter(quant_options))}: "
                        + (f"use one of {', '.join(sorted(QUANT_OPTIONS))}" if unknown else
                           "quantization options apply to --precision int8 or int4"))
    if not Path(model).is_dir():  # an HF id or the embedded base, e.g. the base for --adapters
        from lorafleet.models import local_model_dir

        model = local_model_dir(str(model))
    model = Path(model)
    if not (model / "config.json").is_file():
        raise UserError(f"{model} is not an HF model directory (no config.json); export a merged model directory")
    open_export = bool(adapters or lora_target_modules or max_lora_rank)
    infos = onnx_adapters.read_edge_adapters(model, adapters, allow_pickle) if adapters else []
    if open_export:
        table = {**onnx_adapters.base_module_table(model, lora_target_modules or list(onnx_adapters.DEFAULT_TARGETS)),
                 **onnx_adapters.module_table(infos)}
        top = max((i.rank for i in infos), default=0)
        if max_lora_rank is not None and top > max_lora_rank:
            big = max(infos, key=lambda i: i.rank)
            raise UserError(f"adapter {big.name} has rank {big.rank}, above --max-lora-rank {max_lora_rank}; "
                            f"raise --max-lora-rank to {big.rank} or more")
        rank = max_lora_rank or max(top, 16)
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE[precision]
    t0 = time.time()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if open_export:
            inputs = onnx_adapters.export_base_with_lora_inputs(model, tmp, dict(sorted(table.items())), rank, log,
                                                                precision, quant_options)
            for info in infos:
                log(f"writing {onnx_adapters.ADAPTERS_DIR}/{info.name}/")
                onnx_adapters.write_onnx_adapter(info, inputs, tmp / onnx_adapters.ADAPTERS_DIR)
        else:
            log(f"exporting {model} to ONNX ({precision}, KV cache, CPU) with onnxruntime-genai's builder")
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(tmp),
                   "-p", precision, "-e", "cpu", "-c", str(tmp / ".cache")]
            if quant_options:
                cmd += ["--extra_options", *(f"{k}={v}" for k, v in quant_options.items())]
            res = subprocess.run(cmd, capture_output=True, text=True)
            shutil.rmtree(tmp / ".cache", ignore_errors=True)
            if res.returncode != 0:
                raise UserError(f"ONNX export failed (builder exit {res.returncode}):\n{res.stderr.strip()[-2000:]}")
        # The builder copies the tokenizer; keep the model's own chat template next to it.
        for f in ("chat_template.jinja", "generation_config.json"):
            if (model / f).is_file():
                shutil.copy2(model / f, tmp / f)
        export_s = time.time() - t0
        log("checking: ONNX Runtime vs PyTorch float32 logits and greedy tokens on probe prompts")
        report = {"source": str(model), "precision": precision, "quant_options": quant_options,
                  "export_seconds": round(export_s, 1),
                  "files_mb": {str(f.relative_to(tmp)): round(f.stat().st_size / 2**20, 2)
                               for f in sorted(tmp.rglob("*")) if f.is_file()},
                  "tolerance": tol}
        base, per_adapter = onnx_parity(model, tmp, gen_tokens, infos)
        report.update(base)
        if infos:
            report["adapters"] = per_adapter
        checks = [("base", report), *per_adapter.items()]
        for name, r in checks:
            log(f"{name}: max |Δlogits| {r['max_abs_logits_diff']:.3g}, greedy tokens equal for "
                f"{r['greedy_tokens_matched']}/{r['greedy_tokens_compared']} tokens")
            if tol is not None and r["max_abs_logits_diff"] > tol:
                raise UserError(f"ONNX parity check failed for {name}: max |Δlogits| {r['max_abs_logits_diff']:.4g} "
                                f"is above the tolerance {tol}; nothing was written")
            agreement = r["greedy_tokens_matched"] / max(1, r["greedy_tokens_compared"])
            if precision != "fp32" and agreement < LOW_AGREEMENT:
                report.setdefault("warnings", []).append(f"{name}: greedy agreement {agreement:.0%}")
                log(f"WARNING: {name} at {precision} agrees with the float model on only "
                    f"{r['greedy_tokens_matched']}/{r['greedy_tokens_compared']} greedy tokens (max |Δlogits| "
                    f"{r['max_abs_logits_diff']:.3g}): its answers will differ. "
                    + ("Try --quant-option block_size=16 (smaller blocks than the default 32) with "
                       "--quant-option accuracy_level=1 (float activations), or --precision int8; "
                       if precision == "int4" else "Try ")
                    + "export fp32, or evaluate it (lorafleet eval --url against lorafleet serve-edge) before "
                      "serving; --tolerance makes this an error")
        (tmp / "onnx_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"ONNX model at {out} ({time.time() - t0:.0f}s)")
    return out


def onnx_parity(model_dir: Path, onnx_dir: Path, gen_tokens: int, adapters: list = ()) -> tuple[dict, dict]:
    """ONNX Runtime vs PyTorch float32: the base, then each adapter vs peft base+adapter (unmerged).

    Both models are loaded once; adapters are attached and switched on them in turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merge.verify import probe_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    onnx_model = OnnxGenerator(onnx_dir)

    def compare(ref_model, template) -> dict[str, Any]:
        ids = probe_ids(tok, template)
        diffs, matched, compared = [], 0, 0
        for x in ids:
            with torch.no_grad():
                ref = ref_model(torch.tensor([x])).logits[0, -1].numpy()
            diffs.append(float(np.abs(ref - onnx_model.last_logits(x)).max()))
            ref_gen = ref_model.generate(torch.tensor([x]), max_new_tokens=gen_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id or tok.eos_token_id)[0][len(x):].tolist()
            got_gen = onnx_model.greedy(x, gen_tokens)
            n = min(len(ref_gen), len(got_gen))
            matched += next((i for i in range(n) if ref_gen[i] != got_gen[i]), n)
            compared += n
        return {"probes": len(ids), "max_abs_logits_diff": max(diffs), "greedy_tokens_matched": matched,
                "greedy_tokens_compared": compared}

    base = compare(hf, tok.chat_template)
    per_adapter = {}
    for info in adapters:
        from peft import PeftModel

        with_adapter = PeftModel.from_pretrained(hf, str(info.path))
        onnx_model.use(info.name)
        per_adapter[info.name] = compare(with_adapter, info.template or tok.chat_template)
        hf = with_adapter.unload()  # the plain base again, for the next adapter
    return base, per_adapter


class OnnxGenerator:
    """Greedy/sampled generation with onnxruntime-genai, prompts rendered like serving does."""

    def __init__(self, onnx_dir: Path, adapter: str | None = None):
        import onnxruntime_genai as og

        self.og = og
        self.dir = Path(onnx_dir)
        if not (self.dir / "genai_config.json").is_file():
            raise UserError(f"{onnx_dir} is not an exported ONNX model (no genai_config.json); run export-onnx")
        self.model = og.Model(str(self.dir))
        self.adapter, self.adapters, self.loaded = None, None, set()
        self.use(adapter)

    def use(self, adapter: str | None) -> "OnnxGenerator":
        """Generate with this exported adapter from now on (None: the base); each loads once."""
        from merge.onnx_adapters import ADAPTERS_DIR, WEIGHTS, adapter_names

        if adapter is not None and adapter not in self.loaded:
            known = adapter_names(self.dir)
            if adapter not in known:
                raise UserError(f"adapter {adapter!r} is not in {self.dir / ADAPTERS_DIR} (exported adapters: "
                                f"{', '.join(known) or 'none; export with --adapters'})")
            if self.adapters is None:
                self.adapters = self.og.Adapters(self.model)
            self.adapters.load(str(self.dir / ADAPTERS_DIR / adapter / WEIGHTS), adapter)
            self.loaded.add(adapter)
        self.adapter = adapter
        return self

    def _generator(self, ids: list[int], max_new: int, temperature: float = 0.0):
        params = self.og.GeneratorParams(self.model)
        opts: dict[str, Any] = {"max_length": len(ids) + max_new}
        if temperature > 0:
            opts.update(do_sample=True, temperature=temperature)
        else:
            opts.update(do_sample=False)
        params.set_search_options(**opts)
        gen = self.og.Generator(self.model, params)
        if self.adapter is not None:
            gen.set_active_adapter(self.adapters, self.adapter)
        gen.append_tokens(ids)
        return gen

    def last_logits(self, ids: list[int]) -> np.ndarray:
        gen = self._generator(ids, 1)
        return np.array(gen.get_logits()).reshape(-1)

    def greedy(self, ids: list[int], max_new: int, temperature: float = 0.0) -> list[int]:
        gen = self._generator(ids, max_new, temperature)
        while not gen.is_done():
            gen.generate_next_token()
        return list(gen.get_sequence(0))[len(ids):]


def generate_text(onnx_dir: Path, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
                  system: str | None = None, adapter: str | None = None) -> str:
    from transformers import AutoTokenizer

    from lorafleet.templates import render_prompt_ids
    from merge.onnx_adapters import adapter_template

    gen = OnnxGenerator(onnx_dir, adapter=adapter)
    tok = AutoTokenizer.from_pretrained(onnx_dir)
    # An adapter is prompted with the template it was trained with, like serving does.
    template = (adapter_template(onnx_dir, adapter) if adapter else None) or tok.chat_template
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = render_prompt_ids(tok, template, msgs) if template else tok(prompt)["input_ids"]
    out = gen.greedy(ids, max_new_tokens, temperature)
    return tok.decode(out, skip_special_tokens=True)
