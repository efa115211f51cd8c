"""An LLM judge behind any OpenAI-compatible endpoint (lorafleet's own server included).

The judge is asked one yes/no question per answer, at temperature 0: does the candidate state
the reference answer's facts without contradicting it? The reference-guided single-answer
grading of Zheng et al. 2023 ("Judging LLM-as-a-Judge", MT-Bench), reduced to a verdict a small
model can give. A reply that starts with neither YES nor NO counts as no verdict (None).
"""

from __future__ import annotations

from lorafleet.evaluation.generate import Endpoint
from lorafleet.evaluation.items import EvalItem

SYSTEM = ("You grade answers. Given a question, a reference answer and a candidate answer, reply YES if the "
          "candidate states the facts of the reference answer without contradicting it, otherwise NO. "
          "Reply with the single word YES or NO.")


def verdict(text: str) -> float | None:
    """1.0 for a reply starting with YES, 0.0 for NO, None otherwise (case-insensitive)."""
    word = text.strip().lstrip("*\"'`").split(maxsplit=1)[0].strip(".,!:*\"'`").upper() if text.strip() else ""
    return {"YES": 1.0, "NO": 0.0}.get(word)


def judge(endpoint: Endpoint, model: str, items: list[EvalItem], answers: list[str]) -> list[float | None]:
    """One verdict per (item, answer): 1.0 right, 0.0 wrong, None when the judge did not say."""
    def ask(pair: tuple[EvalItem, str]) -> float | None:
        it, answer = pair
        msgs = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Question: {it.question}\nReference answer: {it.expected}\n"
                                            f"Candidate answer: {answer}\nVerdict (YES or NO):"}]
        return verdict(endpoint.chat(model, msgs, max_tokens=4, where=f"judging {it.where}"))

    return endpoint.map(ask, list(zip(items, answers)))
