"""Preference pairs under a model: how much more likely is the chosen answer than the rejected?

The margin of a pair is log p(chosen | prompt) - log p(rejected | prompt), summed over the
answer tokens as the template writes them (end of turn included), in nats: the quantity DPO
raises relative to its reference (Rafailov et al. 2023, eq. 7, without beta and the reference).
"""

from __future__ import annotations

from typing import Any

from lorafleet.templates import encode, prompt_and_answer


def answer_logp(model: Any, tokenizer: Any, template: str, prompt: list[dict[str, Any]], answer: str,
                tools: list[dict[str, Any]] | None = None) -> float:
    """Sum of log-probabilities (nats) of the answer's tokens after the rendered prompt."""
    import torch

    p, a = prompt_and_answer(tokenizer, template, prompt, answer, tools)
    prompt_ids, answer_ids = encode(tokenizer, p), encode(tokenizer, a)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + answer_ids], device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(answer_ids, device=device)[:, None])
    return float(logp.sum())


def margins(model: Any, tokenizer: Any, template: str, pairs: list[Any]) -> list[float]:
    """One margin (nats) per lorafleet.preference.Pair."""
    was_training = model.training
    model.eval()
    try:
        return [round(answer_logp(model, tokenizer, template, p.prompt, p.chosen, p.tools)
                      - answer_logp(model, tokenizer, template, p.prompt, p.rejected, p.tools), 4) for p in pairs]
    finally:
        model.train(was_training)
