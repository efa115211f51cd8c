"""Write the generated parts of docs/ (between markers): every benchmark's table and plot in
docs/benchmarks.md (the edge one also in docs/edge.md), and the config references in
docs/training.md and docs/serving.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def replace_block(text: str, marker: str, body: str) -> str:
    pat = re.compile(rf"(<!-- {marker} -->\n).*?(<!-- /{marker} -->)", re.S)
    return pat.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def update(page: str, marker: str, body: str) -> None:
    path = ROOT / "docs" / page
    path.write_text(replace_block(path.read_text(), marker, body))


def main() -> None:
    for kind, page in (("train", "training.md"), ("serve", "serving.md")):
        ref = subprocess.run([sys.executable, "-m", "lorafleet.cli", "config-reference", kind], capture_output=True,
                             text=True, check=True, cwd=ROOT).stdout
        update(page, f"config-reference:{kind}", ref)
    parts = []
    for name in ("train", "merge", "qlora_merge", "onnx", "lora_kernel", "serve", "reliability", "tools_json", "edge", "fleet_apply",
                 "edge_quality"):
        f = RESULTS / f"{name}.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        m = r["machine"]
        plot = f"\n\n![{name}](../bench/results/{name}.png)" if (RESULTS / f"{name}.png").is_file() else ""
        script = r.get("command") or f"python bench/{name}.py"
        parts.append(f"**{name}** ({m['cpu']}, {m['cores']} cores, {m['date']}; `{script}`)\n\n"
                     f"{r['markdown']}{plot}\n")
    if parts:
        update("benchmarks.md", "bench-results", "\n".join(parts))
    edge = [p for p in parts if p.startswith(("**edge**", "**edge_quality**"))]
    if edge:  # also beside the edge server's section
        update("edge.md", "bench-edge", "\n".join(edge))
    print(f"docs/ updated ({len(parts)} benchmark tables)")


if __name__ == "__main__":
    main()
