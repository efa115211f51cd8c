"""Shared by the benchmarks: machine description, result files, tables and bar plots."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def run_child(code: str, *args: str, timeout: int = 1800) -> dict[str, Any]:
    """Run a measurement in a fresh process (so peak RSS is its own); it prints `RESULT{json}`."""
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(lines[-1][6:])


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), **payload}
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps(payload, indent=2) + "\n")
    return p


def table(rows: list[dict[str, Any]], cols: list[str], title: str) -> str:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*[_fmt(r.get(c)) for c in cols])
    Console().print(t)
    md = [f"| {' | '.join(cols)} |", "|" + "---|" * len(cols)]
    md += [f"| {' | '.join(_fmt(r.get(c)) for c in cols)} |" for r in rows]
    return "\n".join(md)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)


def bars(name: str, labels: list[str], series: dict[str, list[float]], title: str, ylabels: dict[str, str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.6), dpi=110)
    axes = axes if len(series) > 1 else [axes]
    for ax, (key, vals) in zip(axes, series.items()):
        ax.bar(labels, vals, color=["#2b7bba", "#f29e4c", "#7fb77e", "#c45b5b"][: len(vals)])
        ax.set_title(key)
        ax.set_ylabel(ylabels.get(key, ""))
        ax.grid(axis="y", alpha=0.3)
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.png"
    fig.savefig(p)
    plt.close(fig)
    return p
