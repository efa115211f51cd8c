"""Merge an adapter into a base model one tensor at a time.

peft's `merge_and_unload` holds the whole model in memory. Here the base safetensors are read
tensor by tensor (plain reads at the offsets their header gives), `scale · (B @ A)` is added to
each targeted weight in float32, the result is cast to the output dtype and written straight
into the output shard at an offset fixed in advance (the safetensors header lists every shape, so it can be written
before any data). Peak memory: the largest tensor plus the adapter, whatever the model size.

Which adapters it takes is `lorafleet.adapter.unsupported(info, "streaming")`'s answer (plain
linear LoRA factors, any per-module rank/alpha pattern, rsLoRA); the rest go through peft.
The arithmetic follows peft's (`W.float() + (B @ A) * scale` with W already in the output dtype,
rounded to it), so the result equals peft's merge; tests/test_merge.py checks it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable

import torch

from lorafleet.adapter import AdapterInfo, lora_deltas
from lorafleet.errors import UserError
from lorafleet.safetensors_header import read_header

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
ST_TO_TORCH = {v: k for k, v in ST_DTYPES.items()}


def read_tensor(fh, dtype: str, start: int, end: int, shape: list[int]) -> torch.Tensor:
    # Plain reads, not mmap: a memory-mapped file keeps every page it touched resident, so
    # reading a whole model through mmap costs the model's size in RSS.
    fh.seek(start)
    buf = bytearray(end - start)
    fh.readinto(buf)
    if not buf:
        return torch.empty(shape, dtype=ST_TO_TORCH[dtype])
    return torch.frombuffer(buf, dtype=ST_TO_TORCH[dtype]).reshape(shape)


def _base_files(base_dir: Path) -> list[Path]:
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"base model {base_dir} has no .safetensors weights; convert it first "
                        "(pickle .bin checkpoints are not read)")
    return files


def stream_merge(base_dir: Path, info: AdapterInfo, out_dir: Path, dtype: torch.dtype,
                 max_shard_bytes: int = 2 * 1024**3, progress: Callable[[int, int], None] | None = None
                 ) -> dict[str, Any]:
    pairs = lora_deltas(info)
    files = _base_files(base_dir)
    # 1. plan: every tensor's name, output dtype and shape, in file order; cut into shards
    plan: list[tuple[Path, str, str, list[int]]] = []
    sources: dict[tuple[Path, str], tuple[str, int, int]] = {}  # (file, name) -> (dtype, start, end)
    for f in files:
        header, data_start = read_header(f)
        for name, meta in header.items():
            src = meta["dtype"]
            floating = src in ("F32", "F16", "BF16", "F64")
            plan.append((f, name, ST_DTYPES[dtype] if floating else src, list(meta["shape"])))
            a, b = meta["data_offsets"]
            sources[(f, name)] = (src, data_start + a, data_start + b)
    missing = sorted(set(pairs) - {p[1] for p in plan})
    if missing:
        raise UserError(f"adapter {info.name} targets {missing[:3]}{'…' if len(missing) > 3 else ''}, which the base "
                        f"model {base_dir} does not have; it was trained on another base")
    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    shards: list[list[tuple[Path, str, str, list[int]]]] = [[]]
    size = 0
    for entry in plan:
        n = itemsize[entry[2]]
        for d in entry[3]:
            n *= d
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    # 2. write each shard: header first (offsets known), then tensors one at a time
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    weight_map, merged, done, total = {}, 0, 0, len(plan)
    for shard, fname in zip(shards, names):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for _, name, dt, shape in shard:
            n = itemsize[dt]
            for d in shape:
                n *= d
            header[name] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        hbytes += b" " * (-len(hbytes) % 8)  # align the data section like safetensors does
        open_files: dict[Path, Any] = {}
        with open(out_dir / fname, "wb") as out:
            out.write(struct.pack("<Q", len(hbytes)))
            out.write(hbytes)
            for f, name, dt, shape in shard:
                if f not in open_files:
                    for fh in open_files.values():
                        fh.close()
                    open_files = {f: open(f, "rb")}  # one base file open at a time
                t = read_tensor(open_files[f], *sources[(f, name)], shape)
                if name in pairs:
                    a, b, scale = pairs[name]
                    if list(b.shape[:1]) + list(a.shape[1:]) != list(t.shape):
                        raise UserError(f"adapter {info.name}: LoRA for {name} has shape "
                                        f"{[b.shape[0], a.shape[1]]} but the base weight is {list(t.shape)}; "
                                        "it was trained on another base")
                    delta = (b.float() @ a.float()) * scale
                    # Like peft on a base loaded in the output dtype: round the base weight to
                    # that dtype, add in float32, round once more. Same bits as merge_and_unload.
                    t = t.to(ST_TO_TORCH[dt]).float() + delta
                    merged += 1
                t = t.to(ST_TO_TORCH[dt]).contiguous()
                if t.numel():
                    out.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                del t
                done += 1
                if progress:
                    progress(done, total)
        for fh in open_files.values():
            fh.close()
    if len(names) > 1:
        idx = {"metadata": {"total_size": sum((out_dir / n).stat().st_size for n in names)}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))
    return {"tensors": total, "merged_modules": merged, "shards": len(names)}
