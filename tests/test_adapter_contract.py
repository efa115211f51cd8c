"""The adapter contract read as PEFT reads it: every adapter here is built by peft itself on the
tiny model; the reference for a merge is peft's own `merge_and_unload`, for the serve gate the
vLLM engine's own load.

- per-module rank/alpha patterns with regex keys (and a key that matches nothing), no
  `lora_alpha`, rsLoRA, DoRA, LoRA on embeddings, modules_to_save, a resized vocabulary with the
  adapter's tokenizer, base-changing inits (PiSSA/OLoRA merged as peft does; CorDA, LoftQ,
  randomised PiSSA refused naming the key);
- a property test over random LoRA configs peft accepts: streaming merge == peft merge;
- the serve gate's answer == what the engine does with the adapter.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures import make_random_adapter
from lorafleet.adapter import parse_tensor_key, read_adapter, unsupported
from lorafleet.errors import UserError
from merge.run import merge_adapter

quiet = dict(log=lambda m: None)
REGEX = r"layers\.1\.self_attn\.(q_proj|v_proj)"
PATTERNED = dict(r=8, alpha=16, rank_pattern={REGEX: 4}, alpha_pattern={REGEX: 64, "_proj": 2})


def _weights(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def peft_merge(base: Path, adapter: Path, dtype=torch.float32, vocab: int | None = None) -> dict[str, torch.Tensor]:
    """The reference: peft's merge_and_unload, with the vocabulary resized first when asked."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if vocab:
        model.resize_token_embeddings(vocab)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 0.0):
    assert got.keys() >= {k for k in want if k != "lm_head.weight" or k in got}
    for k, v in want.items():
        if k in got:
            torch.testing.assert_close(got[k].float(), v.float(), rtol=0, atol=atol, msg=k)


def peft_scales(base: Path, **lora) -> dict[str, tuple[int, float]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**lora))
    return {n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
            for n, m in pm.named_modules() if isinstance(getattr(m, "scaling", None), dict) and m.scaling}


# --------------------------------------------------------------------------- reading
def test_tensor_names_as_every_trainer_writes_them():
    cases = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ("model.layers.0.self_attn.q_proj", "lora_A", "weight"),
        "model.layers.0.self_attn.q_proj.lora_B.default.weight": ("model.layers.0.self_attn.q_proj", "lora_B", "weight"),
        "base_model.model.model.embed_tokens.lora_embedding_A": ("model.embed_tokens", "lora_embedding_A", ""),
        "base_model.model.model.embed_tokens.lora_embedding_B.default": ("model.embed_tokens", "lora_embedding_B", ""),
        "base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector.weight":
            ("model.layers.1.mlp.up_proj", "lora_magnitude_vector", "weight"),
        "base_model.model.model.layers.1.mlp.up_proj.lora_B.bias": ("model.layers.1.mlp.up_proj", "lora_B", "bias"),
        "base_model.model.lm_head.modules_to_save.weight": ("lm_head", "full", "weight"),
        "base_model.model.lm_head.original_module.weight": ("lm_head", "full", "weight"),
        "base_model.model.model.embed_tokens.weight": ("model.embed_tokens", "full", "weight"),
    }
    for key, want in cases.items():
        got = parse_tensor_key(key)
        assert (got.module, got.kind, got.param) == want, key


def test_per_module_rank_and_scale_are_peft_s(tiny_base, tmp_path):
    """Regex pattern keys (layer 1's q/v) and a key without a '.' boundary ("_proj": matches nothing)."""
    ad = make_random_adapter(tiny_base, tmp_path / "p", seed=1, **PATTERNED)
    info = read_adapter(ad)
    want = peft_scales(tiny_base, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                       rank_pattern={REGEX: 4}, alpha_pattern={REGEX: 64, "_proj": 2})
    assert {m: (info.rank_and_alpha(m)[0], info.scale_for(m)) for m in want} == want
    assert sorted({s for _, s in want.values()}) == [2.0, 16.0]  # the pattern really bites
    assert info.rank == 8


def test_missing_lora_alpha_is_peft_s_default(tiny_base, tmp_path):
    ad = make_random_adapter(tiny_base, tmp_path / "a", seed=2, r=4, alpha=32)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    info = read_adapter(ad)
    assert info.scale_for("model.layers.0.self_attn.q_proj") == 8 / 4
    out = merge_adapter(ad, tmp_path / "m", base=str(tiny_base), dtype="float32", **quiet)
    assert json.loads((out / "merge_report.json").read_text())["method"] == "streaming"
    assert_same(_weights(out), peft_merge(tiny_base, ad))


# --------------------------------------------------------------------------- merging
@pytest.mark.parametrize("kind", ["patterned", "rslora", "dora", "embeddings", "modules_to_save"])
def test_merge_equals_peft(tiny_base, tmp_path, kind):
    extra = {"patterned": PATTERNED,
             "rslora": dict(r=8, alpha=16, use_rslora=True, rank_pattern={REGEX: 2}),
             "dora": dict(use_dora=True),
             "embeddings": dict(targets=("q_proj", "embed_tokens")),
             "modules_to_save": dict(modules_to_save=["lm_head"])}[kind]
    ad = make_random_adapter(tiny_base, tmp_path / kind, seed=3, **extra)
    out = merge_adapter(ad, tmp_path / "m", base=str(tiny_base), dtype="float32", **quiet)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == ("streaming" if kind in ("patterned", "rslora") else "peft")
    assert report["parity"]["max_abs_logits_diff"] < 1e-3
    assert_same(_weights(out), peft_merge(tiny_base, ad))


@pytest.mark.parametrize("dtype,atol", [("bfloat16", 0.0), ("float16", 0.0)])
def test_patterned_streaming_merge_in_half_precision(tiny_base, tmp_path, dtype, atol):
    ad = make_random_adapter(tiny_base, tmp_path / "p", seed=5, **PATTERNED)
    out = merge_adapter(ad, tmp_path / "m", base=str(tiny_base), dtype=dtype, method="streaming", **quiet)
    assert_same(_weights(out), peft_merge(tiny_base, ad, dtype=getattr(torch, dtype)), atol=atol)


def _added_tokens_adapter(tiny_base: Path, out: Path, save_tokenizer: bool = True,
                          targets=("q_proj", "v_proj"), modules_to_save=("embed_tokens", "lm_head"),
                          save_embedding_layers: bool | str = "auto") -> Path:
    """As unsloth / LLaMA-Factory / axolotl save it: 3 new tokens, resized embed_tokens and lm_head
    in modules_to_save, the tokenizer next to the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool_call|>", "<|/tool_call|>"]})
    tok.add_tokens(["KestrelK9"])
    model.resize_token_embeddings(len(tok))
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(targets),
                                          modules_to_save=list(modules_to_save) or None))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(out, save_embedding_layers=save_embedding_layers)
    if save_tokenizer:
        tok.save_pretrained(out)
    return out


def test_resized_vocabulary_merges_with_the_adapter_s_tokenizer(tiny_base, tmp_path):
    from transformers import AutoTokenizer

    ad = _added_tokens_adapter(tiny_base, tmp_path / "newtok")
    base_vocab = len(AutoTokenizer.from_pretrained(tiny_base))
    out = merge_adapter(ad, tmp_path / "m", base=str(tiny_base), dtype="float32", **quiet)
    got = _weights(out)
    assert got["model.embed_tokens.weight"].shape[0] == base_vocab + 3
    assert_same(got, peft_merge(tiny_base, ad, vocab=base_vocab + 3))
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == base_vocab + 3 and len(tok("KestrelK9", add_special_tokens=False)["input_ids"]) == 1
    assert json.loads((out / "config.json").read_text())["vocab_size"] == base_vocab + 3
    # the serve gate refuses it (vLLM takes no modules_to_save) and says what to do
    assert "modules_to_save" in unsupported(read_adapter(ad), "vllm")


def test_resized_vocabulary_without_its_tokenizer_is_refused(tiny_base, tmp_path):
    ad = _added_tokens_adapter(tiny_base, tmp_path / "newtok", save_tokenizer=False)
    with pytest.raises(UserError, match="vocabulary of .* tokens .* no tokenizer next to it"):
        merge_adapter(ad, tmp_path / "m", base=str(tiny_base), dtype="float32", **quiet)
    assert not (tmp_path / "m").exists()


def test_resized_vocabulary_with_lora_on_the_embeddings(tiny_base, tmp_path):
    """peft saves the resized embedding matrix beside lora_embedding_A/B (`base_layer`)."""
    from transformers import AutoTokenizer

    ad = _added_tokens_adapter(tiny_base, tmp_path / "emb", targets=("q_proj", "embed_tokens"),
                               modules_to_save=("lm_head",))
    vocab = len(AutoTokenizer.from_pretrained(tiny_base)) + 3
    out = merge_adapter(ad, tmp_path / "m", base=str(tiny_base), dtype="float32", **quiet)
    assert_same(_weights(out), peft_merge(tiny_base, ad, vocab=vocab))


def test_a_tokenizer_longer_than_the_embeddings_is_refused(tiny_base, tmp_path):
    """A tokenizer with new tokens saved beside an adapter that carries no resized embeddings."""
    from transformers import AutoTokenizer

    ad = make_random_adapter(tiny_base, tmp_path / "a", seed=11)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.add_tokens(["KestrelK9"])
    tok.save_pretrained(ad)
    with pytest.raises(UserError, match="has .* tokens but the merged model would have .* embedding rows"):
        merge_adapter(ad, tmp_path / "m", base=str(tiny_base), dtype="float32", **quiet)
    assert not (tmp_path / "m").exists()


def test_new_rows_the_adapter_does_not_carry_are_refused(tiny_base, tmp_path):
    """Resized, but only embed_tokens saved: the untied lm_head's new rows are lost, not invented."""
    ad = _added_tokens_adapter(tiny_base, tmp_path / "half", modules_to_save=("embed_tokens",),
                               save_embedding_layers=False)
    with pytest.raises(UserError, match="does not carry the new rows of .*lm_head"):
        merge_adapter(ad, tmp_path / "m", base=str(tiny_base), dtype="float32", **quiet)
    assert not (tmp_path / "m").exists()


def test_a_rank_pattern_that_no_longer_matches_its_tensors_is_refused(tiny_base, tmp_path):
    """Two keys match layer 0's o_proj; peft sorts them on save and picks the other one on load."""
    ad = make_random_adapter(tiny_base, tmp_path / "order", seed=12, r=2, targets=("q_proj", "o_proj"),
                             rank_pattern={"o_proj": 1, r"layers\.0\..*": 3})
    with pytest.raises(UserError, match=r"o_proj has rank 1 in its tensors but rank 3 by its config"):
        read_adapter(ad)


@pytest.mark.parametrize("edit,match", [
    ({"r": "4"}, "r must be a positive integer"), ({"r": 0}, "r must be a positive integer"),
    ({"lora_alpha": "8"}, "lora_alpha must be a positive number"),
    ({"rank_pattern": {"q_proj(": 2}}, "rank_pattern key 'q_proj\(' is not a regular expression"),
    ({"alpha_pattern": {"q_proj": -1}}, "alpha_pattern.*must be a positive number"),
])
def test_malformed_configs_are_refused_naming_the_key(tiny_base, tmp_path, edit, match):
    ad = make_random_adapter(tiny_base, tmp_path / "a", seed=13)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps(dict(cfg, **edit)))
    with pytest.raises(UserError, match=match):
        merge_adapter(ad, tmp_path / "m", base=str(tiny_base), dtype="float32", **quiet)


def test_lora_alpha_null_is_peft_s_default(tiny_base, tmp_path):
    from lorafleet.adapter import normalised_config

    ad = make_random_adapter(tiny_base, tmp_path / "a", seed=14, r=4)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps(dict(cfg, lora_alpha=None)))
    info = read_adapter(ad)
    assert info.scale_for("model.layers.0.self_attn.q_proj") == 2.0 and normalised_config(info)["lora_alpha"] == 8


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_changing_init_merges_as_peft_loads_it(tiny_base, tmp_path, init):
    """PiSSA/OLoRA adapters saved unconverted: peft rebuilds the residual base on load."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                        LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=init))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)  # "training"
        ids = torch.tensor([[5, 17, 33, 2, 41]])
        want = pm(ids).logits
    pm.save_pretrained(tmp_path / init)
    info = read_adapter(tmp_path / init)
    assert "init_lora_weights" in unsupported(info, "streaming") and unsupported(info, "peft") is None
    assert "init_lora_weights" in unsupported(info, "vllm")
    out = merge_adapter(tmp_path / init, tmp_path / "m", base=str(tiny_base), dtype="float32", **quiet)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


@pytest.mark.parametrize("init,extra", [("pissa_niter_4", {}), ("corda", {}),
                                        ("loftq", {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}})])
def test_inits_peft_cannot_rebuild_are_refused_naming_the_key(tiny_base, tmp_path, init, extra):
    ad = make_random_adapter(tiny_base, tmp_path / "a", seed=7)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps(dict(cfg, init_lora_weights=init, **extra)))
    for target in ("streaming", "peft", "edge"):
        why = unsupported(read_adapter(ad), target)
        assert why and f"init_lora_weights={init!r}" in why and "path_initial_model_for_weight_conversion" in why
    with pytest.raises(UserError, match="init_lora_weights"):
        merge_adapter(ad, tmp_path / "m", base=str(tiny_base), dtype="float32", **quiet)
    assert not (tmp_path / "m").exists()


def test_edge_export_of_a_patterned_adapter_passes_parity(tiny_base, tmp_path):
    from merge.onnx import export_onnx

    ad = make_random_adapter(tiny_base, tmp_path / "patterned", seed=8, **PATTERNED)
    out = export_onnx(tiny_base, tmp_path / "edge", adapters=[ad], **quiet)
    rep = json.loads((out / "onnx_report.json").read_text())["adapters"]["patterned"]
    assert rep["max_abs_logits_diff"] < 1e-3 and rep["greedy_tokens_matched"] == rep["greedy_tokens_compared"]


# --------------------------------------------------------------------------- property: streaming == peft
def test_streaming_merge_equals_peft_for_any_config_peft_accepts(tiny_base, tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from merge.streaming import stream_merge

    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    keys = [r"layers\.1\.self_attn\.(q_proj|v_proj)", "down_proj", r"layers\.0\..*", "_proj", "o_proj",
            r"model\.layers\.1\.mlp\.up_proj", "nothing_matches"]
    config = st.fixed_dictionaries({
        "r": st.integers(1, 16),
        "lora_alpha": st.one_of(st.none(), st.integers(1, 64), st.floats(0.5, 64)),
        "target_modules": st.one_of(st.lists(st.sampled_from(modules), min_size=1, max_size=7, unique=True),
                                    st.just("all-linear"), st.just(r".*\.(q_proj|down_proj)")),
        "rank_pattern": st.dictionaries(st.sampled_from(keys), st.integers(1, 16), max_size=3),
        "alpha_pattern": st.dictionaries(st.sampled_from(keys), st.integers(1, 64), max_size=3),
        "use_rslora": st.booleans(),
        "lora_dropout": st.sampled_from([0.0, 0.1]),
        "seed": st.integers(0, 2**16),
    })

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(config)
    def check(c):
        d = tmp_path_factory.mktemp("prop")
        c = dict(c)
        seed = c.pop("seed")
        if c["lora_alpha"] is None:
            del c["lora_alpha"]
        pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                            LoraConfig(bias="none", **c))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        pm.save_pretrained(d / "ad")
        if "lora_alpha" not in c:  # as a hand-written config leaves it out
            cfg = json.loads((d / "ad/adapter_config.json").read_text())
            del cfg["lora_alpha"]
            (d / "ad/adapter_config.json").write_text(json.dumps(cfg))
        # The reference is peft loading the saved adapter (what a user has), not the model in
        # memory: peft writes adapter_config.json with sorted keys, so where two pattern keys
        # match one module, "first match wins" can pick another key after saving.
        try:
            want = peft_merge(tiny_base, d / "ad")
        except RuntimeError:  # peft cannot load what it saved: read_adapter must say why
            with pytest.raises(UserError, match="rank_pattern"):
                read_adapter(d / "ad")
            return
        info = read_adapter(d / "ad")
        assert unsupported(info, "streaming") is None
        (d / "m").mkdir()
        stream_merge(tiny_base, info, d / "m", torch.float32)
        assert_same(_weights(d / "m"), want)
        shutil.rmtree(d)

    check()


# --------------------------------------------------------------------------- the serve gate vs the engine
def _gate_cases(tiny_base: Path, d: Path) -> dict[str, Path]:
    cases = {
        "plain": make_random_adapter(tiny_base, d / "plain", seed=1),
        "patterned": make_random_adapter(tiny_base, d / "patterned", seed=2, **PATTERNED),
        "rslora": make_random_adapter(tiny_base, d / "rslora", seed=3, use_rslora=True),
        "dora": make_random_adapter(tiny_base, d / "dora", seed=4, use_dora=True),
        "modules_to_save": make_random_adapter(tiny_base, d / "modules_to_save", seed=5, modules_to_save=["lm_head"]),
        "rank_above_max": make_random_adapter(tiny_base, d / "rank_above_max", seed=6, r=32),
        "newtok": _added_tokens_adapter(tiny_base, d / "newtok"),
        "embeddings": make_random_adapter(tiny_base, d / "embeddings", seed=9, targets=("q_proj", "embed_tokens")),
        "lm_head": make_random_adapter(tiny_base, d / "lm_head", seed=10, targets=("q_proj", "lm_head")),
        "trainable_tokens": make_random_adapter(tiny_base, d / "trainable_tokens", seed=11,
                                                trainable_token_indices=[1, 2]),
    }
    no_alpha = make_random_adapter(tiny_base, d / "no_alpha", seed=7, r=4)
    cfg = json.loads((no_alpha / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (no_alpha / "adapter_config.json").write_text(json.dumps(cfg))
    cases["no_alpha"] = no_alpha
    pissa = make_random_adapter(tiny_base, d / "pissa", seed=8)
    cfg = json.loads((pissa / "adapter_config.json").read_text())
    (pissa / "adapter_config.json").write_text(json.dumps(dict(cfg, init_lora_weights="pissa")))
    cases["pissa"] = pissa
    return cases


@pytest.mark.timeout(600)
def test_serve_gate_agrees_with_the_engine(tiny_base, tmp_path):
    """Each adapter: the registry's gate (front end, no engine) and vLLM's own load of the
    snapshot the replica hands it. Accepted by one <=> accepted by the other."""
    from vllm.lora.request import LoRARequest

    from lorafleet.config import ServeConfig
    from lorafleet.models import base_fingerprint, module_shapes
    from serve.contract import AdapterRef
    from serve.adapters import snapshot_adapter
    from serve.deployment import engine_plan
    from serve.engine import engine_args, start_engine
    from serve.registry import AdapterRegistry

    cases = _gate_cases(tiny_base, tmp_path / "adapters")
    registry = AdapterRegistry([str(tmp_path / "adapters")], tmp_path / "cache", base_shapes=module_shapes(str(tiny_base)),
                        base_fingerprint=base_fingerprint(str(tiny_base))["fingerprint"], max_lora_rank=16)
    gate = {}
    for name, path in cases.items():
        try:
            registry.gate(read_adapter(path))
            gate[name] = None
        except UserError as e:
            gate[name] = str(e)
    cfg = ServeConfig(model=str(tiny_base), served_model_name="tiny", adapters=[str(tmp_path / "adapters")],
                      max_resident_adapters=1,
                      engine={"dtype": "float32", "max_model_len": 128, "cpu_kvcache_space_gb": 0.25,
                              "max_lora_rank": 16, "max_loras": 1})
    engine = start_engine(engine_args(cfg, str(tiny_base), engine_plan(cfg, str(tiny_base)), on_cpu=True), None)

    async def engine_load(i: int, name: str, path: Path) -> str | None:
        snap = snapshot_adapter(AdapterRef(name=name, version="v", path=str(path)), tmp_path / "snap" / name)
        try:
            ok = await engine.add_lora(LoRARequest(lora_name=name, lora_int_id=i, lora_path=str(snap)))
            await engine.remove_lora(i)
            return None if ok is not False else "refused"
        except Exception as e:  # the engine's own refusal, whatever its type
            return f"{type(e).__name__}: {e}"

    async def all_loads():
        return {name: await engine_load(i, name, p) for i, (name, p) in enumerate(cases.items(), start=1)}

    try:
        loop = asyncio.new_event_loop()
        got = loop.run_until_complete(all_loads())
    finally:
        engine.shutdown()
    disagree = {n: (gate[n], got[n]) for n in cases if (gate[n] is None) != (got[n] is None)}
    assert not disagree, disagree
    assert gate["plain"] is None and gate["no_alpha"] is None and gate["patterned"] is None
    assert "DoRA" in gate["dora"] and "modules_to_save" in gate["newtok"] and "max_lora_rank" in gate["rank_above_max"]
