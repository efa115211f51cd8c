"""The adapter directory: the contract between train, merge and serve.

A PEFT directory (`adapter_config.json` + `adapter_model.safetensors`) plus, when lorafleet
wrote it, `lorafleet.json` (the manifest: base fingerprint, template, data, results).
Adapters made by other PEFT code have no manifest and are accepted; they are rendered with the
base model's chat template.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.errors import UserError

MANIFEST = "lorafleet.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"


@dataclass
class AdapterInfo:
    path: Path
    config: dict[str, Any]
    manifest: dict[str, Any] | None
    weights: Path
    pickled: bool = False
    tensors: dict[str, list[int]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def rank(self) -> int:
        ranks = [self.config.get("r", 8)] + list((self.config.get("rank_pattern") or {}).values())
        return int(max(ranks))

    @property
    def target_modules(self) -> list[str]:
        tm = self.config.get("target_modules") or []
        return [tm] if isinstance(tm, str) else list(tm)

    @property
    def template(self) -> str | None:
        return (self.manifest or {}).get("template", {}).get("text")

    @property
    def base_fingerprint(self) -> str | None:
        return (self.manifest or {}).get("base_model", {}).get("fingerprint")

    def scale_for(self, module_key: str) -> float:
        """LoRA scale for a module: alpha/r, or alpha/sqrt(r) with rsLoRA, honouring patterns."""
        r = self.config.get("r", 8)
        alpha = self.config.get("lora_alpha", r)
        for pat, v in (self.config.get("rank_pattern") or {}).items():
            if module_key.endswith(pat):
                r = v
        for pat, v in (self.config.get("alpha_pattern") or {}).items():
            if module_key.endswith(pat):
                alpha = v
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def read_adapter(path: str | Path, allow_pickle: bool = False, read_tensors: bool = True) -> AdapterInfo:
    """Open and check an adapter directory; every failure names the file and the fix."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"adapter directory {p} does not exist")
    cfg_file = p / "adapter_config.json"
    if not cfg_file.is_file():
        raise UserError(f"{p} is not a PEFT adapter: adapter_config.json is missing")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_file} is not valid JSON ({e}); the adapter is corrupt, re-export it") from None
    if not isinstance(config, dict):
        raise UserError(f"{cfg_file} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{p}: peft_type {config.get('peft_type')} is not supported; only LoRA adapters are")
    manifest = None
    if (p / MANIFEST).is_file():
        try:
            manifest = json.loads((p / MANIFEST).read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{p / MANIFEST} is not valid JSON ({e})") from None
    weights = p / WEIGHTS
    pickled = False
    if not weights.is_file():
        if (p / PICKLE_WEIGHTS).is_file():
            if not allow_pickle:
                raise UserError(
                    f"{p} holds only {PICKLE_WEIGHTS}, a pickle file that can run code when loaded; convert it to "
                    "safetensors, or pass --allow-pickle if you trust its author")
            weights, pickled = p / PICKLE_WEIGHTS, True
        else:
            raise UserError(f"{p}: {WEIGHTS} is missing; the adapter directory is incomplete")
    info = AdapterInfo(path=p, config=config, manifest=manifest, weights=weights, pickled=pickled)
    if read_tensors and not pickled:
        info.tensors = safetensors_shapes(weights)
        if not any("lora_A" in k for k in info.tensors):
            raise UserError(f"{weights} has no lora_A/lora_B tensors; it is not a LoRA adapter")
    return info


def safetensors_shapes(f: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as sf:
            return {k: list(sf.get_slice(k).get_shape()) for k in sf.keys()}
    except Exception as e:  # safetensors raises its own error types for a truncated/garbled file
        raise UserError(f"{f} is corrupt or truncated ({e}); copy the adapter again") from None


def load_adapter_tensors(info: AdapterInfo) -> dict[str, Any]:
    if info.pickled:
        import torch

        return torch.load(info.weights, map_location="cpu", weights_only=True)
    from safetensors.torch import load_file

    return load_file(str(info.weights))


def lora_module_keys(tensors: dict[str, Any]) -> list[str]:
    """Base-model weight keys that the adapter touches, e.g. `model.layers.0.self_attn.q_proj`."""
    keys = set()
    for k in tensors:
        if ".lora_A" in k:
            mod = k.split(".lora_A")[0]
            keys.add(strip_peft_prefix(mod))
    return sorted(keys)


def lora_pairs(tensors: dict[str, Any], adapter_name: str) -> dict[str, tuple[Any, Any]]:
    """Base module key (e.g. `model.layers.0.self_attn.q_proj`) -> (lora_A, lora_B); values are
    whatever `tensors` holds (tensors, or shapes from `AdapterInfo.tensors`)."""
    pairs = {}
    for k, a in tensors.items():
        if ".lora_A." not in k:
            continue
        b = tensors.get(k.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise UserError(f"adapter {adapter_name}: {k} has no matching lora_B tensor; the adapter is corrupt")
        pairs[strip_peft_prefix(k.split(".lora_A.")[0])] = (a, b)
    return pairs


def strip_peft_prefix(key: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def check_against_base(info: AdapterInfo, base_shapes: dict[str, list[int]], base_fingerprint: str | None) -> None:
    """Refuse an adapter made for another base: fingerprint first, then every LoRA shape."""
    if base_fingerprint and info.base_fingerprint and info.base_fingerprint != base_fingerprint:
        trained_on = (info.manifest or {}).get("base_model", {}).get("name", "?")
        raise UserError(
            f"adapter {info.name} was trained on another base model ({trained_on}, fingerprint "
            f"{info.base_fingerprint}) than this one (fingerprint {base_fingerprint}); use the base it was trained on")
    if not base_shapes:
        return
    for k, shape in info.tensors.items():
        if ".lora_A" not in k and ".lora_B" not in k:
            continue
        mod = strip_peft_prefix(k.split(".lora_")[0])
        wkey = mod + ".weight"
        if wkey not in base_shapes:
            raise UserError(f"adapter {info.name} targets {mod}, which the base model does not have; "
                            "it was made for another architecture")
        out_f, in_f = base_shapes[wkey][0], base_shapes[wkey][-1]
        if ".lora_A" in k and shape[-1] != in_f:
            raise UserError(f"adapter {info.name}: {k} expects input size {shape[-1]} but the base's {wkey} has "
                            f"{in_f}; the adapter was made for another base model")
        if ".lora_B" in k and shape[0] != out_f:
            raise UserError(f"adapter {info.name}: {k} has output size {shape[0]} but the base's {wkey} has "
                            f"{out_f}; the adapter was made for another base model")
