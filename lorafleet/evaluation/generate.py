"""Greedy answers to EvalItems: from a model in this process, or from a served endpoint.

Both render prompts the way serving does (the adapter's recorded template through
lorafleet.templates, tokenized without extra special tokens) and stop at the template's end of
turn, so an answer here is the answer a client of `lorafleet serve` gets at temperature 0.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from lorafleet.errors import UserError
from lorafleet.evaluation.items import EvalItem


def generate_answers(model: Any, tokenizer: Any, template: str, items: list[EvalItem], max_new_tokens: int = 64,
                     batch_size: int = 8) -> list[str]:
    """Greedy answers of `model` (a transformers causal LM, peft-wrapped or not) to `items`.

    Prompts are left-padded into batches of `batch_size`; generation stops at EOS or the
    template's end-of-turn token. Returns one string per item, special tokens removed."""
    import torch

    from lorafleet.templates import end_of_turn_ids, render_prompt_ids

    stops = sorted({tokenizer.eos_token_id, *end_of_turn_ids(tokenizer, template)} - {None})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            ids = [render_prompt_ids(tokenizer, template, it.messages, it.tools) for it in batch]
            width = max(map(len, ids))
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
            with torch.inference_mode():
                out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=stops, pad_token_id=pad)
            for row in out[:, width:]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers


class LocalModel:
    """A model loaded in this process: a PEFT adapter on its base, or a whole (merged) model.

    `answers(items, adapter=True)` answers with the adapter; `adapter=False` with the base
    alone (peft's `disable_adapter`, the same weights without the LoRA deltas). Raises
    UserError when the model or adapter cannot be loaded."""

    def __init__(self, ref: str, base: str | None = None, template: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lorafleet.adapter import read_adapter
        from lorafleet.models import resolve_model
        from lorafleet.templates import resolve_template

        p = Path(ref)
        self.info = read_adapter(p) if (p / "adapter_config.json").is_file() else None
        if self.info is not None:
            from lorafleet.adapter import load_with_peft
            from lorafleet.models import adapter_base, local_model_dir

            self.base_ref = adapter_base(self.info, base)
            base_dir = local_model_dir(self.base_ref)
            tok_dir = self.info.path if self.info.has_tokenizer() else base_dir
            self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            self.model = load_with_peft(base_dir, self.info, torch.float32)
            recorded = self.info.template
        else:
            self.base_ref = ref
            try:
                model_ref = resolve_model(ref)
                self.tokenizer = AutoTokenizer.from_pretrained(model_ref)
                self.model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=torch.float32)
            except OSError as e:
                raise UserError(f"could not load model {ref!r}: {e}") from None
            recorded = None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.template = template or recorded or resolve_template("chat", self.tokenizer)[1]

    def answers(self, items: list[EvalItem], adapter: bool = True, max_new_tokens: int = 64) -> list[str]:
        if adapter or self.info is None:
            return generate_answers(self.model, self.tokenizer, self.template, items, max_new_tokens)
        with self.model.disable_adapter():
            return generate_answers(self.model, self.tokenizer, self.template, items, max_new_tokens)


class Endpoint:
    """A served OpenAI-compatible endpoint (`lorafleet serve`, vLLM, any other), asked through
    the official `openai` client at temperature 0, `concurrency` requests at a time."""

    def __init__(self, url: str, api_key: str | None = None, concurrency: int = 8):
        import os

        from openai import OpenAI

        base_url = url.rstrip("/")
        if not base_url.endswith("/v1"):
            base_url += "/v1"
        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("LORAFLEET_API_KEY", "none"),
                             max_retries=2, timeout=300)
        self.concurrency = concurrency

    def models(self) -> list[Any]:
        import openai

        try:
            return list(self.client.models.list().data)
        except openai.APIError as e:
            raise UserError(f"{self.client.base_url}: could not list models ({e}); is the server up, and the key "
                            "right (--api-key or LORAFLEET_API_KEY)?") from None

    def base_name(self) -> str:
        """The served base model: the one model without a `parent`."""
        bases = [m.id for m in self.models() if not getattr(m, "parent", None)]
        if not bases:
            raise UserError(f"{self.client.base_url} lists no base model (every model has a parent)")
        return bases[0]

    def chat(self, model: str, messages: list[dict[str, Any]], max_tokens: int, tools: list | None = None,
             where: str = "") -> str:
        """One chat completion at temperature 0: its text. UserError for an error status or no connection."""
        import openai

        kw: dict[str, Any] = {"tools": tools} if tools else {}
        try:
            r = self.client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                    temperature=0, **kw)
        except openai.APIStatusError as e:
            raise UserError(f"{self.client.base_url}: model {model!r} answered {e.status_code}"
                            f"{' for ' + where if where else ''}: {e.message}") from None
        except openai.APIConnectionError as e:
            raise UserError(f"{self.client.base_url}: no connection ({e})") from None
        return (r.choices[0].message.content or "").strip()

    def map(self, fn: Callable[[Any], Any], args: list[Any]) -> list[Any]:
        """fn over args, `concurrency` at a time, in order; the first error stops the rest."""
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            return list(pool.map(fn, args))
        finally:
            pool.shutdown(cancel_futures=True)

    def answers(self, model: str, items: list[EvalItem], max_new_tokens: int = 64) -> list[str]:
        return self.map(lambda it: self.chat(model, it.messages, max_new_tokens, it.tools, it.where), items)

