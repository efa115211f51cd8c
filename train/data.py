"""Training data as the trainer takes it: records (lorafleet/records.py) tokenized with a template,
checked to render what they hold, and split for evaluation."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Iterable

from lorafleet.errors import UserError
from lorafleet.records import Record, detect_format, record_tools, to_messages
from lorafleet.templates import encode, split_prompt_completion


def check_template_renders(tokenizer: Any, template: str, msgs: list[dict[str, Any]],
                           tools: list[dict[str, Any]] | None, where: str) -> None:
    """Refuse a record whose tools, tool calls or tool results the template drops: they would be
    trained on as if absent."""
    from lorafleet.templates import render

    plain = [{k: v for k, v in m.items() if k != "weight"} for m in msgs]
    text = render(tokenizer, template, plain, add_generation_prompt=False, tools=tools)
    if tools and text == render(tokenizer, template, plain, add_generation_prompt=False):
        raise UserError(f"{where}: the record has 'tools' but the chat template does not render them; use a "
                        "template that supports tools (a model's own tool-calling template) or drop 'tools'")
    for j, m in enumerate(msgs):
        for c in m.get("tool_calls", []):
            if c["function"]["name"] not in text:
                raise UserError(f"{where}: messages[{j}] has tool_calls but the chat template does not render "
                                "them; use a template that supports tool calls")
        if m["role"] == "tool" and m["content"] not in text:
            raise UserError(f"{where}: messages[{j}] is a tool result the chat template does not render; use a "
                            "template that supports tool messages")


@dataclass
class TokenizedSet:
    rows: list[dict[str, list[int]]]
    truncated: int
    dropped: int
    fingerprint: str

    @property
    def num_tokens(self) -> int:
        return sum(len(r["input_ids"]) for r in self.rows)


def tokenize_records(records: Iterable[Record], fmt: str, tokenizer: Any, template: str, max_seq_length: int,
                     source: str = "data") -> TokenizedSet:
    """Tokenize with the shared template renderer; count (and report) truncations."""
    records = list(records)
    if fmt == "auto":
        fmt = detect_format(records[0].data)
    rows, truncated, dropped = [], 0, 0
    h = hashlib.sha256()
    eos = tokenizer.eos_token_id
    for rec in records:
        conv = to_messages(rec, fmt)
        tools = rec.data.get("tools") if fmt == "messages" else None
        h.update(json.dumps(conv if tools is None else [conv, tools], sort_keys=True, ensure_ascii=False).encode())
        if isinstance(conv, str):
            ids = encode(tokenizer, conv) + ([eos] if eos is not None else [])
            mask = [1] * len(ids)
        else:
            tools = record_tools(rec)
            try:
                if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in conv):
                    check_template_renders(tokenizer, template, conv, tools, rec.where)
                ids, mask, _ = split_prompt_completion(tokenizer, template, conv, tools=tools)
            except UserError as e:
                raise UserError(str(e) if str(e).startswith(rec.where) else f"{rec.where}: {e}") from None
        if len(ids) > max_seq_length:
            truncated += 1
            ids, mask = ids[:max_seq_length], mask[:max_seq_length]
        if not any(mask):
            dropped += 1  # the answer was cut off entirely: nothing left to learn from this one
            continue
        rows.append({"input_ids": ids, "completion_mask": mask})
    if not rows:
        raise UserError(
            f"{source}: all {len(records)} examples lose their whole answer at max_seq_length={max_seq_length} "
            f"({truncated} truncated); raise training.max_seq_length")
    return TokenizedSet(rows, truncated, dropped, h.hexdigest()[:16])


def split_eval(rows: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(len(rows) * fraction)))
    ev = set(idx[:n_eval])
    return [r for i, r in enumerate(rows) if i not in ev], [r for i, r in enumerate(rows) if i in ev]
