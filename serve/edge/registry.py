"""The registry over converted edge adapters: the front's AdapterRegistry, with the edge's gate.

An edge adapter source is a directory of converted adapters (`NAME/edge_adapter.json`, see
lorafleet/edge_adapter.py), the export's own `adapters/` included. The gate checks each against
the export's LoRA inputs (base, rank, the parameters in the .onnx_adapter file); the promotion
gate (registry.require_eval) reads the lorafleet.json converted with it, as on the vLLM server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafleet.edge_adapter import EDGE_ADAPTER, check_edge_adapter, read_edge_adapter
from serve.registry import AdapterRegistry


class EdgeRegistry(AdapterRegistry):
    """AdapterRegistry whose adapters are converted edge adapters for the export with `lora_inputs`
    (None: an export without LoRA inputs, where every adapter is refused, naming why)."""

    marker = EDGE_ADAPTER
    reads_base_weights = False

    def __init__(self, sources: list[str], cache_dir: Path, lora_inputs: dict[str, Any] | None,
                 no_inputs_reason: str = "", **kw: Any):
        super().__init__(sources, cache_dir, **kw)
        self.lora_inputs = lora_inputs
        self.no_inputs_reason = no_inputs_reason

    def read(self, local: Path) -> Any:
        return read_edge_adapter(local)

    def gate(self, info: Any) -> None:
        from lorafleet.errors import UserError

        if self.lora_inputs is None:
            raise UserError(self.no_inputs_reason)
        check_edge_adapter(info, self.lora_inputs)

    def max_rank(self) -> int:
        return self.lora_inputs["max_rank"] if self.lora_inputs else 0
