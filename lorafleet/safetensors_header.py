"""The one reader of safetensors headers: shapes, dtypes and byte offsets, no tensor data.

Format (https://github.com/huggingface/safetensors#format): 8 bytes little-endian u64 N, then N
bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data section; offsets are relative to its start. Used for adapter tensor shapes, base
model shapes and fingerprints, and the streaming merge's offset reads.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from lorafleet.errors import UserError

# A header larger than this is not a safetensors file (the library refuses 100 MB too).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(f: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """(name -> {"dtype", "shape", "data_offsets"}, byte offset where the data section starts).

    Raises UserError naming the file when it is truncated, garbled or not safetensors.
    """
    f = Path(f)
    try:
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            n = struct.unpack("<Q", raw)[0]
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(fh.read(n))
            size = fh.seek(0, 2)
    except (OSError, ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{f} is corrupt or truncated ({e}); copy it again") from None
    if not isinstance(header, dict):
        raise UserError(f"{f} is corrupt: its header is not a JSON object; copy it again")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, meta in header.items():
        try:
            begin, end = meta["data_offsets"]
            meta["shape"] = [int(d) for d in meta["shape"]]
            ok = 0 <= begin <= end and data_start + end <= size and isinstance(meta["dtype"], str)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"{f} is corrupt or truncated (tensor {name!r} lies outside the file); copy it again")
    return header, data_start


def shapes(f: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of one safetensors file."""
    return {name: meta["shape"] for name, meta in read_header(f)[0].items()}


def directory_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Tensor name -> shape over every `*.safetensors` file of a model directory."""
    out: dict[str, list[int]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(shapes(f))
    return out


def read_float32(f: Path) -> dict[str, Any]:
    """Every tensor of one safetensors file as a float32 numpy array, without torch (the edge image
    has none). F32, F16 and BF16 are read (bfloat16 is the top half of a float32, so it is widened
    by a 16-bit shift); other dtypes raise UserError naming the tensor.
    """
    import numpy as np

    header, data_start = read_header(f)
    out = {}
    with open(f, "rb") as fh:
        for name, meta in header.items():
            begin, end = meta["data_offsets"]
            fh.seek(data_start + begin)
            raw = fh.read(end - begin)
            dt = meta["dtype"]
            if dt == "F32":
                arr = np.frombuffer(raw, "<f4")
            elif dt == "F16":
                arr = np.frombuffer(raw, "<f2").astype(np.float32)
            elif dt == "BF16":
                arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                raise UserError(f"{f}: tensor {name!r} is {dt}; LoRA factors must be F32, F16 or BF16")
            out[name] = arr.reshape(meta["shape"]).copy()
    return out
