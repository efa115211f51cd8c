"""Edge adapters: one ONNX base graph whose LoRA weights are inputs, plus one `.onnx_adapter` per adapter.

onnxruntime-genai switches adapters at run time (`og.Adapters`, `set_active_adapter`): an
`.onnx_adapter` file holds named tensors that override graph initializers of the same name.
The builder's `adapter_path` option writes the LoRA path into the graph (MatMul A, MatMul B,
Add) with one adapter's weights baked in. We export it once with a *template* adapter that
covers every module any of the adapters touches, at the largest rank, then:

- find which initializer belongs to which module by a marker: the template's A and B hold
  the module's index at [0, 0] and zeros elsewhere, and the builder keeps A and B (B times
  the scale, which is 1 here) as transposed float initializers. This needs no knowledge of
  the builder's node names, which differ from the PyTorch module names;
- zero those initializers (no adapter active = the base model) and declare them as graph
  inputs, so that an adapter can override them;
- write each adapter's A^T and (scale * B)^T under those names with `onnxruntime.AdapterFormat`,
  zero-padded to the graph's rank (exact: the extra rank-1 terms are 0; the builder gives the
  LoRA intermediates static shapes, so every adapter must present the same rank).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from lorafleet.adapter import AdapterInfo, check_against_base, load_adapter_tensors, lora_pairs, read_adapter, unsupported
from lorafleet.errors import UserError

ADAPTERS_DIR = "adapters"


def read_edge_adapters(model: Path, adapter_dirs: list[Path], allow_pickle: bool = False) -> list[AdapterInfo]:
    from lorafleet.models import base_fingerprint, module_shapes

    shapes = module_shapes(str(model))
    fp = base_fingerprint(str(model))["fingerprint"]
    infos, names = [], set()
    for d in adapter_dirs:
        info = read_adapter(d, allow_pickle=allow_pickle)
        check_against_base(info, shapes, fp)
        why = unsupported(info, "edge")
        if why:
            raise UserError(f"adapter {info.name} cannot be exported as an edge adapter: {why}")
        if info.name in names:
            raise UserError(f"two adapters are named {info.name}; adapter names must be unique (rename a directory)")
        names.add(info.name)
        infos.append(info)
    if not infos:
        raise UserError("--adapters: give at least one adapter directory")
    return infos


def module_table(infos: list[AdapterInfo]) -> dict[str, tuple[int, int]]:
    """Every module any adapter touches -> (in_features, out_features)."""
    table = {mod: (a[-1], b[0]) for info in infos for mod, (a, b) in lora_pairs(info.tensors, info.name).items()}
    return dict(sorted(table.items()))


def write_template_adapter(infos: list[AdapterInfo], model: Path, out: Path) -> dict[str, int]:
    """A PEFT adapter over every module, rank = the largest rank, scale 1, markers at [0, 0]."""
    from safetensors.torch import save_file
    import torch

    table = module_table(infos)
    rank = max(i.rank for i in infos)
    tensors, markers = {}, {}
    for idx, (mod, (fin, fout)) in enumerate(table.items(), start=1):
        a = torch.zeros(rank, fin)
        b = torch.zeros(fout, rank)
        a[0, 0] = b[0, 0] = float(idx)
        tensors[f"base_model.model.{mod}.lora_A.weight"] = a
        tensors[f"base_model.model.{mod}.lora_B.weight"] = b
        markers[mod] = idx
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    # Only the listed modules get LoRA: a regex over the exact names (layers an adapter skips stay plain).
    pattern = "^(" + "|".join(m.replace(".", r"\.") for m in table) + ")$"
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model), "r": rank,
        "lora_alpha": rank, "target_modules": pattern, "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "fan_in_fan_out": False, "inference_mode": True}, indent=2))
    return markers


def export_base_with_lora_inputs(model: Path, out: Path, infos: list[AdapterInfo], log: Callable[[str], None]) -> dict:
    """Run the builder with the template adapter, then turn its LoRA weights into zero-default inputs."""
    template = out / ".lora-template"
    markers = write_template_adapter(infos, model, template)
    log(f"exporting {model} with LoRA inputs on {len(markers)} modules (rank up to "
        f"{max(i.rank for i in infos)}) for {len(infos)} adapter(s)")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out),
           "-p", "fp32", "-e", "cpu", "-c", str(out / ".cache"), "--extra_options", f"adapter_path={template}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(out / ".cache", ignore_errors=True)
    shutil.rmtree(template, ignore_errors=True)
    if res.returncode != 0:
        raise UserError(f"ONNX export failed (builder exit {res.returncode}):\n{res.stderr.strip()[-2000:]}")
    return make_lora_inputs(out, markers)


def make_lora_inputs(out: Path, markers: dict[str, int]) -> dict[str, dict[str, str]]:
    """Zero the marked LoRA initializers, declare them graph inputs; return module -> {A, B} names."""
    import onnx
    from onnx import helper, numpy_helper

    genai = json.loads((out / "genai_config.json").read_text())
    filename = genai["model"]["decoder"]["filename"]
    path = out / filename
    m = onnx.load(str(path), load_external_data=True)
    by_marker = {v: k for k, v in markers.items()}
    names: dict[str, dict[str, str]] = {}
    for init in m.graph.initializer:
        part = "A" if ".lora_A." in init.name else "B" if ".lora_B." in init.name else None
        if part is None:
            continue
        arr = numpy_helper.to_array(init)
        mod = by_marker.get(int(round(float(arr[0, 0]))))
        if mod is None or arr.ndim != 2 or np.count_nonzero(arr) != 1:
            raise UserError(f"unexpected LoRA initializer {init.name} {arr.shape} in the exported graph; this "
                            "architecture is not supported for edge adapters: merge and export instead")
        names.setdefault(mod, {})[part] = init.name
        init.CopyFrom(numpy_helper.from_array(np.zeros_like(arr, dtype=np.float32), init.name))
        m.graph.input.append(helper.make_tensor_value_info(init.name, onnx.TensorProto.FLOAT, list(arr.shape)))
    missing = [k for k in markers if set(names.get(k, {})) != {"A", "B"}]
    if missing:
        raise UserError(f"the exported graph has no LoRA path for {missing[:3]}{'…' if len(missing) > 3 else ''}; "
                        "this architecture is not supported for edge adapters: merge and export instead")
    data = filename + ".data"
    (out / data).unlink(missing_ok=True)
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)
    return names


def write_onnx_adapter(info: AdapterInfo, names: dict[str, dict[str, str]], rank: int, out_dir: Path) -> Path:
    """The adapter's A^T and (scale * B)^T, zero-padded to `rank`, under the graph's input names."""
    import onnxruntime as ort

    params = {}
    for mod, (a, b) in lora_pairs(load_adapter_tensors(info), info.name).items():
        scale = info.scale_for(mod)
        r = a.shape[0]
        a_t = np.zeros((a.shape[1], rank), np.float32)
        b_t = np.zeros((rank, b.shape[0]), np.float32)
        a_t[:, :r] = a.float().numpy().T
        b_t[:r, :] = (b.float() * scale).numpy().T
        params[names[mod]["A"]] = a_t
        params[names[mod]["B"]] = b_t
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in params.items()})
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"{info.name}.onnx_adapter"
    fmt.export_adapter(str(path))
    # The template the adapter was trained with, so `lorafleet generate --adapter` prompts it alike.
    (out_dir / f"{info.name}.json").write_text(json.dumps({
        "name": info.name, "source": str(info.path), "rank": info.rank, "modules": len(params) // 2,
        "template": info.template}, indent=2) + "\n")
    return path


def adapter_template(onnx_dir: Path, name: str) -> str | None:
    meta = Path(onnx_dir) / ADAPTERS_DIR / f"{name}.json"
    return json.loads(meta.read_text()).get("template") if meta.is_file() else None


def adapter_names(onnx_dir: Path) -> list[str]:
    d = Path(onnx_dir) / ADAPTERS_DIR
    return sorted(p.name[: -len(".onnx_adapter")] for p in d.glob("*.onnx_adapter")) if d.is_dir() else []
