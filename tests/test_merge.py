"""Merge stage on the tiny model: parity, streaming == peft, sharding, refusals, atomic output."""

from __future__ import annotations

import json
import resource
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fixtures import build_tiny_llama, make_random_adapter
from lorafleet.errors import UserError
from merge.run import merge_adapter

quiet = dict(log=lambda m: None)


def _weights(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("extra", [{}, {"use_rslora": True}])
def test_streaming_equals_peft(tiny_base, tmp_path, dtype, extra):
    ad = make_random_adapter(tiny_base, tmp_path / "ad", seed=4, r=8, alpha=24, **extra)
    s = merge_adapter(ad, tmp_path / "s", base=str(tiny_base), dtype=dtype, method="streaming", **quiet)
    p = merge_adapter(ad, tmp_path / "p", base=str(tiny_base), dtype=dtype, method="peft", **quiet)
    a, b = _weights(s), _weights(p)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == getattr(torch, dtype)
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=0)  # bit-identical
    rep = json.loads((s / "merge_report.json").read_text())
    assert rep["method"] == "streaming" and rep["merged_modules"] == 8
    assert rep["parity"]["greedy_tokens_agree"]
    assert rep["parity"]["max_abs_logits_diff"] < rep["parity"]["adapter_effect_max_abs"] / 10


def test_merged_dir_is_complete_and_sharded(tiny_base, tiny_adapters, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge_adapter(tiny_adapters / "alpha", tmp_path / "m", base=str(tiny_base), dtype="float16",
                        max_shard_bytes=200_000, **quiet)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    for f in ["config.json", "tokenizer.json", "merge_report.json"]:
        assert (out / f).is_file(), f
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_merged_model_uses_the_adapter_template(train_cfg, tiny_base, tmp_path):
    from transformers import AutoTokenizer

    from lorafleet.templates import SEED_TEMPLATE
    from train.recipe import run

    ad = run(train_cfg(output_dir=str(tmp_path / "trained")), **quiet)
    out = merge_adapter(ad, tmp_path / "m", dtype="bfloat16", **quiet)  # base read from the manifest
    assert AutoTokenizer.from_pretrained(out).chat_template == SEED_TEMPLATE


def test_refusals_leave_nothing(tiny_base, tiny_adapters, tmp_path):
    out = tmp_path / "m"
    # adapter for another base
    other = build_tiny_llama(tmp_path / "other", __import__("pathlib").Path(__file__).parents[1], hidden=192)
    foreign = make_random_adapter(other, tmp_path / "foreign", seed=1)
    with pytest.raises(UserError, match="another base"):
        merge_adapter(foreign, out, base=str(tiny_base), **quiet)
    # missing weights / corrupt weights / pickle only
    broken = tmp_path / "broken"
    shutil.copytree(tiny_adapters / "alpha", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt"):
        merge_adapter(broken, out, base=str(tiny_base), **quiet)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="adapter_model.safetensors is missing"):
        merge_adapter(broken, out, base=str(tiny_base), **quiet)
    torch.save(load_file(tiny_adapters / "alpha" / "adapter_model.safetensors"), broken / "adapter_model.bin")
    with pytest.raises(UserError, match="pickle"):
        merge_adapter(broken, out, base=str(tiny_base), **quiet)
    merge_adapter(broken, out, base=str(tiny_base), allow_pickle=True, **quiet)  # explicit opt-in works
    # existing output
    with pytest.raises(UserError, match="already exists"):
        merge_adapter(tiny_adapters / "alpha", out, base=str(tiny_base), **quiet)
    # quantized base
    q = tmp_path / "qbase"
    shutil.copytree(tiny_base, q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="full-precision"):
        merge_adapter(tiny_adapters / "alpha", tmp_path / "q-out", base=str(q), **quiet)
    assert not (tmp_path / "q-out").exists()
    assert not list(tmp_path.glob(".*tmp-*"))


def test_parity_failure_removes_output(tiny_base, tiny_adapters, tmp_path):
    with pytest.raises(UserError, match="parity check failed"):
        merge_adapter(tiny_adapters / "alpha", tmp_path / "m", base=str(tiny_base), dtype="bfloat16",
                      tolerance=1e-9, **quiet)
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.tmp-*"))


def test_dora_goes_through_peft(tiny_base, tmp_path):
    ad = make_random_adapter(tiny_base, tmp_path / "dora", seed=3, use_dora=True)
    with pytest.raises(UserError, match="DoRA"):
        merge_adapter(ad, tmp_path / "x", base=str(tiny_base), method="streaming", **quiet)
    out = merge_adapter(ad, tmp_path / "m", base=str(tiny_base), dtype="float16", **quiet)
    rep = json.loads((out / "merge_report.json").read_text())
    assert rep["method"] == "peft" and rep["parity"]["greedy_tokens_agree"]


def _merge_cmd(tiny_base, adapter, out):
    return [sys.executable, "-m", "lorafleet.cli", "merge", "--base", str(tiny_base), "--adapter", str(adapter),
            "--out", str(out), "--dtype", "float32"]


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_file_size_limit_during_merge_leaves_nothing(tiny_base, tiny_adapters, tmp_path, root):
    """A write that fails half-way (ulimit -f): a clear error, no output, no temp dir left."""
    out = tmp_path / "m"
    res = subprocess.run(_merge_cmd(tiny_base, tiny_adapters / "alpha", out), cwd=root, capture_output=True,
                         text=True, preexec_fn=_limit_file_size(256 * 1024))
    said = " ".join((res.stdout + res.stderr).split())
    assert res.returncode == 2, said[-2000:]
    assert "a file grew past the file-size limit" in said and "nothing was written" in said, said[-2000:]
    assert "Traceback" not in said
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_full_disk_during_merge_leaves_nothing(tiny_base, tiny_adapters, tmp_path, root):
    """A real ENOSPC: the output directory lives on a 512 KiB tmpfs (mounted in a user namespace)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {disk}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here ({probe.stderr.strip()}); "
                    "the file-size-limit test covers the same path")
    cmd = " ".join(shlex.quote(c) for c in _merge_cmd(tiny_base, tiny_adapters / "alpha", disk / "m"))
    script = (f"mount -t tmpfs -o size=512k tmpfs {disk} && {cmd}; echo rc=$?; "
              f"echo left: $(ls -A {disk}); df -k {disk} | tail -1")
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=root, capture_output=True, text=True)
    said = " ".join((res.stdout + res.stderr).split())
    assert "rc=2" in said, said[-3000:]
    assert "the disk is full (no space left on device)" in said and "Traceback" not in said
    assert "left: tmpfs" in said  # nothing after "left:": neither the model nor its temp dir remains


def test_a_qlora_adapter_is_merged_into_the_weights_it_was_trained_on(train_cfg, tmp_path):
    """Trained on the NF4 base (bitsandbytes on CPU), the adapter's model is dequant(NF4(W)) + BA:
    the report measures both merges against it, and the default one is the closer."""
    pytest.importorskip("bitsandbytes")
    from train.recipe import run

    adapter = run(train_cfg(quantization={"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"},
                            lora__target_modules="all-linear", training__max_steps=4, training__learning_rate=5e-3),
                  log=lambda m: None)
    logs: list[str] = []
    merge_adapter(adapter, tmp_path / "auto", dtype="float32", log=logs.append)
    merge_adapter(adapter, tmp_path / "original", dtype="float32", base_weights="original", log=lambda m: None)
    auto = json.loads((tmp_path / "auto" / "merge_report.json").read_text())["qlora"]
    original = json.loads((tmp_path / "original" / "merge_report.json").read_text())["qlora"]
    assert auto["base_weights"] == "dequantized" and original["base_weights"] == "original"
    assert auto["dequantized_layers"] == 14 and auto["quantization"]["bnb_4bit_quant_type"] == "nf4"
    for q in (auto, original):
        assert set(q) >= {"max_abs_logits_diff", "greedy_agreement", "answer_loglik_trained", "answer_loglik_merged"}
    # float32 compute: the dequantized merge is the trained model up to float rounding
    # what is left of the dequantized merge's gap is bitsandbytes' own 4-bit CPU arithmetic
    assert auto["max_abs_logits_diff"] * 10 < original["max_abs_logits_diff"]
    assert auto["greedy_agreement"] == 1.0 > original["greedy_agreement"]
    assert abs(auto["answer_loglik_merged"] - auto["answer_loglik_trained"]) < 0.01
    assert any("trained on a 4-bit nf4 base" in m for m in logs)
    plain = run(train_cfg(output_dir=str(tmp_path / "plain")), log=lambda m: None)
    with pytest.raises(UserError, match="was not trained on a 4-bit base"):
        merge_adapter(plain, tmp_path / "x", base_weights="dequantized", log=lambda m: None)
    assert not (tmp_path / "x").exists()
