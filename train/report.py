"""What a run leaves next to the adapter: the manifest, a loss-curve PNG and a model card."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from lorafleet import __version__
from lorafleet.config import TrainConfig


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    return {"lorafleet": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "trl": trl.__version__, "python": platform.python_version()}


def manifest(cfg: TrainConfig, base: dict[str, Any], template_name: str, template: str, train_set: Any,
             n_train: int, n_eval: int, trainable: int, total: int, train_loss: float | None,
             eval_loss: float | None, summary: dict[str, Any], use_4bit: bool, device: str) -> dict[str, Any]:
    return {
        "format": "lorafleet-adapter/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # `name` is the base as the config named it (portable across machines), not a cache path.
        "base_model": {"name": cfg.base_model, "fingerprint": base["fingerprint"], "arch": base["arch"]},
        "template": {"name": template_name, "text": template},
        "data": {"train_file": cfg.data.train_file, "eval_file": cfg.data.eval_file, "format": cfg.data.format,
                 "sha256_16": train_set.fingerprint, "train_examples": n_train, "eval_examples": n_eval,
                 "tokens": train_set.num_tokens, "truncated": train_set.truncated, "dropped": train_set.dropped},
        "hyperparameters": {"quantization": cfg.quantization.model_dump() | {"used_4bit": use_4bit},
                            "lora": cfg.lora.model_dump(), "training": cfg.training.model_dump(), "device": device},
        "parameters": {"trainable": trainable, "total": total},
        "results": {"train_loss": train_loss, "eval_loss": eval_loss, **summary},
        "versions": _versions(),
    }


def plot_losses(history: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(h["step"], h["loss"]) for h in history if "loss" in h]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def model_card(man: dict[str, Any]) -> str:
    r = man["results"]
    lora = man["hyperparameters"]["lora"]
    eval_line = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "n/a"
    return f"""---
library_name: peft
base_model: {man['base_model']['name']}
tags: [lora, lorafleet]
---
# LoRA adapter

- Base model: `{man['base_model']['name']}` (fingerprint `{man['base_model']['fingerprint']}`)
- Prompt template: `{man['template']['name']}` (the text is in `lorafleet.json`; serving uses it)
- LoRA: r={lora['r']}, alpha={lora['lora_alpha']}, dropout={lora['lora_dropout']}, targets={lora['target_modules']}
- Data: `{man['data']['train_file']}` · {man['data']['train_examples']} train / {man['data']['eval_examples']} eval examples
- Trainable parameters: {man['parameters']['trainable']:,} of {man['parameters']['total']:,}
- Final train loss {r['train_loss']:.4f} · eval loss {eval_line} · {r['steps']} steps · {r['tokens_per_s']:.0f} tokens/s

Load with peft: `PeftModel.from_pretrained(base, this_dir)`; serve with `lorafleet serve --adapters <parent dir>`;
merge with `lorafleet merge --adapter this_dir`.
"""
