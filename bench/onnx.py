"""Edge decode speed: onnxruntime-genai (fp32, int8, int4) vs PyTorch eager, same merged model.

Greedy decoding, batch 1, the same chat prompt, `--new-tokens` tokens each, after one warm-up
run; tokens/s is new tokens over the generation wall time (prompt included, as a user waits
for it). File sizes and the export's parity numbers come from each `onnx_report.json`.

    python bench/onnx.py [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, bars, run_child, save, table  # noqa: E402

DECODE = r"""
import json, sys, time
a = json.loads(sys.argv[1])
from transformers import AutoTokenizer
from lorafleet.templates import render_prompt_ids
tok = AutoTokenizer.from_pretrained(a["model"])
ids = render_prompt_ids(tok, tok.chat_template, [{"role": "user", "content": a["prompt"]}])
n = a["new_tokens"]
times = []
if a["engine"] == "pytorch":
    import torch
    torch.set_num_threads(a["threads"])
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32).eval()
    x = torch.tensor([ids])
    def run():
        with torch.no_grad():
            out = m.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
        return out.shape[1] - len(ids)
else:
    import onnxruntime_genai as og
    model = og.Model(a["onnx"])
    def run():
        p = og.GeneratorParams(model)
        p.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        g = og.Generator(model, p)
        g.append_tokens(ids)
        k = 0
        while not g.is_done():
            g.generate_next_token(); k += 1
        return k
run()
for _ in range(a["repeats"]):
    t = time.perf_counter(); k = run(); times.append(k / (time.perf_counter() - t))
print("RESULT" + json.dumps({"tokens_per_s": sorted(times)[len(times) // 2], "tokens": k}))
"""


def ensure_merged() -> Path:
    merged = ROOT / "runs" / "merged" / "support"
    if not (merged / "config.json").is_file():
        import subprocess

        ad = ROOT / "runs" / "adapters" / "support"
        if not (ad / "adapter_model.safetensors").is_file():
            subprocess.run([sys.executable, "-m", "train", "examples/cpu-support.yaml", "--set",
                            "training.max_steps=5"], check=True, cwd=ROOT)
        subprocess.run([sys.executable, "-m", "merge", "--adapter", str(ad), "--out", str(merged),
                        "--dtype", "bfloat16"], check=True, cwd=ROOT)
    return merged


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from merge.onnx import export_onnx

    merged = ensure_merged()
    work = ROOT / "runs" / "bench-onnx"
    prompt = "Write a short paragraph about drones."
    rows = []
    common = {"model": str(merged), "prompt": prompt, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "threads": args.threads}
    pt = run_child(DECODE, json.dumps({**common, "engine": "pytorch"}))
    rows.append({"engine": "PyTorch eager fp32", "tokens/s": pt["tokens_per_s"], "vs PyTorch": 1.0,
                 "size MB": sum(f.stat().st_size for f in merged.glob("*.safetensors")) / 2**20,
                 "max abs Δlogits": 0.0, "greedy match": "-"})
    for precision in ("fp32", "int8", "int4"):
        out = work / precision
        if not (out / "onnx_report.json").is_file():
            export_onnx(merged, out, precision=precision, overwrite=True, log=print)
        rep = json.loads((out / "onnx_report.json").read_text())
        r = run_child(DECODE, json.dumps({**common, "engine": "onnx", "onnx": str(out)}))
        rows.append({"engine": f"onnxruntime-genai {precision}", "tokens/s": r["tokens_per_s"],
                     "vs PyTorch": r["tokens_per_s"] / pt["tokens_per_s"],
                     "size MB": sum(f.stat().st_size for f in out.glob("model.onnx*")) / 2**20,
                     "max abs Δlogits": rep["max_abs_logits_diff"],
                     "greedy match": f"{rep['greedy_tokens_matched']}/{rep['greedy_tokens_compared']}"})
    md = table(rows, ["engine", "tokens/s", "vs PyTorch", "size MB", "max abs Δlogits", "greedy match"],
               f"ONNX decode, batch 1, {args.new_tokens} new tokens, {args.threads} threads")
    save("onnx", {"rows": rows, "markdown": md, "settings": common})
    bars("onnx", [r["engine"].replace("onnxruntime-genai ", "ort ") for r in rows],
         {"decode tokens/s": [r["tokens/s"] for r in rows], "size (MB)": [r["size MB"] for r in rows]},
         "edge decode: onnxruntime-genai vs PyTorch eager", {})


if __name__ == "__main__":
    main()
