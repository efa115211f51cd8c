"""Training and evaluation data: read records, turn every format into chat messages.

The data contract `lorafleet train` and `lorafleet eval` share (tokenizing is the trainer's:
train/data.py).

Formats (a record each):
- alpaca   {"instruction", "input", "output"}: the seed's format. instruction = the system turn
           (`### 指令`), input = the user turn; with an empty input the instruction is the user turn.
- messages {"messages": [{"role", "content"}, ...], "tools"?}: OpenAI's chat fine-tuning format:
           content as a string or a list of text parts, `name`, per-assistant-turn `weight`
           0/1 (0: in the text, not in the loss), `tool_calls` / `tool` turns with `tools`.
- sharegpt {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}
- text     {"text"}: plain language-model data, loss on every token.

Errors name the file and the record (line for JSONL) and say what is wrong.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.errors import UserError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bot": "assistant", "model": "assistant"}
OPENAI_ROLES = {"system", "user", "assistant", "developer", "tool"}
# Keys of a message in OpenAI's chat fine-tuning format (platform.openai.com/docs/api-reference/fine-tuning/chat-input).
MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id"}


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
        return openai_messages(rec)
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


def openai_messages(rec: Record) -> list[dict[str, Any]]:
    """A record in OpenAI's chat fine-tuning format as the messages a chat template renders.

    Text parts are joined with "\n", as vLLM joins them for a string-content template, so a
    served request renders as its training record did; tool call arguments given as JSON text
    become objects, as vLLM hands them to templates (vllm/renderers/chat_utils.py,
    `_postprocess_messages`). Anything else is refused naming the record and key.
    """
    d, where = rec.data, rec.where
    if "functions" in d or "function_call" in d:
        raise UserError(f"{where}: 'functions' is OpenAI's legacy function calling; write 'tools' and "
                        "'tool_calls' instead")
    msgs = d["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for j, m in enumerate(msgs):
        at = f"{where}: messages[{j}]"
        if not isinstance(m, dict) or "role" not in m:
            raise UserError(f"{at} needs 'role' and 'content'")
        if not isinstance(m["role"], str) or m["role"] not in OPENAI_ROLES:
            raise UserError(f"{at} has role {m['role']!r}; use one of {sorted(OPENAI_ROLES)}")
        unknown = sorted(set(m) - MESSAGE_KEYS)
        if unknown:
            raise UserError(f"{at} has key {unknown[0]!r}, which OpenAI's chat format does not define; "
                            f"remove it (known: {sorted(MESSAGE_KEYS)})")
        msg: dict[str, Any] = {"role": "system" if m["role"] == "developer" else m["role"],
                               "content": _text_content(m.get("content"), m, at)}
        if "name" in m:
            if not isinstance(m["name"], str):
                raise UserError(f"{at}: 'name' must be a string (got {m['name']!r})")
            msg["name"] = m["name"]
        if "weight" in m:
            w = m["weight"]
            if m["role"] != "assistant" or isinstance(w, (bool, float)) or w not in (0, 1):
                raise UserError(f"{at}: 'weight' is 0 or 1, on assistant messages only (got {m['weight']!r} "
                                f"on {m['role']})")
            msg["weight"] = int(m["weight"])
        if m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], at)
        if m["role"] == "tool":
            if "tool_call_id" in m:
                msg["tool_call_id"] = str(m["tool_call_id"])
        out.append(msg)
    if out[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's answer (got {out[-1]['role']})")
    return out


def _text_content(content: Any, m: dict[str, Any], at: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        if m.get("tool_calls"):
            return ""
        raise UserError(f"{at} needs 'content' (a string or a list of text parts)")
    if not isinstance(content, list):
        raise UserError(f"{at}: 'content' must be a string or a list of text parts, got {type(content).__name__}")
    texts = []
    for k, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise UserError(f"{at}.content[{k}] is a {kind!r} part; only {{\"type\": \"text\", \"text\": ...}} "
                            "parts can be trained on")
        extra = sorted(set(part) - {"type", "text"})
        if extra:
            raise UserError(f"{at}.content[{k}] has key {extra[0]!r}; a text part has only 'type' and 'text'")
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_calls(calls: Any, at: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise UserError(f"{at}: 'tool_calls' must be a list")
    out = []
    for k, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or c.get("type", "function") != "function":
            raise UserError(f"{at}.tool_calls[{k}] must be {{\"type\": \"function\", \"function\": "
                            "{\"name\", \"arguments\"}}")
        args = fn.get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise UserError(f"{at}.tool_calls[{k}].function.arguments is not valid JSON ({e.msg})") from None
        if not isinstance(args, dict):
            raise UserError(f"{at}.tool_calls[{k}].function.arguments must be a JSON object")
        out.append({"id": str(c.get("id", f"call_{k}")), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def record_tools(rec: Record) -> list[dict[str, Any]] | None:
    """The record's `tools` (OpenAI function definitions), checked; None when it has none."""
    tools = rec.data.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function"
                                              and isinstance(t.get("function"), dict) for t in tools):
        raise UserError(f"{rec.where}: 'tools' must be a list of {{\"type\": \"function\", \"function\": {{...}}}}")
    return tools
