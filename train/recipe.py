"""The training recipe, top to bottom: config → data → model (QLoRA or LoRA) → SFT → adapter dir.

It is the seed tutorial's recipe (BitsAndBytesConfig → LoraConfig → SFTTrainer → save) with
what a production run needs around it: validated config, completion-only loss, length-grouped
dynamic padding instead of padding to max length, checkpoints and resume, an atomic final
write, and a manifest that tells merge and serve what the adapter was trained on.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from lorafleet.adapter import write_manifest
from lorafleet.atomic import atomic_dir, leftovers
from lorafleet.config import TrainConfig
from lorafleet.errors import UserError

LOG = Callable[[str], None]


# ------------------------------------------------------------------------------ device & model
def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def decide_quantization(cfg: TrainConfig, device: str, log: LOG) -> bool:
    """QLoRA on CUDA by default; plain LoRA on CPU unless asked for explicitly (said either way)."""
    asked = cfg.quantization.load_in_4bit
    if device == "cuda":
        use = True if asked is None else asked
        log(f"device: CUDA; {'QLoRA (4-bit ' + cfg.quantization.bnb_4bit_quant_type + ' base)' if use else 'LoRA'}")
        return use
    if asked:
        log("device: CPU; QLoRA as asked (bitsandbytes NF4 on CPU: several times slower than LoRA, less memory)")
        return True
    log("device: CPU, no CUDA GPU: training plain LoRA on a float32 base (QLoRA needs "
        "quantization.load_in_4bit: true on CPU)")
    return False


def load_base(model_ref: str, cfg: TrainConfig, device: str, use_4bit: bool):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if use_4bit:
        q = cfg.quantization
        kwargs["quantization_config"] = q.bnb_config()
        kwargs["dtype"] = getattr(torch, q.bnb_4bit_compute_dtype)
        if device == "cuda":
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    else:
        # fp32 on CPU: this CPU class has no fast bf16 matmul. bf16 on GPUs that have it.
        if device == "cuda":
            kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            kwargs["dtype"] = torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(model_ref, **kwargs)
    except OSError as e:
        raise UserError(f"could not load base model {model_ref!r}: {e}") from None
    return model


def linear_module_names(model) -> list[str]:
    import torch

    names = set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
            leaf = name.rsplit(".", 1)[-1]
            if leaf != "lm_head":
                names.add(leaf)
    return sorted(names)


def lora_config(cfg: TrainConfig, model):
    from peft import LoraConfig, TaskType

    lc = cfg.lora
    available = linear_module_names(model)
    if lc.target_modules != "all-linear":
        missing = [m for m in lc.target_modules if m not in available]
        if missing:
            raise UserError(f"lora.target_modules {missing} are not modules of this model; "
                            f"its linear modules are {available} (or use `all-linear`)")
    return LoraConfig(
        r=lc.r, lora_alpha=lc.lora_alpha, target_modules=lc.target_modules, lora_dropout=lc.lora_dropout,
        bias=lc.bias, use_rslora=lc.use_rslora, use_dora=lc.use_dora, task_type=TaskType.CAUSAL_LM,
    )


def continue_adapter(model, path: str, model_ref: str, template: str, log: LOG):
    """The PEFT adapter at `path` on `model`, trainable, as the adapter "default" (what trl's
    preference trainers copy as their reference). Raises UserError when it is not an adapter
    of this base."""
    from peft import PeftModel

    from lorafleet.adapter import check_against_base, read_adapter
    from lorafleet.models import base_fingerprint, module_shapes

    info = read_adapter(path)
    check_against_base(info, module_shapes(model_ref), base_fingerprint(model_ref)["fingerprint"])
    if info.template is not None and info.template != template:
        raise UserError(f"adapter {path} was trained with another prompt template than this run's `template`; set "
                        f"template to the one it was trained with (its lorafleet.json records it)")
    log(f"continuing from adapter {path} (r={info.lora.r}; its LoRA settings replace the config's `lora`)")
    return PeftModel.from_pretrained(model, path, is_trainable=True)


def tokenized(cfg: TrainConfig, source: str, tokenizer, template: str):
    """A data file as the rows of this run's method: SFT token ids and loss masks, or preference rows."""
    from lorafleet.records import read_records
    from train.data import tokenize_records

    t = cfg.training
    if t.method == "sft":
        return tokenize_records(read_records(source), cfg.data.format, tokenizer, template, t.max_seq_length,
                                source=source)
    from train.preference_trainers import preference_set

    return preference_set(read_records(source), t.method, tokenizer, template, t.max_seq_length)


# -------------------------------------------------------------------------------------- the run
def latest_complete_checkpoint(work: Path, log: LOG, remove_partial: bool = True) -> str | None:
    """The newest checkpoint the Trainer finished writing; a kill mid-save leaves a partial one.

    The Trainer writes a checkpoint in place and `trainer_state.json` last, so a checkpoint
    without it was cut short: it is removed (the step is trained again) rather than loaded
    (by one process of a multi-process run: `remove_partial` on rank 0 only).
    """
    ckpts = sorted(work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    while ckpts and not (ckpts[-1] / "trainer_state.json").is_file():
        if remove_partial:
            log(f"{ckpts[-1].name} was not finished (the run stopped while saving it): removing it")
            shutil.rmtree(ckpts[-1])
        ckpts.pop()
    return str(ckpts[-1]) if ckpts else None


def planned_steps(trainer) -> int:
    """The optimizer steps this run's config asks for (max_steps, or epochs over this data)."""
    return trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]


def finish_from_final_checkpoint(trainer, model, ckpt: Path, state) -> None:
    """Take the weights and history (`state`, its TrainerState) of the run's last checkpoint, without training."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
    trainer.state = state


def run(cfg: TrainConfig, resume: bool = False, log: LOG = print, callbacks: list | None = None) -> Path:
    """Train one adapter; returns its directory. Under `torchrun` / `accelerate launch` every
    process runs this (data parallel, one global batch = per-device batch x processes x
    accumulation); rank 0 alone logs, removes leftovers and writes the adapter. `callbacks`:
    transformers TrainerCallbacks added to the trainer (bench/quality.py measures with one)."""
    import torch
    from accelerate import PartialState
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer, TrainerState, set_seed

    from lorafleet.models import base_fingerprint, resolve_model
    from lorafleet.templates import resolve_template
    from train.data import split_eval
    from train.sft import build_trainer

    # the process group under torchrun / accelerate launch (gloo on CPU); alone: rank 0 of 1
    device = pick_device()
    state = PartialState(cpu=device == "cpu")
    main = state.is_main_process
    if not main:
        log = lambda m: None  # noqa: E731 - one voice per run
    out = Path(cfg.output_dir)
    work = out.with_name(out.name + ".checkpoints")
    if out.exists() and not resume:
        raise UserError(f"output_dir {out} already exists; choose another, delete it, or pass --resume to continue")
    for stale in leftovers(out) if resume and main else []:
        log(f"removing {stale.name}: left by a run stopped while writing {out.name}")
        shutil.rmtree(stale, ignore_errors=True)
    if out.exists():
        # The adapter is renamed into place only when complete: the run finished (a stop after
        # that left at most its checkpoints behind). Training again would replace it.
        log(f"{out} is already complete: nothing to resume")
        if main:
            shutil.rmtree(work, ignore_errors=True)
        return out
    t_start = time.time()
    set_seed(cfg.training.seed)

    # --- data first: a bad file should fail before minutes of model loading
    model_ref = resolve_model(cfg.base_model)
    tokenizer = AutoTokenizer.from_pretrained(model_ref, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # the seed's choice; pads are masked from the loss
    template_name, template = resolve_template(cfg.template, tokenizer)
    t = cfg.training
    train_set = tokenized(cfg, cfg.data.train_file, tokenizer, template)
    rows, eval_rows = train_set.rows, []
    if cfg.data.eval_file:
        eval_rows = tokenized(cfg, cfg.data.eval_file, tokenizer, template).rows
    elif cfg.data.eval_fraction > 0:
        rows, eval_rows = split_eval(rows, cfg.data.eval_fraction, t.seed)
    if t.method == "sft" and not t.completion_only_loss:
        rows = [{"input_ids": r["input_ids"], "completion_mask": [1] * len(r["input_ids"])} for r in rows]
    msg = (f"data: {len(rows)} train / {len(eval_rows)} eval {'examples' if t.method == 'sft' else t.method + ' rows'}, "
           f"{train_set.num_tokens} tokens, template {template_name}")
    if train_set.truncated or train_set.dropped:
        msg += (f"; {train_set.truncated} truncated to max_seq_length={t.max_seq_length}, "
                f"{train_set.dropped} dropped (answer cut off)")
    log(msg)

    # --- model
    use_4bit = decide_quantization(cfg, device, log)
    model = load_base(model_ref, cfg, device, use_4bit)
    if use_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
    if cfg.adapter_name_or_path:
        model = continue_adapter(model, cfg.adapter_name_or_path, model_ref, template, log)
    else:
        model = get_peft_model(model, lora_config(cfg, model))
    trainable, total = model.get_nb_trainable_parameters()
    r, alpha = model.peft_config["default"].r, model.peft_config["default"].lora_alpha
    log(f"model: {cfg.base_model} · LoRA r={r} alpha={alpha} · "
        f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    work.mkdir(parents=True, exist_ok=True)
    if t.method == "sft":
        trainer = build_trainer(cfg, model, tokenizer, rows, eval_rows, work, device, use_4bit)
    else:
        from train.preference_trainers import preference_trainer

        trainer = preference_trainer(cfg, model, tokenizer, rows, eval_rows, work, device, use_4bit, log)
    for cb in callbacks or []:
        trainer.add_callback(cb)
    if state.num_processes > 1:
        log(f"data parallel over {state.num_processes} processes ({state.distributed_type.value}, backend "
            f"{state.backend}): global batch {t.per_device_train_batch_size * state.num_processes * t.gradient_accumulation_steps}")
    if resume and main:
        latest_complete_checkpoint(work, log)  # rank 0 removes a checkpoint cut short, the others wait
    state.wait_for_everyone()
    last_ckpt = latest_complete_checkpoint(work, log, remove_partial=False) if resume else None
    ckpt_state = TrainerState.load_from_json(str(Path(last_ckpt) / "trainer_state.json")) if last_ckpt else None
    start_step = ckpt_state.global_step if ckpt_state else 0
    if resume:
        log(f"resuming from {last_ckpt}" if last_ckpt else "--resume: no checkpoint yet, starting from the beginning")
    if last_ckpt and start_step >= planned_steps(trainer):
        # The stop came after the last step's checkpoint: the weights are final. The Trainer,
        # resumed from it, would train one step more than the run asked for.
        log(f"{Path(last_ckpt).name} holds the run's last step: writing the adapter from it")
        finish_from_final_checkpoint(trainer, model, Path(last_ckpt), ckpt_state)
        metrics = {"train_runtime": 0.0}
    else:
        metrics = dict(trainer.train(resume_from_checkpoint=last_ckpt).metrics)
    train_seconds = time.time() - t_start
    eval_loss = None
    if eval_rows:
        eval_loss = trainer.evaluate()["eval_loss"]
    history = [h for h in trainer.state.log_history]
    final_train_loss = next((h["loss"] for h in reversed(history) if "loss" in h), metrics.get("train_loss"))

    # --- write the adapter directory in one piece
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = getattr(trainer, "seen_tokens", None)
    if tokens is None:  # trl's preference trainers log the tokens they trained on
        tokens = int(next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), 0))
    if state.num_processes > 1:
        from accelerate.utils import reduce

        tokens = int(reduce(torch.tensor(tokens), reduction="sum"))  # every process's tokens
    runtime = max(metrics.get("train_runtime", 1e-9), 1e-9)
    summary = {
        "steps": trainer.state.global_step,
        "train_runtime_s": round(metrics.get("train_runtime", train_seconds), 2),
        # rates of this process's training (a resumed run trained only the steps after its checkpoint)
        "steps_per_s": round((trainer.state.global_step - start_step) / runtime, 4),
        "tokens_per_s": round(tokens / runtime, 1),
        "tokens_seen": tokens,
        "peak_rss_mb": round(peak_rss_mb, 1),
        "peak_vram_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
    }
    if t.method != "sft":  # how far the chosen answers moved ahead of the rejected ones, last logged
        summary["preference"] = {k: next((h[k] for h in reversed(history) if k in h), None)
                                 for k in ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")}
    from train.report import manifest, model_card, plot_losses

    if not main:
        state.wait_for_everyone()  # rank 0 checks and writes the adapter
        return out
    if t.generation_check:
        from train.check import check_line, generation_check

        try:
            check = generation_check(cfg, model, tokenizer, template, final_train_loss, trainer.state.global_step,
                                     t.generation_check, len(train_set.rows))
        except Exception as e:  # out of memory, a template that cannot render a record: keep the trained adapter
            log(f"check: skipped, the adapter could not answer its check questions ({type(e).__name__}: {e})")
            check = None
        if check:
            summary["generation_check"] = check
            log(check_line(check))
    with atomic_dir(out, overwrite=resume) as tmp:
        # Weights and config only: an adapter adds no tokens, so the base's tokenizer applies.
        # the trained adapter only: not the frozen reference copy trl adds for DPO/KTO ("ref")
        model.save_pretrained(tmp, safe_serialization=True, selected_adapters=["default"])
        man = manifest(cfg, base_fingerprint(model_ref), template_name, template, train_set, len(rows),
                       len(eval_rows), trainable, total, final_train_loss, eval_loss, summary, use_4bit, device)
        if cfg.adapter_name_or_path:  # its LoRA settings, not the config's (continue_adapter)
            lc = model.peft_config["default"]
            man["hyperparameters"]["lora"] |= {"r": lc.r, "lora_alpha": lc.lora_alpha, "lora_dropout": lc.lora_dropout,
                                               "target_modules": sorted(lc.target_modules)
                                               if isinstance(lc.target_modules, set) else lc.target_modules,
                                               "continued_from": cfg.adapter_name_or_path}
        write_manifest(tmp, man)
        with (tmp / "metrics.jsonl").open("w") as f:
            for h in history:
                f.write(json.dumps(h) + "\n")
        plot_losses(history, tmp / "loss.png")
        (tmp / "README.md").write_text(model_card(man))
    shutil.rmtree(work, ignore_errors=True)
    state.wait_for_everyone()
    log(f"done: adapter at {out} · {summary['steps']} steps in {summary['train_runtime_s']:.1f}s · "
        f"{summary['steps_per_s']:.3f} steps/s · {summary['tokens_per_s']:.0f} tokens/s · "
        f"peak RSS {summary['peak_rss_mb']:.0f} MB · train loss {final_train_loss:.4f}"
        + (f" · eval loss {eval_loss:.4f}" if eval_loss is not None else ""))
    return out
