"""What a quantized edge export still knows: each demo adapter asked its held-out questions through
the edge server, float and quantized side by side.

For each export of the embedded SmolLM2-135M with both demo adapters (`export-onnx --adapters`:
fp32, int8, int4, and int4 with the builder's options that keep more precision), `lorafleet
serve-edge` serves it and `lorafleet eval --url` asks each adapter its paraphrased questions
(examples/data/*_paraphrased.jsonl: the facts it was trained on, reworded) and its own training
questions; fact match and ROUGE-L are lorafleet eval's. Beside them, the export's own parity
report against peft on the float model (max |Δlogits|, greedy agreement on probe prompts).

    python bench/edge_quality.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, bars, save, table  # noqa: E402
from bench.edge import WORK, demo_adapters, onnx_export  # noqa: E402
from lorafleet.net import free_port, stop_server, wait_until_serving  # noqa: E402

VARIANTS = {  # label -> (precision, builder quantization options)
    "fp32": ("fp32", {}),
    "int8": ("int8", {}),
    "int4": ("int4", {}),
    "int4, float activations": ("int4", {"accuracy_level": "1"}),
    "int4, float activations, block 16": ("int4", {"accuracy_level": "1", "block_size": "16"}),
}


def export(label: str, adapters: dict[str, Path]) -> Path:
    precision, opts = VARIANTS[label]
    plain = label in ("fp32", "int8", "int4")  # the same files as bench/edge.py's
    return onnx_export(precision, adapters, opts, None if plain else
                       WORK / ("onnx-" + label.replace(", ", "-").replace(" ", "_")))


def main() -> None:
    from lorafleet.evaluation.run import evaluate

    adapters = demo_adapters()
    rows = []
    for label in VARIANTS:
        out = export(label, adapters)
        parity = json.loads((out / "onnx_report.json").read_text())
        port = free_port()
        log = WORK / f"quality-{port}.log"
        proc = subprocess.Popen([sys.executable, "-m", "serve.edge", "--set", f"model={out}", "--set", f"port={port}",
                                 "--set", "served_model_name=smollm2"], stdout=log.open("w"),
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, "LORAFLEET_API_KEY": ""})
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_serving(url, proc, log, timeout=120)
            for name in adapters:
                row = {"export": label, "adapter": name,
                       "max abs Δlogits": float(f"{parity['adapters'][name]['max_abs_logits_diff']:.3g}"),
                       "greedy agreement": f"{parity['adapters'][name]['greedy_tokens_matched']}/"
                                           f"{parity['adapters'][name]['greedy_tokens_compared']}"}
                for kind, data in (("own", f"examples/data/{name}.jsonl"),
                                   ("paraphrased", f"examples/data/{name}_paraphrased.jsonl")):
                    rep = evaluate(name, str(ROOT / data), WORK / "eval" / f"{label}-{name}-{kind}", url=url,
                                   api_key="none", record=False, max_new_tokens=64, log=lambda *_: None)
                    row[f"{kind} fact match"] = f"{rep['correct']['adapter']['fact_match']}/{rep['items']}"
                    row[f"{kind} ROUGE-L"] = round(rep["totals"]["adapter"]["rougeL"], 3)
                print(row, flush=True)
                rows.append(row)
        finally:
            stop_server(proc, grace_s=10)
    cols = ["export", "adapter", "max abs Δlogits", "greedy agreement", "own fact match", "paraphrased fact match",
            "own ROUGE-L", "paraphrased ROUGE-L"]
    md = table(rows, cols, "edge exports: what each adapter still knows (lorafleet eval --url, serve-edge)")
    labels = [f"{r['export']}\n{r['adapter']}" for r in rows]
    bars("edge_quality", labels, {"paraphrased ROUGE-L": [r["paraphrased ROUGE-L"] for r in rows],
                                  "own ROUGE-L": [r["own ROUGE-L"] for r in rows]},
         "edge exports: held-out answers, float vs quantized", {})
    save("edge_quality", {"command": "python bench/edge_quality.py", "rows": rows, "markdown": md})


if __name__ == "__main__":
    main()
