"""QLoRA on one CUDA GPU: lorafleet's trainer vs the seed recipe, step time and peak VRAM.

Both load the base in 4-bit NF4 with double quantization (bitsandbytes), LoRA r=16 on all
linear layers, paged 8-bit AdamW, bf16 compute, the same data, batch and steps. The seed recipe
pads every batch to max length and uses trl's default loss; lorafleet uses its own trainer
(`lorafleet train` with the same settings).

`--model` is an HF id or directory; without one (machines with no model hub) a random
Llama of about 0.5B parameters is built on the fly, which measures speed, not quality.

    python bench/gpu_qlora.py [--model ID_OR_DIR] [--steps 20] [--max-seq-length 512]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, bars, run_child, save, table  # noqa: E402

SEED = r"""
import json, sys, time, torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training, TaskType
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer
a = json.loads(sys.argv[1])
bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                         bnb_4bit_use_double_quant=True)
model = AutoModelForCausalLM.from_pretrained(a["model"], quantization_config=bnb, device_map={"": 0})
tok = AutoTokenizer.from_pretrained(a["model"]); tok.pad_token = tok.eos_token
model = prepare_model_for_kbit_training(model)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05,
                                         task_type=TaskType.CAUSAL_LM))
recs = [json.loads(l) for l in open(a["data"])]
ds = Dataset.from_list([{"text": f"### 指令\n{e['instruction']}\n\n### 输入\n{e['input']}\n\n### 回答\n{e['output']}"}
                        for e in recs])
args = SFTConfig(output_dir=a["out"], max_steps=a["steps"], per_device_train_batch_size=4, learning_rate=2e-4,
                 logging_steps=5, save_strategy="no", report_to="none", bf16=True, optim="paged_adamw_8bit",
                 max_length=a["max_len"], packing=False, pad_to_multiple_of=a["max_len"], gradient_checkpointing=True)
tr = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
torch.cuda.reset_peak_memory_stats(); t = time.time(); tr.train(); torch.cuda.synchronize(); dt = time.time() - t
print("RESULT" + json.dumps({"s_per_step": dt / a["steps"], "peak_vram_mb": torch.cuda.max_memory_allocated() / 2**20}))
"""

OURS = r"""
import json, sys, torch
from lorafleet.config import TrainConfig
from train.recipe import run
a = json.loads(sys.argv[1])
cfg = TrainConfig.model_validate({
    "base_model": a["model"], "template": "seed",
    "data": {"train_file": a["data"], "format": "alpaca"},
    "quantization": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16"},
    "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.05},
    "training": {"max_steps": a["steps"], "per_device_train_batch_size": 4, "learning_rate": 2e-4, "bf16": True,
                 "optim": "paged_adamw_8bit", "max_seq_length": a["max_len"], "save_steps": 100000,
                 "logging_steps": 5, "gradient_checkpointing": True},
    "output_dir": a["out"] + "/adapter"})
out = run(cfg, log=print)
r = json.load(open(out / "lorafleet.json"))["results"]
print("RESULT" + json.dumps({"s_per_step": r["train_runtime_s"] / r["steps"], "peak_vram_mb": r["peak_vram_mb"]}))
"""

RANDOM_MODEL = r"""
import sys, torch
sys.path.insert(0, "tests")
from pathlib import Path
from fixtures import build_tokenizer
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
build_tokenizer(out, Path("."))
tok = AutoTokenizer.from_pretrained(out)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                  num_attention_heads=12, num_key_value_heads=4, head_dim=128, max_position_embeddings=4096,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
print("RESULT{}")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-seq-length", type=int, default=512)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu_qlora.py needs a CUDA GPU (QLoRA's 4-bit kernels); run bench/train.py on CPU")
    work = ROOT / "runs" / "bench-gpu-qlora"
    model = args.model
    if model is None:
        model = str(work / "random-llama")
        if not (Path(model) / "config.json").is_file():
            run_child(RANDOM_MODEL, model)
    common = {"model": model, "data": str(ROOT / "examples/data/support.jsonl"), "steps": args.steps,
              "max_len": args.max_seq_length}
    seed = run_child(SEED, json.dumps({**common, "out": str(work / "seed")}))
    ours = run_child(OURS, json.dumps({**common, "out": str(work / "lorafleet")}))
    rows = [{"trainer": "seed recipe", **seed}, {"trainer": "lorafleet", **ours}]
    md = table(rows, ["trainer", "s_per_step", "peak_vram_mb"],
               f"QLoRA on {torch.cuda.get_device_name(0)}: step time {seed['s_per_step'] / ours['s_per_step']:.2f}× "
               f"faster, VRAM {ours['peak_vram_mb'] / seed['peak_vram_mb']:.2f}×")
    save("gpu_qlora", {"rows": rows, "gpu": torch.cuda.get_device_name(0), "markdown": md, "settings": common})
    bars("gpu_qlora", [r["trainer"] for r in rows], {"s/step": [r["s_per_step"] for r in rows],
                                                      "peak VRAM (MB)": [r["peak_vram_mb"] for r in rows]},
         "QLoRA on one GPU", {})


if __name__ == "__main__":
    main()
