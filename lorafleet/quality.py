"""Scoring answers against expected ones: does the answer state the expected facts?

`fact_match` is the demo's and the benchmarks' exact-match: every number and every rare word
(not a stop word) of the expected answer appears in the model's answer, case-insensitively.
It rewards the facts, not the phrasing.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

STOP = set("""a an the is are was were be been of in on at to for with by from and or but not no yes it its this that
these those as can may must do does did has have had you your i we they he she them our their there here
what which who when where how why one into up out over under within per than then so such only also very""".split())


def _norm(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"(?<=\d)[,](?=\d{3})", "", text)  # 3,200 == 3200


def key_terms(expected: str) -> list[str]:
    words = re.findall(r"[a-z0-9][a-z0-9.\-@]*[a-z0-9]|[a-z0-9]", _norm(expected))
    return [w for w in words if w not in STOP and (any(c.isdigit() for c in w) or len(w) > 3)]


def fact_match(expected: str, answer: str) -> bool:
    terms = key_terms(expected)
    got = _norm(answer)
    return bool(terms) and all(re.search(rf"(?<![a-z0-9]){re.escape(t)}(?![a-z0-9])", got) for t in terms)


def questions(data_file: str | Path) -> list[tuple[list[dict], str]]:
    """(messages without the answer, expected answer) for every record of a bundled JSONL dataset
    (alpaca or messages rows): what the demo and the benchmarks ask an adapter."""
    import json

    out = []
    for line in Path(data_file).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if "messages" in r:
            out.append((r["messages"][:-1], r["messages"][-1]["content"]))
        else:
            sys = [{"role": "system", "content": r["instruction"]}] if r.get("instruction") else []
            out.append((sys + [{"role": "user", "content": r["input"]}], r["output"]))
    return out
