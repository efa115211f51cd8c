"""Preference data: pairs of a prompt, a chosen answer and a rejected one.

Formats (a record each):
- trl's standard   {"prompt", "chosen", "rejected"}: strings, or lists of messages (the prompt's
                   turns; the answers' single assistant turn)
- trl's implicit   {"chosen", "rejected"}: two whole conversations sharing their prompt turns
- OpenAI's preference fine-tuning JSONL
                   {"input": {"messages", "tools"?}, "preferred_output": [assistant message],
                    "non_preferred_output": [assistant message]}
- trl's unpaired   {"prompt", "completion", "label"}: one answer judged good (true) or bad
                   (false), what KTO learns from; paired records are unpaired for it

Every pair is rendered by the template that trains and serves the adapter (lorafleet.templates),
so the answer tokens DPO scores are the tokens the served adapter is asked to produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorafleet.errors import UserError


@dataclass
class Judged:
    """One answer to a prompt, and whether it is the preferred kind (KTO's unpaired example)."""

    where: str
    prompt: list[dict[str, Any]]
    answer: str
    desirable: bool


@dataclass
class Pair:
    where: str
    prompt: list[dict[str, Any]]  # messages before the answer
    chosen: str
    rejected: str
    tools: list[dict[str, Any]] | None = None

    def unpaired(self) -> list[Judged]:
        """The pair as two unpaired examples (trl's `unpair_preference_dataset`)."""
        return [Judged(self.where, self.prompt, self.chosen, True), Judged(self.where, self.prompt, self.rejected, False)]


def is_preference(d: dict[str, Any]) -> bool:
    return ("chosen" in d and "rejected" in d) or "preferred_output" in d or ("completion" in d and "label" in d)


def _prompt(value: Any, where: str, key: str = "prompt") -> list[dict[str, Any]]:
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: {key!r} is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in value):
        return [dict(m) for m in value]
    raise UserError(f"{where}: {key!r} must be a string or a non-empty list of {{role, content}} messages")


def _answer(value: Any, where: str, key: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant":
            raise UserError(f"{where}: {key!r} must be one assistant message (got role {value.get('role')!r})")
        value = value.get("content")
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {key!r} must be a non-empty answer: a string or one assistant message")
    return value


def _split_implicit(d: dict[str, Any], where: str) -> tuple[list[dict[str, Any]], str, str]:
    chosen, rejected = _prompt(d["chosen"], where, "chosen"), _prompt(d["rejected"], where, "rejected")
    if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise UserError(f"{where}: without 'prompt', 'chosen' and 'rejected' must be conversations that share every "
                        "turn but a last assistant one; or add a 'prompt' key")
    return chosen[:-1], _answer(chosen[-1], where, "chosen"), _answer(rejected[-1], where, "rejected")


def read_pair(rec: Any) -> Pair:
    """The Pair of a paired record (trl standard or implicit, OpenAI preference); UserError
    naming the record and key otherwise."""
    d, where = rec.data, rec.where
    if "preferred_output" in d or isinstance(d.get("input"), dict):
        inp = d.get("input")
        if not isinstance(inp, dict) or "messages" not in inp or "non_preferred_output" not in d:
            raise UserError(f"{where}: OpenAI preference records need input.messages, preferred_output and "
                            "non_preferred_output")
        return Pair(where, _prompt(inp["messages"], where, "input.messages"),
                    _answer(d["preferred_output"], where, "preferred_output"),
                    _answer(d["non_preferred_output"], where, "non_preferred_output"), inp.get("tools"))
    if "chosen" in d and "rejected" in d:
        if "prompt" in d:
            return Pair(where, _prompt(d["prompt"], where), _answer(d["chosen"], where, "chosen"),
                        _answer(d["rejected"], where, "rejected"))
        return Pair(where, *_split_implicit(d, where))
    raise UserError(f"{where}: a preference record needs prompt/chosen/rejected (trl) or input/preferred_output/"
                    f"non_preferred_output (OpenAI); it has keys {sorted(d)} (answers to learn as they are are SFT "
                    "data: training.method sft)")


def read_judged(rec: Any) -> list[Judged]:
    """KTO's examples of a record: an unpaired one as it is, a paired one as two."""
    d, where = rec.data, rec.where
    if "completion" in d and "label" in d:
        if not isinstance(d["label"], bool):
            raise UserError(f"{where}: 'label' must be true (a desirable answer) or false, got {d['label']!r}")
        return [Judged(where, _prompt(d.get("prompt"), where), _answer(d["completion"], where, "completion"),
                       d["label"])]
    return read_pair(rec).unpaired()
