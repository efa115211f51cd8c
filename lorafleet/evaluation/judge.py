"""An LLM judge behind any OpenAI-compatible endpoint (lorafleet's own server included).

The judge is asked one yes/no question per answer, at temperature 0: does the candidate state
the reference answer's facts without contradicting it? The reference-guided single-answer
grading of Zheng et al. 2023 ("Judging LLM-as-a-Judge", MT-Bench), reduced to a verdict a small
model can give. A reply that starts with neither YES nor NO counts as no verdict (None).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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
    import openai

    from lorafleet.errors import UserError

    def ask(pair: tuple[EvalItem, str]) -> float | None:
        it, answer = pair
        msgs = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Question: {it.question}\nReference answer: {it.expected}\n"
                                            f"Candidate answer: {answer}\nVerdict (YES or NO):"}]
        try:
            r = endpoint.client.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0)
        except openai.APIStatusError as e:
            raise UserError(f"the judge {model!r} at {endpoint.client.base_url} answered {e.status_code}: "
                            f"{e.message}") from None
        except openai.APIConnectionError as e:
            raise UserError(f"the judge at {endpoint.client.base_url}: no connection ({e})") from None
        return verdict(r.choices[0].message.content or "")

    pool = ThreadPoolExecutor(endpoint.concurrency)
    try:
        return list(pool.map(ask, zip(items, answers)))
    finally:
        pool.shutdown(cancel_futures=True)  # the first error ends the rest
