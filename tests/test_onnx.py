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


def test_edge_adapters_hot_swap_on_one_base_graph(tiny_base, tiny_adapters, tmp_path):
    """One base graph + an .onnx_adapter per adapter (different ranks and targets), each equal to peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = export_onnx(tiny_base, tmp_path / "edge", adapters=[tiny_adapters / "alpha", tiny_adapters / "beta"],
                      **quiet)
    rep = json.loads((out / "onnx_report.json").read_text())
    assert set(rep["adapters"]) == {"alpha", "beta"}
    for r in [rep, *rep["adapters"].values()]:
        assert r["max_abs_logits_diff"] < 1e-3
        assert r["greedy_tokens_matched"] == r["greedy_tokens_compared"] > 0
    assert (out / "adapters/alpha/adapter.onnx_adapter").is_file() and (out / "adapters/beta/adapter.onnx_adapter").is_file()

    # Switching adapters on the same loaded graph changes the answer exactly as peft does.
    ids = [5, 17, 33, 2, 41, 9]
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    with torch.no_grad():
        want = {"base": base(torch.tensor([ids])).logits[0, -1]}
        for name in ("alpha", "beta"):
            pm = PeftModel.from_pretrained(base, str(tiny_adapters / name))
            want[name] = pm(torch.tensor([ids])).logits[0, -1]
            base = pm.unload()
    got = {"base": OnnxGenerator(out).last_logits(ids),
           **{n: OnnxGenerator(out, adapter=n).last_logits(ids) for n in ("alpha", "beta")}}
    for name in want:
        assert abs(want[name].numpy() - got[name]).max() < 1e-3, name
    assert abs(got["alpha"] - got["beta"]).max() > 1e-2  # the adapters really differ
    assert isinstance(generate_text(out, "hello", max_new_tokens=4, adapter="beta"), str)
    with pytest.raises(UserError, match="not in .*exported adapters: alpha, beta"):
        OnnxGenerator(out, adapter="gamma")


def test_edge_adapters_refusals(tiny_base, tiny_adapters, tmp_path):
    dora = tmp_path / "dora"
    import shutil

    shutil.copytree(tiny_adapters / "alpha", dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(UserError, match="DoRA.*merge it"):
        export_onnx(tiny_base, tmp_path / "e", adapters=[dora], **quiet)
    assert not (tmp_path / "e").exists()


def test_open_export_takes_an_adapter_trained_later(tiny_base, tiny_adapters, tmp_path):
    """The base exported once with LoRA inputs and no adapter; an adapter converted afterwards on
    its own equals peft; one that does not fit is refused naming the rank or the module."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from merge.onnx_adapters import convert_adapter, read_lora_inputs

    out = export_onnx(tiny_base, tmp_path / "open", max_lora_rank=16, **quiet)
    inputs = read_lora_inputs(out)
    assert inputs["max_rank"] == 16 and len(inputs["modules"]) == 2 * 7  # 2 layers x 7 projections
    convert_adapter(out, tiny_adapters / "beta")
    ids = [5, 17, 33, 2, 41, 9]
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, str(tiny_adapters / "beta"))(torch.tensor([ids])).logits[0, -1].numpy()
    assert abs(OnnxGenerator(out, adapter="beta").last_logits(ids) - want).max() < 1e-3

    narrow = export_onnx(tiny_base, tmp_path / "narrow", lora_target_modules=["q_proj"], max_lora_rank=8, **quiet)
    with pytest.raises(UserError, match="rank 16, above this export's max rank 8.*--max-lora-rank 16"):
        convert_adapter(narrow, tiny_adapters / "beta")
    with pytest.raises(UserError, match="no LoRA inputs for.*v_proj.*--lora-target-modules"):
        convert_adapter(narrow, tiny_adapters / "alpha")
    assert not (narrow / "adapters").exists() or not any((narrow / "adapters").iterdir())
    with pytest.raises(UserError, match="without LoRA inputs"):
        convert_adapter(tmp_path / "nowhere", tiny_adapters / "beta")


@pytest.mark.parametrize("precision, options", [("int4", {}), ("int8", {}), ("int4", {"accuracy_level": "1"})])
def test_quantized_export_keeps_the_lora_path_float(tiny_base, tiny_adapters, tmp_path, precision, options):
    """int4/int8 weights with float LoRA inputs of the fp32 export's names: an adapter converted for
    the fp32 export fits the quantized one, changes its answers, and the report gives its distance
    from peft; the builder's quantization options reach it."""
    import onnx

    from lorafleet.edge_adapter import check_edge_adapter, read_edge_adapter, read_lora_inputs

    logs = []
    q = export_onnx(tiny_base, tmp_path / "q", precision=precision, adapters=[tiny_adapters / "alpha"],
                    log=logs.append, quant_options=options)
    f = export_onnx(tiny_base, tmp_path / "f32", max_lora_rank=16, **quiet)
    inputs_q, inputs_f = read_lora_inputs(q), read_lora_inputs(f)
    assert inputs_q["precision"] == precision and inputs_q["modules"] == inputs_f["modules"]
    graph = onnx.load(str(q / "model.onnx"), load_external_data=False).graph
    lora_matmuls = [n for n in graph.node if "lora" in n.name and n.op_type != "Add"]
    assert len(lora_matmuls) == 2 * len(inputs_q["modules"]) and {n.op_type for n in lora_matmuls} == {"MatMul"}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]  # the base weights are quantized
    assert nbits and {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {int(precision[3:])}
    if options:
        assert {a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"} == {1}
    check_edge_adapter(read_edge_adapter(q / "adapters" / "alpha"), inputs_f)  # the same file fits fp32
    rep = json.loads((q / "onnx_report.json").read_text())
    assert set(rep["adapters"]) == {"alpha"} and rep["adapters"]["alpha"]["greedy_tokens_compared"] > 0
    assert rep["quant_options"] == options
    ids = [5, 17, 33, 2, 41, 9]
    assert abs(OnnxGenerator(q).last_logits(ids) - OnnxGenerator(q, adapter="alpha").last_logits(ids)).max() > 1e-2
    if rep.get("warnings"):  # a random tiny model at int4 usually misses it: said loudly
        assert any("WARNING" in m and "int8" in m for m in logs)
