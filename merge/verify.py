"""Parity check for every merge: base+adapter (peft, unmerged) vs the merged model, in float32.

The report also gives the adapter's own effect (base alone vs base+adapter): a merge is only
meaningful when its error is far below that effect.
"""

from __future__ import annotations

from typing import Any

import torch

PROBES = [
    [{"role": "user", "content": "What is the warranty period of the product?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Explain the notice period in one sentence."}],
    [{"role": "user", "content": "Hello! Who are you?"}],
]
# Default tolerances on the max absolute logits difference, per output dtype. The merged
# weights are rounded once to this dtype; bf16 keeps 8 bits of mantissa, fp16 11.
DEFAULT_TOLERANCE = {"float16": 0.5, "bfloat16": 2.0, "float32": 1e-3}


def probe_ids(tokenizer: Any, template: str | None) -> list[list[int]]:
    from lorafleet.templates import render_prompt_ids

    ids = []
    for msgs in PROBES:
        if template:
            ids.append(render_prompt_ids(tokenizer, template, msgs))
        else:
            ids.append(tokenizer(msgs[-1]["content"])["input_ids"])
    return ids


@torch.no_grad()
def _logits(model, ids: list[list[int]]) -> list[torch.Tensor]:
    return [model(torch.tensor([x])).logits[0].float() for x in ids]


@torch.no_grad()
def parity_report(base_ref: str, info: Any, merged_dir: str, template: str | None,
                  trust_remote_code: bool = False) -> dict[str, Any]:
    """Max/mean |Δlogits| between peft's unmerged model (`lorafleet.adapter.load_with_peft`) and
    the merged one, float32, on PROBES; plus the adapter's own effect (over the base's vocabulary)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafleet.adapter import load_with_peft

    tok = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=trust_remote_code)
    ids = probe_ids(tok, template)
    base = AutoModelForCausalLM.from_pretrained(base_ref, dtype=torch.float32, trust_remote_code=trust_remote_code)
    base_logits = _logits(base, ids)
    peft_model = load_with_peft(base_ref, info, torch.float32, base_model=base)
    ref = _logits(peft_model, ids)
    del peft_model, base
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    got = _logits(merged, ids)
    del merged
    diffs = [(r - g).abs() for r, g in zip(ref, got)]
    effect = max(float((r[..., : b.shape[-1]] - b).abs().max()) for r, b in zip(ref, base_logits))
    agree = [bool((r.argmax(-1) == g.argmax(-1)).all()) for r, g in zip(ref, got)]
    return {
        "probes": len(ids),
        "max_abs_logits_diff": max(float(d.max()) for d in diffs),
        "mean_abs_logits_diff": float(torch.cat([d.flatten() for d in diffs]).mean()),
        "adapter_effect_max_abs": effect,
        "greedy_tokens_agree": all(agree),
        "greedy_agreement_per_probe": agree,
    }
