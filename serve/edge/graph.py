"""The exported decoder with one adapter per batch row, run by onnxruntime.

An open export (merge/onnx_adapters.py) makes each LoRA weight a graph input: `A` of shape
[K, r] and `B` of [r, N], feeding `MatMul(x, A)` then `MatMul(., B)` with x of [batch, seq, K].
ONNX MatMul broadcasts over leading dimensions (numpy's matmul rule), so declaring those inputs
[rows, K, r] and [rows, r, N] lets row i of the batch use its own adapter's weights, zeros for
the base. `rows` is 1 when every row uses the same weights (broadcast). That is the one change
to the graph, made in memory when the server starts: the export on disk stays what
onnxruntime-genai loads, and its external weights are read from the export's directory.

Attention is the builder's GroupQueryAttention, which reads each row's length from the
attention mask (seqlens_k = sum(mask) - 1) and writes its new keys after that row's own past:
rows of different lengths share one right-padded KV cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafleet.errors import UserError

DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class Step:
    """One graph call's result: logits [batch, seq, vocab] (float32) and the new KV cache, a list
    of (key, value) per layer, each [batch, kv_heads, total_len, head_size]."""
    logits: np.ndarray
    cache: list[tuple[np.ndarray, np.ndarray]]


class RowsGraph:
    """The decoder of the export at `onnx_dir` with per-row LoRA inputs.

    `lora_shapes` maps each LoRA input name to its per-adapter shape ([K, r] or [r, N]); an
    export without LoRA inputs has none. Raises UserError for a graph whose inputs this runner
    does not know (it feeds input_ids, attention_mask, optional position_ids, the past KV cache
    named in genai_config.json, and the LoRA inputs)."""

    def __init__(self, onnx_dir: Path, threads: int = 0):
        import onnx
        import onnxruntime as ort
        from onnx import helper

        self.dir = Path(onnx_dir)
        genai = json.loads((self.dir / "genai_config.json").read_text())["model"]
        dec = genai["decoder"]
        self.layers = int(dec["num_hidden_layers"])
        self.kv_heads, self.head_size = int(dec["num_key_value_heads"]), int(dec["head_size"])
        names = dec["inputs"]
        self.past = [(names["past_key_names"] % i, names["past_value_names"] % i) for i in range(self.layers)]
        outs = dec["outputs"]
        self.present = [(outs["present_key_names"] % i, outs["present_value_names"] % i) for i in range(self.layers)]
        self.logits_name = outs["logits"]
        lora_file = self.dir / "lora_inputs.json"
        lora = {m[p] for m in json.loads(lora_file.read_text())["modules"].values() for p in ("A", "B")} \
            if lora_file.is_file() else set()

        model = onnx.load(str(self.dir / dec["filename"]), load_external_data=False)
        self.lora_shapes: dict[str, tuple[int, ...]] = {}
        for inp in model.graph.input:
            if inp.name in lora:
                shape = tuple(d.dim_value for d in inp.type.tensor_type.shape.dim)
                self.lora_shapes[inp.name] = shape
                inp.CopyFrom(helper.make_tensor_value_info(inp.name, onnx.TensorProto.FLOAT, ["lora_rows", *shape]))
        # Their zero defaults: every call feeds them, and ONNX Runtime warns about overridable initializers.
        keep = [i for i in model.graph.initializer if i.name not in self.lora_shapes]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.dir))
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i.type for i in self.session.get_inputs()}
        known = {names["input_ids"], names["attention_mask"], "position_ids", *self.lora_shapes,
                 *(n for pair in self.past for n in pair)}
        unknown = sorted(set(self.inputs) - known)
        if unknown:
            raise UserError(f"the ONNX graph in {self.dir} has inputs the edge server does not feed: {unknown[:4]}; "
                            "export it with `lorafleet export-onnx`")
        self.ids_name, self.mask_name = names["input_ids"], names["attention_mask"]
        self.kv_dtype = DTYPES.get(self.inputs[self.past[0][0]], np.float32)
        self.outputs = [self.logits_name, *(n for pair in self.present for n in pair)]

    def empty_cache(self, rows: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
        """A KV cache of `rows` rows and length 0."""
        z = np.zeros((rows, self.kv_heads, 0, self.head_size), self.kv_dtype)
        return [(z, z) for _ in range(self.layers)]

    def run(self, ids: np.ndarray, lengths: np.ndarray, cache: list[tuple[np.ndarray, np.ndarray]],
            lora: dict[str, np.ndarray]) -> Step:
        """Run `ids` [batch, seq] (int64) after each row's `lengths[i]` cached tokens.

        `cache` holds at least max(lengths) positions per row (right-padded); `lora` maps every
        LoRA input to [batch or 1, *lora_shapes[name]] float32. Every row gets `seq` new tokens."""
        batch, seq = ids.shape
        width = cache[0][0].shape[2] + seq
        mask = (np.arange(width)[None, :] < (lengths[:, None] + seq)).astype(np.int64)
        feed = {self.ids_name: ids, self.mask_name: mask, **lora}
        if "position_ids" in self.inputs:
            feed["position_ids"] = lengths[:, None] + np.arange(seq)[None, :]
        for (k_name, v_name), (k, v) in zip(self.past, cache):
            feed[k_name], feed[v_name] = k, v
        out = self.session.run(self.outputs, feed)
        return Step(out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.layers)])


def read_onnx_adapter(path: Path, lora_shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """An `.onnx_adapter` file's parameters (onnxruntime's AdapterFormat) as float32 arrays, each
    checked against the graph's LoRA input of its name. Raises ValueError naming the parameter."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(path))
    params = {}
    for name, value in fmt.get_parameters().items():
        arr = np.array(value.numpy(), dtype=np.float32, copy=True)  # the file's buffer goes with `fmt`
        if name not in lora_shapes:
            raise ValueError(f"{path.name}: parameter {name} is not a LoRA input of this export")
        if tuple(arr.shape) != lora_shapes[name]:
            raise ValueError(f"{path.name}: parameter {name} is {list(arr.shape)}, the export's input is "
                             f"{list(lora_shapes[name])}")
        params[name] = arr
    return params
