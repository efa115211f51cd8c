"""Training throughput: lorafleet's trainer vs the seed tutorial's recipe, same model/data/steps.

Seed recipe: alpaca records formatted into one `text` field, SFTTrainer with its default loss
(and its per-step entropy/accuracy metrics), no packing, every batch padded to max length.
lorafleet: the same SFTTrainer from `lorafleet train` (completion-only loss, length-grouped
dynamic padding, lean loss). A third row keeps lorafleet's data pipeline but trl's default loss,
to show where the time goes. Both: SmolLM2-135M-Instruct, LoRA r=16 on all linear layers,
batch 4, the same learning rate, steps and seed, float32 on CPU.

Reported: real (non-pad) tokens per second, seconds per step, peak RSS (each run in its own
process), and the same quality measure for both after training: the mean loss on the answer
tokens of the bundled questions (lower is better).

    python bench/train.py [--steps 30] [--max-seq-length 256]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, bars, run_child, save, table  # noqa: E402

SEED = r"""
import json, resource, sys, time, torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, TaskType
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
from lorafleet.models import resolve_model
a = json.loads(sys.argv[1])
path = resolve_model("embedded:smollm2-135m-instruct")
tok = AutoTokenizer.from_pretrained(path); tok.pad_token = tok.eos_token
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                                         bias="none", task_type=TaskType.CAUSAL_LM))
recs = [json.loads(l) for l in open(a["data"])]
def fmt(e):
    return {"text": f"### 指令\n{e['instruction']}\n\n### 输入\n{e['input']}\n\n### 回答\n{e['output']}"}
ds = Dataset.from_list(recs).map(fmt, remove_columns=["instruction", "input", "output"])
seen = {"tokens": 0}
class Count(TrainerCallback):
    pass
class Counting(SFTTrainer):
    def compute_loss(self, model, inputs, *x, **k):
        seen["tokens"] += int(inputs["attention_mask"].sum())
        return super().compute_loss(model, inputs, *x, **k)
args = SFTConfig(output_dir=a["out"], max_steps=a["steps"], per_device_train_batch_size=4, learning_rate=1e-3,
                 lr_scheduler_type="cosine", warmup_steps=3, logging_steps=10, save_strategy="no", report_to="none",
                 seed=7, use_cpu=True, max_length=a["max_len"], packing=False, pad_to_multiple_of=a["max_len"],
                 dataset_text_field="text")
tr = Counting(model=model, args=args, train_dataset=ds, processing_class=tok)
t = time.time(); tr.train(); dt = time.time() - t
model.save_pretrained(a["out"] + "/adapter")
print("RESULT" + json.dumps({"seconds": dt, "tokens": seen["tokens"], "steps": a["steps"],
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

OURS = r"""
import json, resource, sys
from lorafleet.config import load_config, TrainConfig
from train.recipe import run
a = json.loads(sys.argv[1])
cfg = load_config(TrainConfig, "examples/cpu-support.yaml", [f"output_dir={a['out']}/adapter",
      f"training.max_steps={a['steps']}", f"training.max_seq_length={a['max_len']}", "training.save_steps=100000",
      "training.logging_steps=10", "training.warmup_steps=3", f"training.lean_loss={a['lean']}"])
out = run(cfg, log=lambda m: None)
r = json.load(open(out / "lorafleet.json"))["results"]
print("RESULT" + json.dumps({"seconds": r["train_runtime_s"], "tokens": r["tokens_seen"], "steps": r["steps"],
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

ANSWER_LOSS = r"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from lorafleet.models import resolve_model
from lorafleet.templates import SEED_TEMPLATE, split_prompt_completion
a = json.loads(sys.argv[1])
path = resolve_model("embedded:smollm2-135m-instruct")
tok = AutoTokenizer.from_pretrained(path)
base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
out = {}
for name, ad in a["adapters"].items():
    m = PeftModel.from_pretrained(base, ad).eval()
    tot, n = 0.0, 0
    for line in open(a["data"]):
        e = json.loads(line)
        msgs = [{"role": "system", "content": e["instruction"]}, {"role": "user", "content": e["input"]},
                {"role": "assistant", "content": e["output"]}]
        ids, mask, _ = split_prompt_completion(tok, SEED_TEMPLATE, msgs)
        # the answer text itself, without the template's trailing EOS/newlines (the seed never trained those)
        ans = tok(e["output"], add_special_tokens=False)["input_ids"]
        start = mask.index(1)
        x = torch.tensor([ids[: start + len(ans)]])
        with torch.no_grad():
            logits = m(x).logits[0, start - 1 : start - 1 + len(ans)]
        tot += torch.nn.functional.cross_entropy(logits, torch.tensor(ans), reduction="sum").item()
        n += len(ans)
    out[name] = tot / n
    base = m.unload()
print("RESULT" + json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--max-seq-length", type=int, default=256)
    args = ap.parse_args()
    work = ROOT / "runs" / "bench-train"
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    common = {"data": str(ROOT / "examples/data/support.jsonl"), "steps": args.steps, "max_len": args.max_seq_length}
    print(f"training {args.steps} steps each (SmolLM2-135M, LoRA r=16 all-linear, batch 4, CPU float32)…")
    seed = run_child(SEED, json.dumps({**common, "out": str(work / "seed")}))
    ours = run_child(OURS, json.dumps({**common, "out": str(work / "lorafleet"), "lean": True}))
    # ablation: lorafleet's data pipeline with trl's default loss (entropy + accuracy metrics)
    trl_loss = run_child(OURS, json.dumps({**common, "out": str(work / "trl-loss"), "lean": False}))
    loss = run_child(ANSWER_LOSS, json.dumps({"data": common["data"], "adapters": {
        "seed": str(work / "seed" / "adapter"), "lorafleet": str(work / "lorafleet" / "adapter"),
        "trl-loss": str(work / "trl-loss" / "adapter")}}))
    rows = []
    for name, key, r in (("seed recipe", "seed", seed), ("lorafleet, trl's loss", "trl-loss", trl_loss),
                         ("lorafleet", "lorafleet", ours)):
        rows.append({"trainer": name, "steps": r["steps"], "s/step": r["seconds"] / r["steps"],
                     "tokens/s": r["tokens"] / r["seconds"], "peak RSS MB": r["peak_rss_mb"],
                     "answer loss": loss[key]})
    ratio = rows[2]["tokens/s"] / rows[0]["tokens/s"]
    step_ratio = rows[0]["s/step"] / rows[2]["s/step"]
    md = table(rows, ["trainer", "steps", "s/step", "tokens/s", "peak RSS MB", "answer loss"],
               f"train: lorafleet vs seed recipe — {ratio:.2f}× tokens/s, {step_ratio:.2f}× faster steps")
    save("train", {"rows": rows, "tokens_per_s_ratio": ratio, "step_speedup": step_ratio,
                   "rss_ratio": rows[2]["peak RSS MB"] / rows[0]["peak RSS MB"], "markdown": md,
                   "settings": common | {"model": "SmolLM2-135M-Instruct", "lora_r": 16, "batch": 4}})
    bars("train", [r["trainer"] for r in rows],
         {"tokens/s": [r["tokens/s"] for r in rows], "seconds per step": [r["s/step"] for r in rows],
          "peak RSS (MB)": [r["peak RSS MB"] for r in rows], "answer loss": [r["answer loss"] for r in rows]},
         "training: lorafleet vs the seed recipe (same steps)", {})
    print(f"tokens/s ratio lorafleet/seed: {ratio:.2f}×  (step time {step_ratio:.2f}× faster)")


if __name__ == "__main__":
    main()
