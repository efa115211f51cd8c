"""Merging a QLoRA adapter: into the base it was trained on, and how far the result is from it.

A QLoRA adapter (Dettmers et al. 2023) learned its update B·A against the 4-bit base as the
forward pass dequantizes it, dequant(NF4(W)), not against W. Merged into W, the model differs
from the one trained by the quantization error W - dequant(NF4(W)) of every quantized layer
(peft #2321, unsloth-zoo #810). So for an adapter whose manifest says `used_4bit`:

- `dequantized_base` writes dequant(NF4(W)) for every layer bitsandbytes quantized (found by
  loading the base with the recorded BitsAndBytesConfig, as training did; dequantized by peft's
  `dequantize_module_weight`) and W for the rest: the streaming merge then folds the adapter
  into the weights it was trained on.
- `as_trained_report` measures a merged model against the model as trained (the 4-bit base +
  the adapter, through peft, in the recorded compute dtype): max |Δlogits|, how often the greedy
  next token agrees, and the log-likelihood of the trained model's own answers under both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorafleet.config import QuantizationConfig

ANSWER_TOKENS = 24  # greedy tokens of the trained model per probe, scored under both models


def trained_quantization(info: Any) -> QuantizationConfig | None:
    """The 4-bit settings an adapter was trained with (its manifest), or None if it was not QLoRA."""
    q = ((info.manifest or {}).get("hyperparameters") or {}).get("quantization") or {}
    if not q.get("used_4bit"):
        return None
    return QuantizationConfig.model_validate({k: v for k, v in q.items() if k in QuantizationConfig.model_fields})


def load_4bit(base_dir: Path, q: QuantizationConfig) -> Any:
    """The base as training loaded it: bitsandbytes 4-bit layers, compute in the recorded dtype."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q.bnb_config(),
                                                dtype=getattr(torch, q.bnb_4bit_compute_dtype))


@torch.no_grad()
def dequantized_base(base_dir: Path, q: QuantizationConfig, out: Path) -> int:
    """Write to `out` (a model directory, float32 safetensors) the base with dequant(NF4(W)) in
    place of W for every layer bitsandbytes quantizes; returns how many layers that was."""
    from peft.utils.integrations import dequantize_module_weight
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    quantized = {f"{name}.weight": dequantize_module_weight(mod).float().cpu()
                 for name, mod in load_4bit(base_dir, q).named_modules() if type(mod).__name__ == "Linear4bit"}
    full = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    state = {k: quantized.get(k, v).contiguous() for k, v in full.state_dict().items()}
    if getattr(full.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # saved once, as transformers does
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    full.config.save_pretrained(out)
    return len(quantized)


@torch.no_grad()
def as_trained_report(base_dir: Path, info: Any, q: QuantizationConfig, merged_dir: Path,
                      prompts: list[list[int]]) -> dict[str, Any]:
    """The merged model (float32) against the model as trained (4-bit base + adapter), on
    `prompts` (token ids) each followed by the trained model's greedy answer of ANSWER_TOKENS.

    Returns max_abs_logits_diff (over every position), greedy_agreement (share of positions whose
    next-token argmax is the same), answer_loglik_trained / answer_loglik_merged (mean per-token
    log-probability of those answers) and positions (how many were compared).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained = PeftModel.from_pretrained(load_4bit(base_dir, q), str(info.path)).eval()
    sequences = []
    for ids in prompts:
        out = trained.generate(input_ids=torch.tensor([ids]), max_new_tokens=ANSWER_TOKENS, do_sample=False)
        sequences.append((ids, out[0].tolist()))
    ref = [trained(input_ids=torch.tensor([seq])).logits[0].float() for _, seq in sequences]
    del trained
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    got = [merged(input_ids=torch.tensor([seq])).logits[0].float() for _, seq in sequences]
    del merged
    agree = positions = 0
    worst = 0.0
    ll_ref, ll_got, answer_tokens = 0.0, 0.0, 0
    for (ids, seq), r, g in zip(sequences, ref, got):
        vocab = min(r.shape[-1], g.shape[-1])
        r, g = r[:, :vocab], g[:, :vocab]
        worst = max(worst, float((r - g).abs().max()))
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        positions += r.shape[0]
        answer = torch.tensor(seq[len(ids):])
        rows = slice(len(ids) - 1, len(seq) - 1)  # the logits that predict each answer token
        ll_ref += float(torch.log_softmax(r[rows], -1).gather(1, answer[:, None]).sum())
        ll_got += float(torch.log_softmax(g[rows], -1).gather(1, answer[:, None]).sum())
        answer_tokens += len(answer)
    return {"reference": "the model as trained: the 4-bit base (bitsandbytes, as recorded) + the adapter (peft)",
            "max_abs_logits_diff": worst, "greedy_agreement": agree / positions, "positions": positions,
            "answer_loglik_trained": ll_ref / max(answer_tokens, 1),
            "answer_loglik_merged": ll_got / max(answer_tokens, 1)}
