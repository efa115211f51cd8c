"""Preference tuning with trl's trainers: DPO, KTO, ORPO, on the same LoRA/QLoRA model as SFT.

- DPO (Rafailov et al. 2023) and KTO (Ethayarajh et al. 2024) need a reference model: trl
  1.16 keeps a frozen copy of the adapter it is given as the adapter "ref" (dpo_trainer.py, the
  PeftModel branch). For a fresh LoRA that copy is the untrained adapter, i.e. the base; started
  from an SFT adapter (`adapter_name_or_path`) it is the SFT model, as the DPO paper prescribes.
  Only "default" is written, and a resume restores it (SFTAdapterResume).
- ORPO (Hong et al. 2024) needs none. In trl 1.16 it lives in `trl.experimental`.

DPO's and KTO's rows are tokenized here, by lorafleet's template (lorafleet.templates), the same
way for both: the answer tokens they score are the ones the served adapter is asked to produce,
end-of-turn token included, after the prompt exactly as serving renders it. (trl's own KTO
tokenization would add the tokenizer's BOS to a template that writes one itself, as Llama 3's
does, and an EOS after the end-of-turn token.) ORPO, in trl.experimental, tokenizes the rendered
text itself, adding BOS and EOS where they are missing: its rows are checked against lorafleet's
tokens, and a template where they differ is refused, naming it.
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
    from lorafleet.preference import read_judged, read_pair

    rows: list[dict[str, Any]] = []
    h = hashlib.sha256()
    tokens = dropped = pairs = 0
    for rec in records:
        h.update(json.dumps(rec.data, sort_keys=True, ensure_ascii=False).encode())
        if method == "kto":
            for j in read_judged(rec):
                p, a = prompt_and_answer(tokenizer, template, j.prompt, j.answer, None, j.where)
                row = {"prompt_ids": encode(tokenizer, p), "completion_ids": encode(tokenizer, a), "label": j.desirable}
                if len(row["prompt_ids"]) >= max_len:
                    dropped += 1
                    continue
                rows.append(row)
                tokens += len(row["prompt_ids"]) + len(row["completion_ids"])
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
    """trl's KTOTrainer on rows lorafleet tokenized (prompt_ids, completion_ids, label)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # What trl 1.16's KTOTrainer._prepare_dataset does after tokenizing: the KL term's
        # mismatched pairs, each completion rotated by one within a batch of
        # per_device_train_batch_size. (Prompts that fill max_length: dropped by preference_set.)
        if self.calculate_KL:
            def add_kl_completion_ids(examples):
                examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
                return examples

            dataset = dataset.map(add_kl_completion_ids, batched=True, batch_size=args.per_device_train_batch_size)
        return dataset


def check_orpo_tokens(trainer: Any, rows: list[dict], tokenizer: Any, template: str) -> None:
    """Refuse (UserError) when trl's ORPO tokenization of `rows` is not lorafleet's: the prompt as
    serving renders it, then the answer with its end-of-turn token and nothing more."""
    for row, got in zip(rows, trainer.train_dataset):
        want = encode(tokenizer, row["prompt"]) + encode(tokenizer, row["chosen"])
        if list(got["chosen_input_ids"]) != want:
            extra = [tokenizer.convert_ids_to_tokens(t) for t in got["chosen_input_ids"] if t not in want][:3]
            raise UserError(f"ORPO (trl.experimental) tokenizes template {template!r} with tokens serving does not "
                            f"use ({', '.join(map(repr, extra)) or 'a different split'}: it adds the tokenizer's "
                            "BOS/EOS where the template does not write them); use training.method dpo or kto, "
                            "which lorafleet tokenizes as it serves")


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
    trainer = ORPOTrainer(args=ORPOConfig(**args, remove_unused_columns=False), **kw)
    check_orpo_tokens(trainer, rows, tokenizer, cfg.template)
    return trainer
