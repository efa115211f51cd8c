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

The export is open (vLLM's `max_lora_rank` idea): the template may cover more modules than the
adapters at hand (`--lora-target-modules`, by default every attention and MLP projection) at a
chosen `--max-lora-rank`, and `lora_inputs.json` records the graph's LoRA inputs, so an adapter
trained later is converted on its own (`convert_adapter`, `lorafleet onnx-adapter`, or the edge
server's load/rescan) without exporting the base again. Conversion reads safetensors with numpy
only: the edge server runs it without torch.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from lorafleet.adapter import AdapterInfo, check_against_base, lora_pairs, name_some, read_adapter, unsupported
from lorafleet.edge_adapter import ADAPTERS_DIR, EDGE_ADAPTER, LORA_INPUTS, WEIGHTS, read_lora_inputs
from lorafleet.errors import UserError

# What an open export gives LoRA inputs by default: the projections of attention and MLP, the
# modules LoRA recipes (and vLLM's default LoRA layers) target.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def read_edge_adapters(model: Path, adapter_dirs: list[Path], allow_pickle: bool = False) -> list[AdapterInfo]:
    """The adapters to export with `model`, each checked against it (fingerprint, shapes) and
    against what an edge adapter can hold; UserError naming the adapter otherwise."""
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
    return infos


def module_table(infos: list[AdapterInfo]) -> dict[str, tuple[int, int]]:
    """Every module any adapter touches -> (in_features, out_features)."""
    table = {mod: (a[-1], b[0]) for info in infos for mod, (a, b) in lora_pairs(info.tensors, info.name).items()}
    return dict(sorted(table.items()))


def base_module_table(model: Path, targets: list[str]) -> dict[str, tuple[int, int]]:
    """The base's linear modules whose last name is in `targets` (peft's rule for a list of
    names), inside its decoder layers -> (in_features, out_features). UserError when none match."""
    from lorafleet.models import module_shapes

    table = {}
    for key, shape in module_shapes(str(model)).items():
        mod = key.removesuffix(".weight")
        if key.endswith(".weight") and len(shape) == 2 and ".layers." in mod and mod.rsplit(".", 1)[-1] in targets:
            table[mod] = (shape[1], shape[0])
    if not table:
        raise UserError(f"--lora-target-modules {','.join(targets)}: the base {model} has no such linear modules "
                        f"in its layers; use names such as {', '.join(DEFAULT_TARGETS)}")
    return dict(sorted(table.items()))


def write_template_adapter(table: dict[str, tuple[int, int]], rank: int, model: Path, out: Path) -> dict[str, int]:
    """A PEFT adapter over every module of `table`, rank `rank`, scale 1, markers at [0, 0]."""
    from safetensors.torch import save_file
    import torch

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


def export_base_with_lora_inputs(model: Path, out: Path, table: dict[str, tuple[int, int]], rank: int,
                                 log: Callable[[str], None], precision: str = "fp32",
                                 quant_options: dict[str, str] | None = None) -> dict:
    """Run the builder with the template adapter, then turn its LoRA weights into zero-default
    inputs and record them in `lora_inputs.json`; returns that record.

    int8/int4: the builder quantizes the LoRA MatMuls with the rest (MatMulNBits), which an
    adapter cannot override. The base is exported once in fp32 to find each module's LoRA inputs
    (the markers), then in `precision`, whose LoRA MatMulNBits nodes are put back as float MatMuls
    on inputs of the same names: the LoRA path stays float and an adapter converted for one
    precision fits the other."""
    from lorafleet.models import base_fingerprint

    names = _builder_with_template(model, out if precision == "fp32" else out / ".fp32", table, rank, "fp32", log)
    if precision != "fp32":
        shutil.rmtree(out / ".fp32", ignore_errors=True)
        _builder_with_template(model, out, table, rank, precision, log, find=False, quant_options=quant_options)
        float_lora_path(out, names, table, rank)
    inputs = {"source": str(model), "base_fingerprint": base_fingerprint(str(model))["fingerprint"],
              "max_rank": rank, "precision": precision,
              "modules": {mod: {**names[mod], "shape": [fout, fin]} for mod, (fin, fout) in table.items()}}
    (out / LORA_INPUTS).write_text(json.dumps(inputs, indent=1) + "\n")
    return inputs


def _builder_with_template(model: Path, out: Path, table: dict[str, tuple[int, int]], rank: int, precision: str,
                           log: Callable[[str], None], find: bool = True,
                           quant_options: dict[str, str] | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    template = out / ".lora-template"
    markers = write_template_adapter(table, rank, model, template)
    log(f"exporting {model} ({precision}) with LoRA inputs on {len(markers)} modules, rank up to {rank}")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out / ".cache"), "--extra_options", f"adapter_path={template}",
           *(f"{k}={v}" for k, v in (quant_options or {}).items())]
    res = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(out / ".cache", ignore_errors=True)
    shutil.rmtree(template, ignore_errors=True)
    if res.returncode != 0:
        raise UserError(f"ONNX export failed (builder exit {res.returncode}):\n{res.stderr.strip()[-2000:]}")
    return make_lora_inputs(out, markers) if find else {}


def float_lora_path(out: Path, names: dict[str, dict[str, str]], table: dict[str, tuple[int, int]], rank: int) -> None:
    """Replace each quantized LoRA MatMul (MatMulNBits on `NAME_Q4` or `NAME_Q8`) of a quantized export by a
    float MatMul on a zero-default graph input `NAME` ([K, N] float32), the name the fp32 export
    gave it. UserError when a LoRA input has no such node (an unknown builder layout)."""
    import onnx
    from onnx import helper, numpy_helper

    genai = json.loads((out / "genai_config.json").read_text())
    filename = genai["model"]["decoder"]["filename"]
    m = onnx.load(str(out / filename), load_external_data=True)
    shapes = {}
    for mod, (fin, fout) in table.items():
        shapes[names[mod]["A"]] = (fin, rank)
        shapes[names[mod]["B"]] = (rank, fout)
    drop, done = set(), set()
    nodes = []
    for node in m.graph.node:
        # the builder names a quantized weight NAME_Q4 (int4) or NAME_Q8 (int8)
        quantized = node.op_type == "MatMulNBits" and len(node.input) > 1 and re.search(r"_Q\d+$", node.input[1])
        weight = node.input[1][: quantized.start()] if quantized else None
        if weight in shapes:
            nodes.append(helper.make_node("MatMul", [node.input[0], weight], list(node.output), name=node.name + "_float"))
            drop.update(node.input[1:])
            done.add(weight)
        else:
            nodes.append(node)
    missing = sorted(set(shapes) - done)
    if missing:
        raise UserError(f"the quantized graph has no LoRA MatMul for {missing[:2]}; export with --precision fp32")
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    kept = [i for i in m.graph.initializer if i.name not in drop]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    for weight, shape in sorted(shapes.items()):
        m.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, np.float32), weight))
        m.graph.input.append(helper.make_tensor_value_info(weight, onnx.TensorProto.FLOAT, list(shape)))
    data = filename + ".data"
    (out / data).unlink(missing_ok=True)
    onnx.save_model(m, str(out / filename), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)


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


def check_fits(info: AdapterInfo, inputs: dict) -> None:
    """Refuse (UserError naming the module or the rank, and the fix) an adapter the export's
    LoRA inputs cannot hold: another base, a rank above the export's, a module without inputs."""
    why = unsupported(info, "edge")
    if why:
        raise UserError(f"adapter {info.name} cannot be used as an edge adapter: {why}")
    if info.rank > inputs["max_rank"]:
        raise UserError(f"adapter {info.name} has rank {info.rank}, above this export's max rank {inputs['max_rank']}; "
                        f"export the base again with --max-lora-rank {info.rank} (or more)")
    missing = sorted(m for m in lora_pairs(info.tensors, info.name) if m not in inputs["modules"])
    if missing:
        have = sorted({m.rsplit(".", 1)[-1] for m in inputs["modules"]})
        raise UserError(f"adapter {info.name} adapts {len(missing)} modules this export has no LoRA inputs for: "
                        f"{name_some(missing)} (it has {', '.join(have)}); export the base again with "
                        "--lora-target-modules naming them")
    shapes = {m + ".weight": v["shape"] for m, v in inputs["modules"].items()}
    check_against_base(info, shapes, inputs.get("base_fingerprint"))


def adapter_arrays(info: AdapterInfo) -> dict[str, np.ndarray]:
    """The adapter's tensors as float32 numpy arrays: safetensors without torch; pickled .bin
    weights (allow_pickle) through torch."""
    if info.pickled:
        from lorafleet.adapter import load_adapter_tensors

        return {k: v.float().numpy() for k, v in load_adapter_tensors(info).items()}
    from lorafleet.safetensors_header import read_float32

    return read_float32(info.weights)


def write_onnx_adapter(info: AdapterInfo, inputs: dict, out_dir: Path) -> Path:
    """Convert `info` for an export with LoRA inputs `inputs` into the directory `out_dir/NAME`:
    `adapter.onnx_adapter` (A^T and (scale * B)^T, zero-padded to the export's rank, under the
    graph's input names; peft's scale, `AdapterInfo.scale_for`), `edge_adapter.json` (what the edge
    gate checks: base fingerprint, rank, parameter shapes, the chat template it was trained with)
    and its lorafleet.json (the recorded evaluation). The directory appears whole or not at all."""
    import onnxruntime as ort

    from lorafleet.atomic import atomic_dir

    rank = inputs["max_rank"]
    params = {}
    for mod, (a, b) in lora_pairs(adapter_arrays(info), info.name).items():
        names, scale, r = inputs["modules"][mod], info.scale_for(mod), a.shape[0]
        a_t = np.zeros((a.shape[1], rank), np.float32)
        b_t = np.zeros((rank, b.shape[0]), np.float32)
        a_t[:, :r] = a.T
        b_t[:r, :] = (b * scale).T
        params[names["A"]] = a_t
        params[names["B"]] = b_t
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in params.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / info.name
    with atomic_dir(dest, overwrite=True) as tmp:
        fmt.export_adapter(str(tmp / WEIGHTS))
        (tmp / EDGE_ADAPTER).write_text(json.dumps({
            "name": info.name, "source": str(info.path), "rank": info.rank, "max_rank": rank,
            "base_fingerprint": inputs.get("base_fingerprint"), "modules": len(params) // 2,
            "parameters": {n: list(v.shape) for n, v in params.items()}, "template": info.template}, indent=1) + "\n")
        if info.manifest is not None:
            (tmp / "lorafleet.json").write_text(json.dumps(info.manifest, indent=2) + "\n")
    return dest / WEIGHTS


def convert_adapter(onnx_dir: Path, adapter_dir: Path, out_dir: Path | None = None, allow_pickle: bool = False) -> Path:
    """Convert one PEFT adapter for an existing export (no base re-export): checked against the
    export's LoRA inputs, written to `out_dir` (default: the export's adapters/). Returns the
    .onnx_adapter path; UserError (nothing written) when it does not fit."""
    inputs = read_lora_inputs(onnx_dir)
    info = read_adapter(adapter_dir, allow_pickle=allow_pickle)
    check_fits(info, inputs)
    return write_onnx_adapter(info, inputs, Path(out_dir) if out_dir else Path(onnx_dir) / ADAPTERS_DIR)


def adapter_template(onnx_dir: Path, name: str) -> str | None:
    meta = Path(onnx_dir) / ADAPTERS_DIR / name / EDGE_ADAPTER
    return json.loads(meta.read_text()).get("template") if meta.is_file() else None


def adapter_names(onnx_dir: Path) -> list[str]:
    d = Path(onnx_dir) / ADAPTERS_DIR
    return sorted(p.name for p in d.iterdir() if (p / EDGE_ADAPTER).is_file()) if d.is_dir() else []
