"""One evaluation: answers of the adapter (or model) and, with `base`, of its base model, to the
same held-out items; scores, a report directory, and the summary in the adapter's manifest.

    eval.json  every item: question, expected, each model's answer and scores; the totals
    eval.md    the totals and the item table, for a person
    eval.png   the metric means, base beside adapter

The summary written to `lorafleet.json` under "eval" is what `registry.require_eval` reads.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from lorafleet.errors import UserError
from lorafleet.evaluation.items import EvalItem, data_fingerprint, load_items
from lorafleet.evaluation.metrics import COUNTED, METRICS, score, summarize

LOG = Callable[[str], None]


def merged_base(model_dir: str) -> str | None:
    """The base a merged model was made from (its merge_report.json), or None."""
    report = Path(model_dir) / "merge_report.json"
    if not report.is_file():
        return None
    try:
        return json.loads(report.read_text()).get("base_model")
    except (ValueError, AttributeError):
        raise UserError(f"{report} is not a merge report (not a JSON object); pass --base-model") from None


REPORT_FILES = {"eval.json", "eval.md", "eval.png"}


def check_report_dir(out: Path, target: str) -> None:
    """Refuse a report directory that holds anything but an earlier report: it is replaced whole."""
    if Path(target).exists() and out.resolve() == Path(target).resolve():
        raise UserError(f"--out {out} is the evaluated model's own directory; choose another report directory")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES)
        if other:
            raise UserError(f"--out {out} holds other files ({', '.join(other[:5])}); the report replaces the whole "
                            "directory: choose a new or report-only directory")


def _answers(target: str, items: list[EvalItem], with_base: bool, url: str | None, api_key: str | None,
             base_model: str | None, max_new_tokens: int, pairs: list[Any] | None, log: LOG
             ) -> tuple[list[str], list[str] | None, dict, dict[str, list[float]]]:
    """(target's answers, base's answers or None, what answered, preference margins by model)."""
    if url:
        from lorafleet.evaluation.generate import Endpoint

        ep = Endpoint(url, api_key)
        served = [m.id for m in ep.models()]
        if target not in served:
            raise UserError(f"{url} does not serve {target!r}; it serves {served}")
        base_name = (base_model or ep.base_name()) if with_base else None
        log(f"asking {len(items)} questions to {target}" + (f" and to {base_name}" if base_name else "") + f" at {url}")
        got = ep.answers(target, items, max_new_tokens)
        base = ep.answers(base_name, items, max_new_tokens) if base_name else None
        return got, base, {"backend": "endpoint", "url": url, "model": target, "base": base_name}, {}
    from lorafleet.evaluation.generate import LocalModel

    other_adapter = bool(with_base and base_model and target_is_adapter(base_model))  # e.g. DPO vs its SFT start
    lm = LocalModel(target, base_model if target_is_adapter(target) and not other_adapter else None)
    log(f"answering {len(items)} questions with {target} (transformers{' + peft' if lm.info else ''}, greedy)")
    got = lm.answers(items, adapter=True, max_new_tokens=max_new_tokens)
    margins = {"adapter": pair_margins(lm, pairs)} if pairs else {}
    base = base_name = None
    if with_base and lm.info is not None and not other_adapter:
        base_name = lm.base_ref
        base = lm.answers(items, adapter=False, max_new_tokens=max_new_tokens)
        if pairs:
            with lm.model.disable_adapter():
                margins["base"] = pair_margins(lm, pairs)
    elif with_base:
        base_name = base_model or merged_base(target)
        if not base_name:
            raise UserError(f"{target} is not an adapter and records no base (merge_report.json); pass --base-model")
        del lm
        other = LocalModel(base_name)
        base = other.answers(items, max_new_tokens=max_new_tokens)
        if pairs:
            margins["base"] = pair_margins(other, pairs)
    return got, base, {"backend": "transformers", "model": target, "base": base_name}, margins


def pair_margins(lm: Any, pairs: list[Any]) -> list[float]:
    from lorafleet.evaluation.preference import margins

    return margins(lm.model, lm.tokenizer, lm.template, pairs)


def preference_pairs(data: str, limit: int | None) -> list[Any] | None:
    """The records as lorafleet.preference.Pairs when every one is a pair, else None."""
    from lorafleet.records import read_records
    from lorafleet.preference import is_preference, read_pair

    records = read_records(data)[:limit]
    if not all(is_preference(r.data) and "label" not in r.data for r in records):
        return None
    return [read_pair(r) for r in records]


def target_is_adapter(target: str) -> bool:
    return (Path(target) / "adapter_config.json").is_file()


def evaluate(target: str, data: str, out: Path, with_base: bool = False, url: str | None = None,
             api_key: str | None = None, base_model: str | None = None, fmt: str = "auto", limit: int | None = None,
             max_new_tokens: int = 64, judge: dict[str, str] | None = None, record: bool = True,
             log: LOG = print) -> dict[str, Any]:
    """Evaluate `target` (an adapter directory, a model directory or id; with `url`, a served
    model id) on the records of `data`. Writes `out`/eval.json, eval.md, eval.png (replacing
    an earlier report there, in one piece) and, for a local adapter with `record`, its
    manifest's "eval" summary. `judge` = {"url", "model", "api_key"?} adds the judge's verdict as
    the metric "judge". Returns the report's dict. Raises UserError for bad data, a model
    that cannot be loaded, or an endpoint that does not serve it."""
    check_report_dir(Path(out), target)
    items = load_items(data, fmt, limit)
    if not items:
        raise UserError(f"{data} holds no records to evaluate")
    if with_base and not url and not base_model and not target_is_adapter(target) and not merged_base(target):
        raise UserError(f"{target} is not an adapter and records no base (merge_report.json); pass --base-model")
    t0 = time.time()
    pairs = None if url else preference_pairs(data, limit)
    got, base, who, margins = _answers(target, items, with_base, url, api_key, base_model, max_new_tokens, pairs,
                                       log)
    seconds = round(time.time() - t0, 1)
    runs = {"adapter": got} | ({"base": base} if base is not None else {})
    scores = {k: [score(it.expected, a) for it, a in zip(items, answers)] for k, answers in runs.items()}
    if judge:
        from lorafleet.evaluation.generate import Endpoint
        from lorafleet.evaluation.judge import judge as ask_judge

        ep = Endpoint(judge["url"], judge.get("api_key"))
        log(f"asking the judge {judge['model']} at {judge['url']}")
        for k, answers in runs.items():
            for s, v in zip(scores[k], ask_judge(ep, judge["model"], items, answers)):
                s["judge"] = v
    totals = {k: summarize(v) for k, v in scores.items()}
    report = {
        "data": data, "data_sha256_16": data_fingerprint(data), "items": len(items), "max_new_tokens": max_new_tokens,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "generation_seconds": seconds, **who,
        "judge_model": judge["model"] if judge else None,
        "totals": totals,
        "correct": {k: {m: round(t[m] * len(items)) for m in COUNTED} for k, t in totals.items()},
        "per_item": [{"where": it.where, "question": it.question, "expected": it.expected,
                      **{k: {"answer": runs[k][i], "scores": scores[k][i]}
                         | ({"logp_margin": margins[k][i]} if k in margins else {}) for k in runs}}
                     for i, it in enumerate(items)],
    }
    if margins:  # preference pairs: log p(chosen) - log p(rejected), nats, mean over pairs
        report["preference"] = {k: {"mean_logp_margin": round(sum(v) / len(v), 4),
                                    "chosen_preferred": round(sum(x > 0 for x in v) / len(v), 4)}
                                for k, v in margins.items()}
    write_report(report, Path(out))
    if record and not url and target_is_adapter(target):
        record_in_manifest(Path(target), summary(report))
    elif record and url:
        log("answers from an endpoint are not recorded in an adapter's manifest (registry.require_eval reads it): "
            "evaluate the adapter directory to record them")
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the manifest keeps of a report: which data, the totals, and the base's."""
    return {k: report[k] for k in ("data", "data_sha256_16", "items", "created", "backend", "base", "max_new_tokens",
                                   "judge_model")} | {"adapter_scores": report["totals"]["adapter"],
                                                      "base_scores": report["totals"].get("base"),
                                                      "preference": report.get("preference")}


def record_in_manifest(adapter_dir: Path, eval_summary: dict[str, Any]) -> None:
    """Put `eval_summary` under "eval" in the adapter's lorafleet.json, replacing the file in
    one rename (a reader sees the old manifest or the new one)."""
    from lorafleet.adapter import MANIFEST

    path = adapter_dir / MANIFEST
    man = json.loads(path.read_text()) if path.is_file() else {"format": "lorafleet-adapter/1"}
    man["eval"] = eval_summary
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=adapter_dir, prefix=f".{MANIFEST}.")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(man, indent=2, ensure_ascii=False) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a file written with open(): mkstemp's 0600 would hide it from a server
        os.replace(tmp, path)
    except OSError as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise UserError(f"could not record the evaluation in {path} ({e}); the report is written, rerun with "
                        "--no-record or make the adapter directory writable") from None


# ----------------------------------------------------------------------------------- report
def write_report(report: dict[str, Any], out: Path) -> None:
    from lorafleet.atomic import atomic_dir

    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        (tmp / "eval.md").write_text(markdown(report))
        plot(report, tmp / "eval.png")


def metric_cell(report: dict[str, Any], who: str, metric: str) -> str:
    v = report["totals"].get(who, {}).get(metric)
    if v is None:
        return "–"
    if metric in COUNTED:
        return f"{report['correct'][who][metric]}/{report['items']}"
    return f"{v:.3f}"


def metric_names(report: dict[str, Any]) -> list[str]:
    return [m for m in (*METRICS, "judge") if m in report["totals"]["adapter"]]


def markdown(report: dict[str, Any]) -> str:
    whos = [w for w in ("base", "adapter") if w in report["totals"]]
    lines = [f"# Evaluation of `{report['model']}`", "",
             f"{report['items']} items of `{report['data']}` · greedy, up to {report['max_new_tokens']} new tokens · "
             f"{report['backend']}" + (f" · base `{report['base']}`" if report.get("base") else ""), "",
             "| metric | " + " | ".join(whos) + " |", "|---|" + "---|" * len(whos)]
    for m in metric_names(report):
        lines.append(f"| {m} | " + " | ".join(metric_cell(report, w, m) for w in whos) + " |")
    for w, p in (report.get("preference") or {}).items():
        lines.append(f"| logp margin, chosen − rejected ({w}) | mean {p['mean_logp_margin']:+.2f} nats, chosen "
                     f"preferred in {p['chosen_preferred']:.0%} |" + " |" * (len(whos) - 1))
    lines += ["", "| question | expected | " + " | ".join(whos) + " |", "|---|---|" + "---|" * len(whos)]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")[:160]

    for row in report["per_item"]:
        marks = [("✅ " if row[w]["scores"]["fact_match"] else "❌ ") + cell(row[w]["answer"]) for w in whos]
        lines.append(f"| {cell(row['question'])} | {cell(row['expected'])} | " + " | ".join(marks) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = metric_names(report)
    whos = [w for w in ("base", "adapter") if w in report["totals"]]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    width = 0.8 / len(whos)
    for i, w in enumerate(whos):
        vals = [report["totals"][w].get(m) or 0 for m in names]
        ax.bar([x + i * width for x in range(len(names))], vals, width, label=w)
    ax.set_xticks([x + width * (len(whos) - 1) / 2 for x in range(len(names))], names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean score (0-1)")
    ax.set_title(f"{Path(str(report['model'])).name} on {Path(report['data']).name} ({report['items']} items)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
