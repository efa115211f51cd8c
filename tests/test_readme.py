"""The README's runnable snippets (marked `<!-- runnable -->`) run as written, on the tiny model.

Shell lines run with these substitutions: outputs go to a temp dir instead of `runs/`, the
embedded base becomes the tiny base, and `lorafleet train` gets the tiny base model and 2 steps. The Python client snippet runs in
tests/test_serve_stack.py against the real server.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def runnable_blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"<!-- runnable -->\n```{lang}\n(.*?)```", text, re.S)


def test_readme_has_runnable_snippets():
    assert runnable_blocks("bash") and runnable_blocks("python")
    assert "make demo" in (ROOT / "README.md").read_text() and "make test" in (ROOT / "README.md").read_text()


def test_readme_shell_snippets_run(tiny_base, tmp_path):
    for block in runnable_blocks("bash"):
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
    """The README's config tables are `lorafleet config-reference` output, regenerated with the schema."""
    from lorafleet.config import ServeConfig, TrainConfig, config_reference

    text = (ROOT / "README.md").read_text()
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
