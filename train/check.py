"""The train-end generation check: does the adapter answer as its data says, and if not, why?

Right after training, the adapter answers (greedily, through the serving template) the eval
split's questions, or a sample of its training records when there is no eval split, and the
answers are scored with `lorafleet eval`'s metrics. A low training loss does not prove an
adapter answers right, and a high one says little about why: the hint names the usual causes
in plain words.
"""

from __future__ import annotations

import random
from typing import Any

from lorafleet.config import TrainConfig
from lorafleet.evaluation.items import EvalItem

DECAYING = {"linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt", "cosine_with_min_lr",
            "warmup_stable_decay", "reduce_lr_on_plateau"}
LOSS_LEARNED = 0.1  # answer-token cross-entropy (nats) below which short answers came back verbatim here
ENOUGH = 0.9  # share of answers right that counts as "learned"


def check_items(cfg: TrainConfig, n: int, n_rows: int) -> tuple[str, list[EvalItem]]:
    """("eval" | "train", up to n items): the eval split's records, else a seeded sample of the
    training records. Records that render no answer to score (plain text) give no items.

    An `eval_fraction` split is the trainer's only when its `n_rows` training-file rows are the
    file's records one for one (split_eval draws from the count): with records dropped at
    max_seq_length, or KTO's two rows a pair, the check samples training records instead, and
    says so ("train"), rather than call trained-on records held out."""
    from lorafleet.errors import UserError
    from lorafleet.evaluation.items import load_items
    from train.data import split_eval

    try:
        if cfg.data.eval_file:
            return "eval", load_items(cfg.data.eval_file, cfg.data.format)[:n]
        items = load_items(cfg.data.train_file, cfg.data.format)
    except UserError:
        return "train", []  # text data: nothing to compare answers against
    if cfg.data.eval_fraction > 0 and len(items) == n_rows:
        _, held_out = split_eval(items, cfg.data.eval_fraction, cfg.training.seed)  # the trainer's split
        return "eval", held_out[:n]
    return "train", random.Random(cfg.training.seed).sample(items, min(n, len(items)))


def hint(cfg: TrainConfig, share: float, final_loss: float | None, steps: int) -> str | None:
    """Plain-words causes of answers that do not come back, or None when most do. (For preference
    tuning the loss is DPO's or KTO's, on another scale, and the chosen answer need not come back
    word for word: no hint.)"""
    t = cfg.training
    if share >= ENOUGH or t.method != "sft":
        return None
    why = []
    if final_loss is not None and final_loss > LOSS_LEARNED:
        why.append(f"the training loss is still {final_loss:.2f} (answers come back word for word below about "
                   f"{LOSS_LEARNED})")
        if t.lr_scheduler_type in DECAYING:
            why.append(f"lr_scheduler_type {t.lr_scheduler_type} lowered the learning rate to near 0 before the answers "
                       "were learned: try lr_scheduler_type constant (the default), or a higher learning_rate")
    if steps < 50:
        why.append(f"only {steps} optimizer steps: raise num_train_epochs (or max_steps); small datasets need many "
                   "passes")
    if not why:
        why.append("the loss is low but greedy answers differ: check the eval records resemble the training ones, "
                   "or train longer")
    return "; ".join(why)


def generation_check(cfg: TrainConfig, model: Any, tokenizer: Any, template: str, final_loss: float | None,
                     steps: int, n: int, n_rows: int) -> dict[str, Any] | None:
    """Answer up to n check items; return what the manifest keeps (None when there are none).
    `n_rows`: rows the training file gave before any eval split (see check_items)."""
    import time

    from lorafleet.evaluation.generate import generate_answers
    from lorafleet.evaluation.metrics import score, summarize
    from lorafleet.templates import encode

    split, items = check_items(cfg, n, n_rows)
    if not items:
        return None
    t0 = time.time()
    longest = max(len(encode(tokenizer, it.expected)) for it in items)
    answers = generate_answers(model, tokenizer, template, items, max_new_tokens=min(longest + 16, 256))
    scores = [score(it.expected, a) for it, a in zip(items, answers)]
    means = summarize(scores)
    right = round(means["fact_match"] * len(items))
    return {"split": split, "method": cfg.training.method, "items": len(items), "fact_match": right,
            "exact_match": round(means["exact_match"] * len(items)), "rougeL": means["rougeL"],
            "seconds": round(time.time() - t0, 1), "hint": hint(cfg, right / len(items), final_loss, steps),
            "examples": [{"question": it.question, "expected": it.expected, "answer": a}
                         for it, a in list(zip(items, answers))[:3]]}


def check_line(check: dict[str, Any]) -> str:
    """The one line `lorafleet train` prints."""
    what = "training answers reproduced" if check["split"] == "train" else "held-out answers right"
    if check.get("method", "sft") != "sft":
        what = "chosen answers given" + (" (training prompts)" if check["split"] == "train" else " (held-out prompts)")
    line = (f"check: {check['fact_match']}/{check['items']} {what} (fact match; exact {check['exact_match']}/"
            f"{check['items']}, ROUGE-L {check['rougeL']:.2f})")
    return line + (f" · hint: {check['hint']}" if check["hint"] else "")
