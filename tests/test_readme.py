"""The README and docs/: runnable snippets (marked `<!-- runnable -->`) run as written, on the tiny
model; links resolve; generated tables are the schemas'.

Shell lines run with these substitutions: outputs go to a temp dir instead of `runs/`, the
embedded base becomes the tiny base, and `lorafleet train` gets the tiny base model and 2 steps.
The README's blocks run in one directory, the docs' in another, page after page (each page's
blocks build on the pages before, as a reader follows them). The Python client snippet runs in
tests/test_serve_stack.py against the real server.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


DOCS = ["docs/training.md", "docs/evaluation.md", "docs/serving.md", "docs/rollout.md", "docs/edge.md",
        "docs/deploy.md", "docs/scaling.md", "docs/serving-engine.md", "docs/benchmarks.md", "docs/troubleshooting.md"]


def runnable_blocks(lang: str, files: tuple[str, ...] = ("README.md",)) -> list[str]:
    text = "\n".join((ROOT / f).read_text() for f in files)
    return re.findall(rf"<!-- runnable -->\n```{lang}\n(.*?)```", text, re.S)


def test_readme_has_runnable_snippets():
    assert runnable_blocks("bash") and runnable_blocks("python")
    assert "make demo" in (ROOT / "README.md").read_text() and "make test" in (ROOT / "README.md").read_text()


def test_readme_is_a_front_door_and_every_link_resolves():
    """The README stays short (the reference is in docs/), and every relative link in it and in
    docs/ points at a file that exists, and at a heading that exists when it names one."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    assert sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")) == sorted(DOCS)
    broken = []
    for f in ["README.md", *DOCS]:
        page = ROOT / f
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{f}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in headings(dest):
                broken.append(f"{f}: {target} (no such heading)")
    assert not broken, broken


def headings(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as '-'."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}


@pytest.mark.parametrize("files", [("README.md",), tuple(DOCS)], ids=["README", "docs"])
def test_readme_shell_snippets_run(tiny_base, tmp_path, files):
    for block in runnable_blocks("bash", files):
        for line in block.strip().splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            args = shlex.split(line.split(" #")[0])
            assert args[0] == ".venv/bin/lorafleet", line
            args = [a.replace("runs/", f"{tmp_path}/runs/").replace("embedded:smollm2-135m-instruct", str(tiny_base))
                    for a in args[1:]]
            if args[0] == "train":
                args += ["--set", f"base_model={tiny_base}", "--set", "training.max_steps=2",
                         "--set", "training.max_seq_length=128"]
            res = subprocess.run([sys.executable, "-m", "lorafleet.cli", *args], cwd=ROOT, capture_output=True,
                                 text=True, timeout=600)
            assert res.returncode == 0, f"{line}\n{res.stderr[-3000:]}"
    assert (tmp_path / "runs" / "onnx" / "support" / "onnx_report.json").is_file()
    assert (tmp_path / "runs" / "onnx" / "edge" / "adapters" / "legal" / "adapter.onnx_adapter").is_file()


def test_readme_config_reference_is_the_schemas():
    """The config tables (docs/training.md, docs/serving.md) are `lorafleet config-reference` output,
    regenerated with the schema (bench/report.py)."""
    from lorafleet.config import ServeConfig, TrainConfig, config_reference

    text = (ROOT / "docs" / "training.md").read_text() + (ROOT / "docs" / "serving.md").read_text()
    for kind, schema in (("train", TrainConfig), ("serve", ServeConfig)):
        block = re.search(rf"<!-- config-reference:{kind} -->\n(.*?)<!-- /config-reference:{kind} -->", text, re.S)
        assert block, kind
        rows = [f"| `{key}` | {tname} | `{default}` | {desc} |" for key, tname, default, desc in config_reference(schema)]
        assert block.group(1).strip().splitlines()[2:] == rows, f"regenerate: lorafleet config-reference {kind}"


def test_every_config_key_is_read_somewhere():
    """A documented key that no code reads does nothing while its doc says it does: each leaf of the
    train and serve schemas must be read, as `x.key` or `getattr(x, "key")`. In config.py itself only
    attribute reads count (a method such as `bnb_config()` passing the key on); its declarations and
    descriptions do not."""
    import ast

    from lorafleet.config import ServeConfig, TrainConfig, config_reference

    read: set[str] = set()
    for d in ("lorafleet", "train", "merge", "serve", "k8s"):
        for f in (ROOT / d).rglob("*.py"):
            in_schema = f.name == "config.py" and f.parent.name == "lorafleet"
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Attribute):
                    read.add(node.attr)
                elif not in_schema and isinstance(node, ast.Constant) and isinstance(node.value, str):
                    read.add(node.value)  # getattr(cfg, "key"), model_dump()["key"]
    unread = [key for schema in (TrainConfig, ServeConfig) for key, *_ in config_reference(schema)
              if key.rsplit(".", 1)[-1] not in read]
    assert not unread, f"config keys that nothing reads: {unread}"
