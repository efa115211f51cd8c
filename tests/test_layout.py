"""The house reads bottom-up: the core (`lorafleet/`) imports no stage and no tool, only its
entry point (the CLI) does; the stages (`train/`, `merge/`, `serve/`) stand on the core."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABOVE_THE_CORE = {"train", "merge", "serve", "bench", "k8s", "tests", "scripts", "examples"}


def imported_packages(f: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every import in `f`, nested ones included."""
    out = set()
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            out |= {(node.lineno, a.name.split(".")[0]) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add((node.lineno, node.module.split(".")[0]))
    return out


def test_the_core_imports_no_stage():
    upward = [f"{f.relative_to(ROOT)}:{line} imports {pkg}"
              for f in sorted((ROOT / "lorafleet").rglob("*.py")) if f.name != "cli.py"
              for line, pkg in sorted(imported_packages(f)) if pkg in ABOVE_THE_CORE]
    assert not upward, "\n".join(upward)


def test_the_stages_do_not_import_the_tools():
    for stage in ("train", "merge", "serve"):
        for f in sorted((ROOT / stage).rglob("*.py")):
            bad = [pkg for _, pkg in imported_packages(f) if pkg in {"bench", "k8s", "tests", "scripts"}]
            assert not bad, f"{f.relative_to(ROOT)} imports {bad}"
