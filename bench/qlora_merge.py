"""QLoRA merge: into the original weights W, or into dequant(NF4(W)), the weights it was trained on.

Trains a QLoRA adapter on the embedded base (bitsandbytes NF4 on CPU, double quantization,
bf16 compute: the recipe's QLoRA settings) on the support data, merges it both ways (bfloat16,
the merge's default dtype), and measures each merged model against the model as trained (the
4-bit base + the adapter, through peft) on the training questions, each followed by the trained
model's greedy answer: max |Δlogits|, greedy next-token agreement, and the answers' mean
log-likelihood under both (merge/qlora.py as_trained_report).

    python bench/qlora_merge.py [--adapter DIR] [--steps 60] [--questions 24]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, bars, save, table  # noqa: E402


def train(out: Path, steps: int) -> Path:
    from lorafleet.config import load_config, TrainConfig
    from train.recipe import run

    cfg = load_config(TrainConfig, ROOT / "examples/cpu-support.yaml",
                      ["quantization.load_in_4bit=true", f"training.max_steps={steps}", f"output_dir={out}"])
    return run(cfg, log=print)


def questions(adapter: Path, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from lorafleet.adapter import read_adapter
    from lorafleet.templates import render_prompt_ids

    info = read_adapter(adapter)
    from lorafleet.models import adapter_base, local_model_dir

    tok = AutoTokenizer.from_pretrained(adapter if info.has_tokenizer() else local_model_dir(adapter_base(info)))
    from lorafleet.records import read_records, to_messages

    records = read_records(str(ROOT / "examples/data/support.jsonl"))[:n]
    return [render_prompt_ids(tok, info.template, to_messages(r, "alpaca")[:-1]) for r in records]  # without the answer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", type=Path, help="a QLoRA adapter (default: train one)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--questions", type=int, default=24)
    a = ap.parse_args()
    work = ROOT / "runs" / "bench" / "qlora_merge"
    adapter = a.adapter or work / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        train(adapter, a.steps)

    from lorafleet.adapter import read_adapter
    from lorafleet.models import adapter_base
    from merge.qlora import as_trained_report, trained_quantization
    from lorafleet.models import local_model_dir
    from merge.run import merge_adapter

    info = read_adapter(adapter)
    quant = trained_quantization(info)
    assert quant is not None, f"{adapter} was not trained on a 4-bit base"
    base_dir = local_model_dir(adapter_base(info))
    ids = questions(adapter, a.questions)
    rows = []
    for weights in ("original", "dequantized"):
        out = work / f"merged-{weights}"
        merge_adapter(adapter, out, dtype="bfloat16", verify=False, overwrite=True, base_weights=weights, log=print)
        r = as_trained_report(base_dir, info, quant, out, ids)
        rows.append({"base_weights": weights, "max_abs_logits_diff": r["max_abs_logits_diff"],
                     "greedy_agreement": r["greedy_agreement"], "positions": r["positions"],
                     "answer_loglik_trained": r["answer_loglik_trained"],
                     "answer_loglik_merged": r["answer_loglik_merged"]})
    md = table(rows, list(rows[0]), "QLoRA merge vs the model as trained (NF4 base + adapter), bfloat16 merges")
    save("qlora_merge", {"adapter": str(adapter), "quantization": quant.model_dump(), "questions": len(ids),
                         "rows": rows, "markdown": md})
    bars("qlora_merge", [r["base_weights"] for r in rows],
         {"max |Δlogits|": [r["max_abs_logits_diff"] for r in rows],
          "greedy agreement": [r["greedy_agreement"] for r in rows]},
         "QLoRA merge vs the model as trained", {"max |Δlogits|": "logits", "greedy agreement": "share of positions"})


if __name__ == "__main__":
    main()
