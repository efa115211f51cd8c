"""Merge cost: lorafleet's streaming merge vs peft's merge_and_unload, same base and adapter.

Each method runs in its own process (so peak RSS is its own), three times; the table shows
the median wall time and peak RSS, and the ratios. Time is measured with torch, transformers
and peft already imported (compute only); peak RSS in separate runs that import only what each
method needs (the streaming merge never imports transformers or peft), against a process that
only imports torch. Parity checking is off here: it loads extra
models and would measure the checker, not the merge. The outputs are compared bit for bit.

    python bench/merge.py [--adapter DIR] [--repeats 3]
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
    save("merge", {"rows": rows, "rss_ratio": rss_ratio, "time_ratio": time_ratio, "bit_identical": identical,
                   "torch_import_rss_mb": imports, "adapter": str(adapter), "repeats": args.repeats, "markdown": md})
    bars("merge", list(results), {"peak RSS (MB)": [r["peak_rss_mb"] for r in results.values()],
                                  "seconds": [r["seconds"] for r in results.values()]},
         "merge: peft merge_and_unload vs streaming", {})


if __name__ == "__main__":
    main()
