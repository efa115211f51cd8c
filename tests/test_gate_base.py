"""The gate judges adapters against the base the engine actually loads: a hub id (read from the
local Hugging Face cache), a base with pickled `.bin` weights, and the engine's own
--lora-target-modules. An adapter with tensors that would not be applied is refused (422, the
tensors named) at scan time, so /v1/models never lists it."""

from __future__ import annotations

import shutil

import pytest

from fixtures import build_tiny_llama, make_random_adapter
from lorafleet.models import module_shapes
from serve.errors import OpenAIError
from serve.registry import AdapterRegistry


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, root):
    """A base of another width (hidden 64): its adapters do not fit the tiny base."""
    return build_tiny_llama(tmp_path_factory.mktemp("other") / "base", root, hidden=64)


@pytest.fixture(scope="module")
def sources(tiny_base, other_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("gate-sources")
    make_random_adapter(tiny_base, d / "fits", seed=1)
    make_random_adapter(other_base, d / "other", seed=2)
    make_random_adapter(tiny_base, d / "qk", seed=3, targets=("q_proj", "k_proj"))
    return d


def hub_cache(tmp_path, base, repo_id: str):
    """`base` laid out as huggingface_hub caches a downloaded repo (what vLLM leaves after it loads one)."""
    repo = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(base, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snap.name)
    return tmp_path / "hub"


def judged(registry: AdapterRegistry) -> tuple[list[str], dict[str, str]]:
    registry.scan()
    return [a.name for a in registry.servable()], dict(registry.rejected)


def test_a_hub_id_base_is_read_from_the_local_cache(sources, tiny_base, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # HF_HUB_CACHE as the process would have had it from its start
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache(tmp_path, tiny_base, "acme/tiny-llama")))
    assert module_shapes("acme/tiny-llama") == module_shapes(str(tiny_base))
    assert module_shapes("acme/not-cached") == {}
    reg = AdapterRegistry([str(sources)], tmp_path / "cache", base_shapes=lambda: module_shapes("acme/tiny-llama"))
    served, refused = judged(reg)
    assert served == ["fits", "qk"]
    assert "other" in refused and "made for another base model" in refused["other"]
    with pytest.raises(OpenAIError) as e:
        reg.prepare(reg.get("other"))
    assert e.value.status == 422 and "lora_A" in e.value.message


def test_a_base_with_pickled_weights(sources, tiny_base, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    binary = tmp_path / "bin-base"  # as older checkpoints ship: config and pytorch_model.bin
    shutil.copytree(tiny_base, binary, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).state_dict(),
               binary / "pytorch_model.bin")
    assert not list(binary.glob("*.safetensors")) and list(binary.glob("*.bin"))
    assert module_shapes(str(binary)) == module_shapes(str(tiny_base))
    served, refused = judged(AdapterRegistry([str(sources)], tmp_path / "cache",
                                             base_shapes=lambda: module_shapes(str(binary))))
    assert served == ["fits", "qk"] and "other" in refused


def test_tensors_outside_the_engines_target_modules_are_refused_naming_them(sources, tiny_base, tmp_path):
    from serve.deployment import lora_target_modules, packed_modules_mapping

    targets = lora_target_modules(["--enable-prefix-caching", "--lora-target-modules", "q_proj"])
    assert targets == ["q_proj"]
    packed = packed_modules_mapping(str(tiny_base))
    assert packed["qkv_proj"] == ["q_proj", "k_proj", "v_proj"]  # vLLM's Llama
    reg = AdapterRegistry([str(sources)], tmp_path / "cache", base_shapes=module_shapes(str(tiny_base)),
                          lora_target_modules=targets, packed_modules=packed)
    served, refused = judged(reg)
    # q and k live in vLLM's packed qkv_proj, which q_proj enables; o_proj and down_proj get no LoRA
    assert served == ["qk"]
    assert "o_proj.lora_A" in refused["fits"] and "--lora-target-modules q_proj" in refused["fits"]
    assert "v_proj" not in refused["fits"].split(":", 1)[1].split(";")[0]


def test_a_module_the_base_lacks_is_named(tiny_base, tmp_path):
    """peft saved the adapter under other module names (another architecture's): none would apply."""
    make_random_adapter(tiny_base, tmp_path / "src" / "renamed", seed=4)
    from safetensors.torch import load_file, save_file

    f = tmp_path / "src" / "renamed" / "adapter_model.safetensors"
    save_file({k.replace("self_attn", "attention"): v for k, v in load_file(f).items()}, f)
    served, refused = judged(AdapterRegistry([str(tmp_path / "src")], tmp_path / "cache",
                                             base_shapes=module_shapes(str(tiny_base))))
    assert served == [] and "would not be applied" in refused["renamed"] and "attention.q_proj" in refused["renamed"]
