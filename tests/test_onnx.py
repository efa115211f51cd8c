"""ONNX export of a merged tiny model: parity with PyTorch, generation with onnxruntime-genai."""

from __future__ import annotations

import json

import pytest
import torch

from lorafleet.errors import UserError
from merge.onnx import OnnxGenerator, export_onnx, generate_text
from merge.run import merge_adapter

quiet = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def merged(tiny_base, tiny_adapters, tmp_path_factory):
    return merge_adapter(tiny_adapters / "alpha", tmp_path_factory.mktemp("m") / "merged", base=str(tiny_base),
                         dtype="float16", **quiet)


def test_fp32_export_matches_pytorch_and_generates(merged, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_onnx(merged, tmp_path / "onnx", precision="fp32", **quiet)
    rep = json.loads((out / "onnx_report.json").read_text())
    assert rep["max_abs_logits_diff"] < 1e-2
    assert rep["greedy_tokens_matched"] == rep["greedy_tokens_compared"] > 0
    assert (out / "model.onnx").is_file() and (out / "model.onnx.data").is_file()  # external data
    # KV cache: the graph takes past key values
    import onnx

    inputs = [i.name for i in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.input]
    assert any(n.startswith("past_key_values") for n in inputs)
    # generation equals transformers greedy on the same prompt ids
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok("The Kestrel K9")["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    ref = ref[0][len(ids):].tolist()
    assert OnnxGenerator(out).greedy(ids, 8)[: len(ref)] == ref
    assert isinstance(generate_text(out, "hello", max_new_tokens=4), str)


def test_int8_export_is_reported_not_hidden(merged, tmp_path):
    out = export_onnx(merged, tmp_path / "onnx8", precision="int8", **quiet)
    rep = json.loads((out / "onnx_report.json").read_text())
    assert rep["precision"] == "int8" and rep["tolerance"] is None
    assert rep["max_abs_logits_diff"] > 0 and "model.onnx.data" in rep["files_mb"]
    with pytest.raises(UserError, match="parity check failed"):
        export_onnx(merged, tmp_path / "onnx8-strict", precision="int8", tolerance=1e-9, **quiet)
    assert not (tmp_path / "onnx8-strict").exists()


def test_export_errors(tmp_path):
    with pytest.raises(UserError, match="not an HF model directory"):
        export_onnx(tmp_path, tmp_path / "o", **quiet)
    with pytest.raises(UserError, match="precision"):
        export_onnx(tmp_path, tmp_path / "o", precision="fp8", **quiet)
    with pytest.raises(UserError, match="not an exported ONNX model"):
        OnnxGenerator(tmp_path)
