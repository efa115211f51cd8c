"""Put the benchmark tables and the generated config reference into README.md (between markers)."""

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


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for kind in ("train", "serve"):
        ref = subprocess.run([sys.executable, "-m", "lorafleet.cli", "config-reference", kind], capture_output=True,
                             text=True, check=True, cwd=ROOT).stdout
        text = replace_block(text, f"config-reference:{kind}", ref)
    parts = []
    for name in ("train", "merge", "qlora_merge", "onnx", "lora_kernel", "serve", "reliability", "tools_json", "edge"):
        f = RESULTS / f"{name}.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        m = r["machine"]
        plot = f"\n\n![{name}](bench/results/{name}.png)" if (RESULTS / f"{name}.png").is_file() else ""
        script = r.get("command") or f"python bench/{name}.py"
        parts.append(f"**{name}** ({m['cpu']}, {m['cores']} cores, {m['date']}; `{script}`)\n\n"
                     f"{r['markdown']}{plot}\n")
    if parts:
        text = replace_block(text, "bench-results", "\n".join(parts))
    edge = [p for p in parts if p.startswith("**edge**")]
    if edge:  # also beside the edge server's section
        text = replace_block(text, "bench-edge", edge[0])
    readme.write_text(text)
    print(f"README.md updated ({len(parts)} benchmark tables)")


if __name__ == "__main__":
    main()
