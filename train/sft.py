"""trl's SFTTrainer, configured from a TrainConfig, with one change: a lean loss.

Where the time went (measured on 2 CPU threads, SmolLM2-135M, bench/train.py): SFTTrainer's
default `compute_loss` runs a fused LM head that also computes the entropy and top-1 accuracy
over the whole vocabulary for every token, every step, only for logging. `LeanSFTTrainer`
computes just the masked cross-entropy (the model's own loss), and counts the real (non-pad)
tokens it trains on, for an honest tokens/s.

And one fix: a run resumed in its second or later epoch must see the same batches an
uninterrupted run sees (`EpochSeededLengthGroupedSampler`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from trl import SFTConfig, SFTTrainer

from lorafleet.config import TrainConfig


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order drawn from (data seed, epoch) instead of the global torch RNG.

    transformers builds its length-grouped train sampler without a generator, so every epoch's
    order comes from the global RNG as it happens to be when the epoch starts. A run resumed
    inside epoch 2 starts from a freshly seeded RNG and replays epoch 1's order (the checkpoint's
    RNG state is restored only after the epoch's order is drawn): its adapter differs from an
    uninterrupted run's. Seeded by epoch (the Trainer calls `set_epoch` on the sampler, also on
    the batch-skipping loader it resumes with), the order depends on the epoch alone.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class LeanSFTTrainer(SFTTrainer):
    seen_tokens: int = 0

    lean: bool = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training and "attention_mask" in inputs:
            self.seen_tokens += int(inputs["attention_mask"].sum())
        if not self.lean:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs["use_cache"] = False
        # Trainer.compute_loss: the model's own shifted cross-entropy over labels != -100,
        # normalised by the token count across gradient-accumulation steps.
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:  # the random strategy is already seeded per epoch (accelerate)
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
        return sampler


def common_args(cfg: TrainConfig, work: Path, device: str, use_4bit: bool, has_eval: bool) -> dict[str, Any]:
    """The TrainingArguments every method shares (trl's SFTConfig, DPOConfig, KTOConfig, ORPOConfig)."""
    t = cfg.training
    optim = t.optim or ("paged_adamw_8bit" if (use_4bit and device == "cuda") else "adamw_torch")
    eval_steps = t.eval_steps if has_eval else None
    return dict(
        output_dir=str(work),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        optim=optim,
        seed=t.seed,
        data_seed=t.seed,
        fp16=t.fp16,
        bf16=t.bf16,  # explicit: trl's configs default bf16 on, which a CPU without bf16 refuses
        gradient_checkpointing=t.gradient_checkpointing,
        max_length=t.max_seq_length,
        dataloader_num_workers=t.dataloader_num_workers,
        use_cpu=device == "cpu",
        report_to="none",
        logging_first_step=True,
    )


def sft_config(cfg: TrainConfig, work: Path, device: str, use_4bit: bool, has_eval: bool) -> SFTConfig:
    t = cfg.training
    return SFTConfig(
        **common_args(cfg, work, device, use_4bit, has_eval),
        packing=t.packing,
        completion_only_loss=t.completion_only_loss,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        dataset_num_proc=None,
        remove_unused_columns=True,
    )


def build_trainer(cfg: TrainConfig, model: Any, tokenizer: Any, rows: list[dict], eval_rows: list[dict],
                  work: Path, device: str, use_4bit: bool) -> LeanSFTTrainer:
    from datasets import Dataset

    train_ds = Dataset.from_list(rows)
    eval_ds = Dataset.from_list(eval_rows) if eval_rows else None
    args = sft_config(cfg, work, device, use_4bit, has_eval=eval_ds is not None)
    trainer = LeanSFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tokenizer)
    trainer.lean = cfg.training.lean_loss
    return trainer
