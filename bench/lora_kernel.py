"""vLLM's multi-LoRA on CPU: the stock punica ops vs lorafleet's grouped kernel, same engine.

For each kernel (`LORAFLEET_LORA_KERNEL=stock|grouped`, each in a fresh process so the vLLM
plugin sees its setting), vLLM's offline `LLM` on the embedded SmolLM2 with the two bench
adapters generates `--prompts` prompts × `--max-tokens` tokens (ignore_eos, greedy) three ways:
base only, one adapter for every prompt, and the two adapters alternating. Tokens/s is the
median of `--repeats`; the LoRA overhead is adapter tokens/s ÷ base tokens/s in the same process.

It also checks correctness where the two kernels differ: base prompts answered alone vs the same
prompts batched with adapter prompts (both adapter slots occupied) must give the same tokens.

    python bench/lora_kernel.py [--prompts 16] [--max-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, run_child, save, table  # noqa: E402

CHILD = r"""
import json, os, statistics, sys, time
os.environ["LORAFLEET_LORA_KERNEL"] = sys.argv[1]
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
from serve.engine import pick_dtype

spec = json.loads(sys.argv[2])
if __name__ == "__main__":
    llm = LLM(model=spec["base"], dtype=pick_dtype("auto"), max_model_len=1024, max_num_seqs=32,
              kv_cache_memory_bytes=2**30, enable_lora=True, max_loras=2, max_lora_rank=16, seed=0)
    loras = {n: LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(spec["adapters"].items())}
    names = list(loras)
    prompts = spec["prompts"]
    sp = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)

    def run(requests, prompts=prompts):
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, lora_request=requests, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)

    mixes = {"base only": None, "one adapter": [loras[names[0]]] * len(prompts),
             "two adapters mixed": [loras[names[i % 2]] for i in range(len(prompts))]}
    run(mixes["two adapters mixed"][:2], prompts[:2])  # warm-up: adapters loaded
    tps = {k: [] for k in mixes}
    for _ in range(spec["repeats"]):
        for k, req in mixes.items():  # interleaved, so drift hits every mix alike
            tps[k].append(run(req))
    # Correctness: base answers alone vs batched with requests for both adapters.
    few = prompts[:4]
    g = SamplingParams(temperature=0, max_tokens=32)
    alone = [o.outputs[0].token_ids for o in llm.generate(few, g, use_tqdm=False)]
    mixed = llm.generate(few + few, g, lora_request=[None] * 4 + [loras[names[i % 2]] for i in range(4)],
                         use_tqdm=False)
    same = sum(list(a) == list(m.outputs[0].token_ids) for a, m in zip(alone, mixed[:4]))
    print("RESULT" + json.dumps({"tokens_per_s": {k: statistics.median(v) for k, v in tps.items()},
                                 "all_runs": tps, "base_answers_unchanged_when_batched": [same, len(few)]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from bench.serve import ensure_adapters, requests_for, same_cpu_cores
    from lorafleet.models import resolve_model
    from serve.engine import pick_dtype

    os.environ.update(same_cpu_cores())  # the engine settings lorafleet serve uses here
    adapters = ensure_adapters()
    spec = {"base": resolve_model("embedded:smollm2-135m-instruct"),
            "adapters": {n: str(p) for n, p in adapters.items()},
            "prompts": [p for _, p in requests_for(adapters, args.prompts)],
            "max_tokens": args.max_tokens, "repeats": args.repeats}
    results = {}
    for kernel in ("stock", "grouped"):
        t = time.time()
        results[kernel] = run_child(CHILD, kernel, json.dumps(spec), timeout=3600)
        print(f"{kernel}: {results[kernel]['tokens_per_s']} ({time.time() - t:.0f} s)", flush=True)

    rows = []
    for kernel, r in results.items():
        tps = r["tokens_per_s"]
        ok = r["base_answers_unchanged_when_batched"]
        rows.append({"kernel": kernel, **{f"{k} tok/s": v for k, v in tps.items()},
                     "overhead one adapter": tps["one adapter"] / tps["base only"],
                     "overhead mixed": tps["two adapters mixed"] / tps["base only"],
                     "base answers unchanged in mixed batch": f"{ok[0]}/{ok[1]}"})
    cols = list(rows[0])
    md = table(rows, cols, f"vLLM offline, {args.prompts} prompts × {args.max_tokens} tokens, dtype {pick_dtype('auto')}")
    speed = {k: results["grouped"]["tokens_per_s"][k] / results["stock"]["tokens_per_s"][k]
             for k in results["stock"]["tokens_per_s"]}
    md += "\n\ngrouped / stock: " + " · ".join(f"{k}: {v:.2f}×" for k, v in speed.items())
    print(md)
    save("lora_kernel", {"results": results, "grouped_over_stock": speed, "markdown": md,
                         "settings": {**vars(args), **same_cpu_cores()}})
    plot(results)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = list(next(iter(results.values()))["tokens_per_s"])
    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=110)
    width = 0.8 / len(results)
    for i, (kernel, r) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(mixes))]
        ax.bar(xs, [r["tokens_per_s"][m] for m in mixes], width, label=kernel)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(mixes))], mixes)
    ax.set_ylabel("generated tokens/s")
    ax.set_title("vLLM CPU multi-LoRA: stock vs grouped kernel")
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "lora_kernel.png")


if __name__ == "__main__":
    main()
