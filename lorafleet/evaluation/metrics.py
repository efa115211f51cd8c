"""Scores of one answer against its expected answer, each in [0, 1].

- exact_match  the answers are equal after SQuAD's normalisation (lower case, no punctuation,
               no articles, single spaces: `normalize_answer` of the SQuAD v1.1 evaluation script)
- contains     the normalised expected answer appears inside the normalised answer
- fact_match   every number and rare word of the expected answer is stated (lorafleet.quality):
               the demo's measure; it rewards the facts, not the phrasing
- rougeL       ROUGE-L F-measure, Porter-stemmed (Google's `rouge-score`, the reference
               reimplementation of ROUGE-1.5.5)
- chrf         chrF (sacrebleu's `sentence_chrf`, Popović 2015), divided by 100

Counted metrics (exact_match, contains, fact_match) are 0/1 per item, so their mean times the
number of items is "how many answers were right".
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

from lorafleet.quality import fact_match

METRICS = ("exact_match", "contains", "fact_match", "rougeL", "chrf")
COUNTED = ("exact_match", "contains", "fact_match")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's answer normalisation (its official evaluate-v1.1.py)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def score(expected: str, answer: str) -> dict[str, float]:
    """Every metric of METRICS for one (expected, answer) pair; values in [0, 1]."""
    from sacrebleu import sentence_chrf

    exp, got = normalize_answer(expected), normalize_answer(answer)
    return {
        "exact_match": float(bool(exp) and exp == got),
        "contains": float(bool(exp) and exp in got),
        "fact_match": float(fact_match(expected, answer)),
        "rougeL": round(_rouge().score(expected, answer)["rougeL"].fmeasure, 4),
        "chrf": round(sentence_chrf(answer, [expected]).score / 100, 4),
    }


def summarize(scores: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over items ({} for no items); a metric missing on an item (a judge
    that gave no verdict) is averaged over the items that have it."""
    names = sorted({k for s in scores for k in s})
    out = {}
    for name in names:
        vals = [s[name] for s in scores if s.get(name) is not None]
        out[name] = round(sum(vals) / len(vals), 4) if vals else None
    return out
