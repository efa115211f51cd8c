"""The promotion gate: does an adapter's recorded evaluation meet what the server requires?

`registry.require_eval` in the serve config names a metric and a minimum, or "beats the base"
(the adapter's mean above the base's on the same items), or both. The numbers come from the
"eval" summary `lorafleet eval` writes into the adapter's lorafleet.json.
"""

from __future__ import annotations

from typing import Any


def recorded_eval(manifest: Any) -> dict[str, Any] | None:
    """The manifest's "eval" summary when it has the shape `lorafleet eval` writes (scores as
    numbers), else None: a hand-edited or foreign value counts as no evaluation."""
    ev = manifest.get("eval") if isinstance(manifest, dict) else None
    if not isinstance(ev, dict):
        return None
    for key in ("adapter_scores", "base_scores"):
        scores = ev.get(key)
        if key == "base_scores" and scores is None:
            continue
        if not isinstance(scores, dict) or not all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in scores.values()):
            return None
    return ev


def eval_refusal(name: str, manifest: dict[str, Any] | None, require: Any) -> str | None:
    """Why adapter `name` may not be served under `require` (a RequireEval), naming the numbers;
    None when it may. `require` None: no gate."""
    if require is None:
        return None
    ev = recorded_eval(manifest)
    fix = f"run `lorafleet eval ADAPTER_DIR --data HELD_OUT.jsonl{' --base' if require.beats_base else ''}`"
    if ev is None:
        return f"adapter {name} has no recorded evaluation and registry.require_eval is set; {fix}"
    m = require.metric
    got = ev["adapter_scores"].get(m)
    where = f"on {ev.get('items')} items of {ev.get('data')}"
    if got is None:
        return f"adapter {name}'s recorded evaluation has no {m} score ({where}); {fix}" + (
            " with --judge-url/--judge-model" if m == "judge" else "")
    if require.min is not None and got < require.min:
        return (f"adapter {name} does not meet registry.require_eval: {m} {got:.3f} {where}, below the minimum "
                f"{require.min:.3f}")
    if require.beats_base:
        base = (ev.get("base_scores") or {}).get(m)
        if base is None:
            return f"adapter {name}'s recorded evaluation has no base to compare with ({where}); {fix}"
        if got <= base:
            return (f"adapter {name} does not beat its base, as registry.require_eval asks: {m} {got:.3f} vs base "
                    f"{base:.3f} {where}")
    return None
