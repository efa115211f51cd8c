"""The edge adapter contract: what an ONNX export's LoRA inputs are and what a converted adapter is.

Written by merge/onnx_adapters.py (the export and `lorafleet onnx-adapter`, where peft reads the
adapter), read by the edge server (serve/edge/), which has no torch and no peft:

- `EXPORT/lora_inputs.json`: the base's fingerprint, the graph's LoRA rank (`max_rank`) and, per
  module, the names of its A and B inputs and the base weight's shape [out, in];
- `NAME/` per adapter: `adapter.onnx_adapter` (onnxruntime's adapter format: A^T [in, max_rank]
  and scale·B^T [max_rank, out] under the graph's input names), `edge_adapter.json` (its name,
  rank, base fingerprint, parameter shapes, the chat template it was trained with) and its
  lorafleet.json (the recorded evaluation the promotion gate reads).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.errors import UserError

ADAPTERS_DIR = "adapters"
LORA_INPUTS = "lora_inputs.json"
EDGE_ADAPTER = "edge_adapter.json"
WEIGHTS = "adapter.onnx_adapter"


def read_lora_inputs(onnx_dir: Path) -> dict[str, Any]:
    """An export's `lora_inputs.json`. UserError when the export has no LoRA inputs."""
    f = Path(onnx_dir) / LORA_INPUTS
    if not f.is_file():
        raise UserError(f"{onnx_dir} was exported without LoRA inputs ({LORA_INPUTS} is missing), so no adapter can "
                        "be used with it; export the base again with --lora-target-modules (or --adapters)")
    return json.loads(f.read_text())


@dataclass
class EdgeAdapterInfo:
    """A converted adapter directory, as its edge_adapter.json describes it."""
    path: Path
    meta: dict[str, Any]
    manifest: dict[str, Any] | None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def template(self) -> str | None:
        return self.meta.get("template")

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS


def read_edge_adapter(directory: Path) -> EdgeAdapterInfo:
    """Open a converted adapter directory; UserError naming the file and the fix."""
    d = Path(directory)
    try:
        meta = json.loads((d / EDGE_ADAPTER).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{d / EDGE_ADAPTER} cannot be read ({e}); convert the adapter again "
                        "(lorafleet onnx-adapter)") from None
    if not (d / WEIGHTS).is_file():
        raise UserError(f"{d}: {WEIGHTS} is missing; convert the adapter again (lorafleet onnx-adapter)")
    manifest = None
    if (d / "lorafleet.json").is_file():
        try:
            manifest = json.loads((d / "lorafleet.json").read_text())
        except ValueError as e:
            raise UserError(f"{d / 'lorafleet.json'} is not valid JSON ({e})") from None
    return EdgeAdapterInfo(d, meta, manifest)


def check_edge_adapter(info: EdgeAdapterInfo, inputs: dict[str, Any]) -> None:
    """Refuse (UserError naming what differs, and the fix) an adapter converted for another export:
    another base, another rank, or parameters the graph has no input of that shape for. The
    parameter names and shapes are read from the .onnx_adapter file itself."""
    import onnxruntime as ort

    fix = "convert it for this export: lorafleet onnx-adapter ADAPTER_DIR --onnx THIS_EXPORT"
    fp, want_fp = info.meta.get("base_fingerprint"), inputs.get("base_fingerprint")
    if fp and want_fp and fp != want_fp:
        raise UserError(f"adapter {info.name} was converted for another base (fingerprint {fp}, this export's "
                        f"{want_fp}); {fix}")
    if info.meta.get("max_rank") != inputs["max_rank"]:
        raise UserError(f"adapter {info.name} was converted for LoRA rank {info.meta.get('max_rank')}, this export's "
                        f"inputs have rank {inputs['max_rank']}; {fix}")
    graph = {}
    for mod, v in inputs["modules"].items():
        out_f, in_f = v["shape"]
        graph[v["A"]] = [in_f, inputs["max_rank"]]
        graph[v["B"]] = [inputs["max_rank"], out_f]
    try:
        params = ort.AdapterFormat.read_adapter(str(info.weights)).get_parameters()
    except Exception as e:  # onnxruntime raises its own types for a corrupt file
        raise UserError(f"{info.weights} is not an onnxruntime adapter ({str(e)[:200]}); {fix}") from None
    for name, value in params.items():
        if name not in graph:
            raise UserError(f"adapter {info.name} sets {name}, which this export has no LoRA input for; {fix}")
        if list(value.shape()) != graph[name]:
            raise UserError(f"adapter {info.name}: {name} has shape {list(value.shape())}, the export's input "
                            f"{graph[name]}; {fix}")
