"""Held-out records as questions with expected answers, from any format `lorafleet train` reads.

A record's last assistant turn is the expected answer; everything before it (system, user,
earlier turns, tools) is what the model is asked. Preference records (trl's prompt/chosen/
rejected, OpenAI's preference fine-tuning JSONL) ask their prompt and expect the chosen answer;
KTO's unpaired rows, their desirable answers (undesirable ones are skipped).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.errors import UserError


@dataclass
class EvalItem:
    where: str  # "file.jsonl:3", for reports and errors
    messages: list[dict[str, Any]]  # the conversation up to the expected answer
    expected: str
    tools: list[dict[str, Any]] | None = None

    @property
    def question(self) -> str:
        """The last user turn: what a person reads in a report."""
        return next((str(m.get("content") or "") for m in reversed(self.messages) if m["role"] == "user"), "")


def load_items(source: str, fmt: str = "auto", limit: int | None = None) -> list[EvalItem]:
    """EvalItems of a data file (JSONL/JSON/CSV/Parquet or `hf:org/name`), at most `limit`.

    Raises UserError naming the record for plain-text records (no answer to score) and for
    records whose last turn is not an assistant answer."""
    from lorafleet.records import detect_format, read_records, record_tools, to_messages
    from lorafleet.preference import is_preference, read_judged, read_pair

    items = []
    for rec in read_records(source)[:limit]:
        if is_preference(rec.data):
            if "label" in rec.data:  # KTO's unpaired rows: only a desirable answer is one to expect
                items += [EvalItem(j.where, j.prompt, j.answer) for j in read_judged(rec) if j.desirable]
            else:
                p = read_pair(rec)
                items.append(EvalItem(rec.where, p.prompt, p.chosen, p.tools))
            continue
        kind = detect_format(rec.data) if fmt == "auto" else fmt
        if kind == "text":
            raise UserError(f"{rec.where}: a plain `text` record has no question and answer to score; evaluate on "
                            "records with an answer (alpaca, messages, sharegpt or preference pairs)")
        msgs = to_messages(rec, kind)
        if not msgs or msgs[-1]["role"] != "assistant" or not str(msgs[-1].get("content") or "").strip():
            raise UserError(f"{rec.where}: the last turn must be an assistant answer with text to compare against")
        prompt = [{k: v for k, v in m.items() if k != "weight"} for m in msgs[:-1]]
        items.append(EvalItem(rec.where, prompt, str(msgs[-1]["content"]),
                              record_tools(rec) if kind == "messages" else None))
    return items


def data_fingerprint(source: str) -> str:
    """sha256 (16 hex) of a local data file's bytes, or of the dataset id: which data an eval used."""
    p = Path(source)
    data = p.read_bytes() if p.is_file() else source.encode()
    return hashlib.sha256(data).hexdigest()[:16]
