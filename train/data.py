"""Training data: read records, turn every format into chat messages, tokenize with a template.

Formats (a record each):
- alpaca   {"instruction", "input", "output"}: the seed's format. instruction = the system turn
           (`### 指令`), input = the user turn; with an empty input the instruction is the user turn.
- messages {"messages": [{"role", "content"}, ...]}: OpenAI roles.
- sharegpt {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}
- text     {"text"}: plain language-model data, loss on every token.

Errors name the file and the record (line for JSONL) and say what is wrong.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from lorafleet.errors import UserError
from lorafleet.templates import encode, split_prompt_completion

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bot": "assistant", "model": "assistant"}
OPENAI_ROLES = {"system", "user", "assistant", "developer"}


@dataclass
class Record:
    where: str  # "file.jsonl:12" for error messages
    data: dict[str, Any]


def read_records(source: str) -> list[Record]:
    """Read a local file (JSONL, JSON, CSV, Parquet) or an HF dataset id (`hf:org/name[:split]`)."""
    if source.startswith("hf:"):
        return _read_hub(source[3:])
    p = Path(source)
    if not p.is_file():
        if "/" in source and not source.startswith((".", "/", "~")) and not p.suffix:
            return _read_hub(source)
        raise UserError(f"data file {source} not found")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        records = []
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{p}:{i}: not valid JSON ({e.msg}); each line must be one JSON object") from None
                records.append(Record(f"{p}:{i}", obj))
    elif suffix == ".json":
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(obj, dict) and "data" in obj:
            obj = obj["data"]
        if not isinstance(obj, list):
            raise UserError(f"{p}: a JSON data file must hold a list of records")
        records = [Record(f"{p}[{i}]", r) for i, r in enumerate(obj)]
    elif suffix in (".csv", ".tsv"):
        with p.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            records = [Record(f"{p}:{i + 2}", dict(r)) for i, r in enumerate(reader)]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(p).to_pylist()
        records = [Record(f"{p}[row {i}]", r) for i, r in enumerate(rows)]
    else:
        raise UserError(f"data file {p}: unknown extension {suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet")
    for r in records:
        if not isinstance(r.data, dict):
            raise UserError(f"{r.where}: a record must be a JSON object, got {type(r.data).__name__}")
    if not records:
        raise UserError(f"data file {p} holds no records; add examples or point train_file to another file")
    return records


def _read_hub(spec: str) -> list[Record]:
    import datasets

    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # hub errors come in many types; the message is what matters
        raise UserError(f"could not load HF dataset {name!r}: {e}") from None
    return [Record(f"{name}[{i}]", dict(r)) for i, r in enumerate(ds)]


def detect_format(record: dict[str, Any]) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    raise UserError(f"cannot tell the data format from keys {sorted(record)}; expected instruction/input/output, "
                    "messages, conversations or text (or set data.format)")


def to_messages(rec: Record, fmt: str) -> list[dict[str, str]] | str:
    """A chat (list of messages) for chat formats; the raw string for `text`."""
    d = rec.data
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if key not in d or d[key] is None:
                raise UserError(f"{rec.where}: alpaca record lacks {key!r} (keys: {sorted(d)})")
        instruction, inp, out = str(d["instruction"]), str(d.get("input") or ""), str(d["output"])
        if not out.strip():
            raise UserError(f"{rec.where}: 'output' is empty; there is nothing to learn")
        if inp.strip():
            msgs = [{"role": "system", "content": instruction}, {"role": "user", "content": inp}]
        else:
            msgs = [{"role": "user", "content": instruction}]
        return msgs + [{"role": "assistant", "content": out}]
    if fmt == "messages":
        msgs = d["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{rec.where}: 'messages' must be a non-empty list")
        clean = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise UserError(f"{rec.where}: messages[{j}] needs 'role' and 'content'")
            if m["role"] not in OPENAI_ROLES:
                raise UserError(f"{rec.where}: messages[{j}] has role {m['role']!r}; use one of {sorted(OPENAI_ROLES)}")
            role = "system" if m["role"] == "developer" else m["role"]
            clean.append({"role": role, "content": str(m["content"])})
        if clean[-1]["role"] != "assistant":
            raise UserError(f"{rec.where}: the last message must be the assistant's answer (got {clean[-1]['role']})")
        return clean
    if fmt == "sharegpt":
        conv = d["conversations"]
        if not isinstance(conv, list) or not conv:
            raise UserError(f"{rec.where}: 'conversations' must be a non-empty list")
        clean = []
        for j, m in enumerate(conv):
            who = m.get("from") if isinstance(m, dict) else None
            if who not in SHAREGPT_ROLES or "value" not in m:
                raise UserError(f"{rec.where}: conversations[{j}] needs 'from' (human/gpt/system) and 'value'")
            clean.append({"role": SHAREGPT_ROLES[who], "content": str(m["value"])})
        if clean[-1]["role"] != "assistant":
            raise UserError(f"{rec.where}: the last turn must be from gpt/assistant")
        return clean
    if fmt == "text":
        if not isinstance(d.get("text"), str) or not d["text"].strip():
            raise UserError(f"{rec.where}: record lacks a non-empty 'text'")
        return d["text"]
    raise UserError(f"unknown data format {fmt!r}")


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
        h.update(json.dumps(conv, sort_keys=True, ensure_ascii=False).encode())
        if isinstance(conv, str):
            ids = encode(tokenizer, conv) + ([eos] if eos is not None else [])
            mask = [1] * len(ids)
        else:
            ids, mask, _ = split_prompt_completion(tokenizer, template, conv)
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
