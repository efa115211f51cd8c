"""Preference tuning with trl's trainers: DPO, KTO, ORPO, on the same LoRA/QLoRA model as SFT.

- DPO (Rafailov et al. 2023) and KTO (Ethayarajh et al. 2024) need a reference model: trl
  1.16 keeps a frozen copy of the adapter it is given as the adapter "ref" (dpo_trainer.py, the
  PeftModel branch). For a fresh LoRA that copy is the untrained adapter, i.e. the base; started
  from an SFT adapter (`adapter_name_or_path`) it is the SFT model, as the DPO paper prescribes.
  Only "default" is written, and a resume restores it (SFTAdapterResume).
- ORPO (Hong et al. 2024) needs none. In trl 1.16 it lives in `trl.experimental`.

DPO's rows are tokenized here, by lorafleet's template (lorafleet.templates): the answer tokens
it scores are the ones the served adapter is asked to produce, end-of-turn token included.
KTO and ORPO get the same rendered text and tokenize it with trl, which can differ at the ends:
both append EOS when the answer does not end with it, KTO tokenizes with the tokenizer's special
tokens (a second BOS where the template writes one, as Llama 3's does) and ORPO adds BOS when
the prompt lacks it. ChatML templates (the embedded base, Qwen) come out the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from lorafleet.config import TrainConfig
from lorafleet.errors import UserError
from lorafleet.templates import encode, prompt_and_answer
from train.sft import common_args

METHODS = ("dpo", "kto", "orpo")


@dataclass
class PreferenceSet:
    """Rows for one method's trainer, with what the manifest reports (as train.data.TokenizedSet)."""

    rows: list[dict[str, Any]]
    fingerprint: str
    num_tokens: int
    truncated: int = 0
    dropped: int = 0
    pairs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def preference_set(records: list[Any], method: str, tokenizer: Any, template: str, max_len: int) -> PreferenceSet:
    """The records as `method`'s rows: DPO token ids (prompt_ids, chosen_ids, rejected_ids);
    KTO texts (prompt, completion, label); ORPO texts (prompt, chosen, rejected).
    Raises UserError naming the record for records that are not preference data."""
    from train.preference import read_judged, read_pair

    rows: list[dict[str, Any]] = []
    h = hashlib.sha256()
    tokens = dropped = pairs = 0
    for rec in records:
        h.update(json.dumps(rec.data, sort_keys=True, ensure_ascii=False).encode())
        if method == "kto":
            for j in read_judged(rec):
                p, a = prompt_and_answer(tokenizer, template, j.prompt, j.answer, None, j.where)
                rows.append({"prompt": p, "completion": a.rstrip(), "label": j.desirable})
                tokens += len(encode(tokenizer, p + a))
            continue
        pair = read_pair(rec)
        pairs += 1
        p, chosen = prompt_and_answer(tokenizer, template, pair.prompt, pair.chosen, pair.tools, pair.where)
        _, rejected = prompt_and_answer(tokenizer, template, pair.prompt, pair.rejected, pair.tools, pair.where)
        if method == "orpo":
            rows.append({"prompt": p, "chosen": chosen.rstrip(), "rejected": rejected.rstrip()})
            tokens += len(encode(tokenizer, p + chosen)) + len(encode(tokenizer, rejected))
            continue
        ids = {"prompt_ids": encode(tokenizer, p), "chosen_ids": encode(tokenizer, chosen),
               "rejected_ids": encode(tokenizer, rejected)}
        if len(ids["prompt_ids"]) >= max_len:
            dropped += 1  # no answer token would be left inside max_seq_length
            continue
        rows.append(ids)
        tokens += sum(map(len, ids.values()))
    if not rows:
        raise UserError(f"no preference pair fits max_seq_length={max_len}; raise training.max_seq_length")
    return PreferenceSet(rows, h.hexdigest()[:16], tokens, dropped=dropped, pairs=pairs or len(records))


class SFTAdapterResume:
    """Resume that restores the trained adapter when trl added a reference copy ("ref").

    A checkpoint of a PeftModel with several adapters keeps the trained one at its root and the
    others in subfolders; transformers then loads only the subfolders on resume
    (huggingface/transformers#30478), so the trained adapter would restart from its first
    weights. It is loaded here from the checkpoint's root."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        m = model if model is not None else self.model
        f = os.path.join(resume_from_checkpoint, "adapter_model.safetensors")
        if hasattr(m, "peft_config") and "ref" in m.peft_config and os.path.isfile(f):
            set_peft_model_state_dict(m, load_file(f), adapter_name="default")
            m.set_adapter("default")


class LorafleetDPOTrainer(SFTAdapterResume, DPOTrainer):
    """trl's DPOTrainer on rows lorafleet tokenized (prompt_ids, chosen_ids, rejected_ids)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # trl tokenizes text rows with the tokenizer's own template; these are tokenized by the
        # adapter's template already. What trl does after tokenizing: drop prompts that fill
        # max_length (no answer token would remain). preference_set has dropped them.
        return dataset


class LorafleetKTOTrainer(SFTAdapterResume, KTOTrainer):
    pass


def preference_trainer(cfg: TrainConfig, model: Any, tokenizer: Any, rows: list[dict], eval_rows: list[dict],
                       work: Path, device: str, use_4bit: bool, log: Any = print):
    """trl's trainer for `cfg.training.method` (dpo | kto | orpo) over rows of `preference_set`."""
    from datasets import Dataset

    t = cfg.training
    args = common_args(cfg, work, device, use_4bit, has_eval=bool(eval_rows)) | {"beta": t.beta}
    if t.method == "kto":
        # KTO reads batches in order (its KL term pairs each prompt with a neighbour's answer):
        # shuffled once, seeded, so a batch mixes prompts and desirable with undesirable answers.
        rows = list(rows)
        random.Random(t.seed).shuffle(rows)
    else:
        args["train_sampling_strategy"] = "random"
    train_ds = Dataset.from_list(rows)
    eval_ds = Dataset.from_list(eval_rows) if eval_rows else None
    kw = dict(model=model, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer)
    if t.method == "dpo":
        return LorafleetDPOTrainer(args=DPOConfig(**args), **kw)
    if t.method == "kto":
        if t.per_device_train_batch_size < 2:
            raise UserError("KTO estimates its KL term from the other answers of a batch: set "
                            "training.per_device_train_batch_size to 2 or more")
        return LorafleetKTOTrainer(args=KTOConfig(**args), **kw)
    import warnings

    log("ORPO is experimental in trl 1.16 (trl.experimental.orpo): its API may change between trl releases")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said above, once, in words
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOTrainer(args=ORPOConfig(**args, remove_unused_columns=False), **kw)
