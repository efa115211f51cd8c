"""Preference tuning (training.method dpo | kto | orpo) with trl's trainers, on the tiny model,
and (slow) on the embedded base: DPO from an SFT adapter moves served answers to the chosen style.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.errors import UserError

pytestmark = pytest.mark.timeout(900)
STYLE = "examples/data/preference_style.jsonl"
STYLE_HELD_OUT = "examples/data/preference_style_heldout.jsonl"


def records(rows: list[dict], tmp_path: Path, name: str = "p.jsonl"):
    from lorafleet.records import read_records

    f = tmp_path / name
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return read_records(str(f))


def test_every_preference_format_reads_as_one_pair(tmp_path):
    from lorafleet.preference import read_judged, read_pair

    q, good, bad = [{"role": "user", "content": "Sky?"}], "Blue. Hope this helps!", "Blue."
    recs = records([
        {"prompt": "Sky?", "chosen": good, "rejected": bad},  # trl standard, strings
        {"prompt": q, "chosen": [{"role": "assistant", "content": good}],
         "rejected": [{"role": "assistant", "content": bad}]},  # trl conversational
        {"chosen": q + [{"role": "assistant", "content": good}],
         "rejected": q + [{"role": "assistant", "content": bad}]},  # trl implicit prompt
        {"input": {"messages": q}, "preferred_output": [{"role": "assistant", "content": good}],
         "non_preferred_output": [{"role": "assistant", "content": bad}]},  # OpenAI preference JSONL
    ], tmp_path)
    for r in recs:
        p = read_pair(r)
        assert (p.prompt, p.chosen, p.rejected) == (q, good, bad), r.where
        assert [(j.answer, j.desirable) for j in read_judged(r)] == [(good, True), (bad, False)]
    bad_recs = records([{"prompt": "Sky?", "chosen": "", "rejected": bad},
                        {"input": {"messages": q}, "preferred_output": [{"role": "user", "content": good}],
                         "non_preferred_output": bad},
                        {"prompt": "x", "completion": "y", "label": "yes"}], tmp_path, "bad.jsonl")
    with pytest.raises(UserError, match=r"bad.jsonl:1: 'chosen' must be a non-empty answer"):
        read_pair(bad_recs[0])
    with pytest.raises(UserError, match=r"bad.jsonl:2: 'preferred_output' must be one assistant message"):
        read_pair(bad_recs[1])
    with pytest.raises(UserError, match=r"bad.jsonl:3: 'label' must be true"):
        read_judged(bad_recs[2])


def test_dpo_rows_are_the_tokens_sft_and_serving_use(tiny_tok, root):
    """The prompt is what serving renders; each answer is what SFT would learn for it."""
    from lorafleet.templates import render_prompt_ids, split_prompt_completion
    from lorafleet.records import read_records
    from lorafleet.preference import read_pair
    from train.preference_trainers import preference_set

    template = tiny_tok.chat_template
    recs = read_records(str(root / STYLE))[:5]
    rows = preference_set(recs, "dpo", tiny_tok, template, 256).rows
    for rec, row in zip(recs, rows):
        p = read_pair(rec)
        assert row["prompt_ids"] == render_prompt_ids(tiny_tok, template, p.prompt)
        for answer, key in ((p.chosen, "chosen_ids"), (p.rejected, "rejected_ids")):
            ids, mask, prompt = split_prompt_completion(tiny_tok, template, [*p.prompt, {"role": "assistant",
                                                                                           "content": answer}])
            assert prompt == row["prompt_ids"] and ids[len(prompt):] == row[key] and all(mask[len(prompt):])


@pytest.fixture(scope="module")
def sft_start(tiny_base, root, tmp_path_factory):
    """An SFT adapter (the plain answers: the rejected side of the pairs), DPO's starting point."""
    from lorafleet.config import TrainConfig
    from train.recipe import run

    d = tmp_path_factory.mktemp("pref")
    plain = d / "plain.jsonl"
    with plain.open("w") as f:
        for line in (root / STYLE).read_text().splitlines():
            r = json.loads(line)
            f.write(json.dumps({"messages": r["prompt"] + r["rejected"]}) + "\n")
    return run(TrainConfig.model_validate({
        "base_model": str(tiny_base), "template": "chat", "data": {"train_file": str(plain)},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0},
        "training": {"max_steps": 6, "learning_rate": 3e-3, "lr_scheduler_type": "constant", "save_steps": 100,
                     "max_seq_length": 128, "generation_check": 0},
        "output_dir": str(d / "sft")}), log=lambda m: None)


def pref_cfg(tiny_base, root, out: Path, method: str, **training):
    from lorafleet.config import TrainConfig

    return TrainConfig.model_validate({
        "base_model": str(tiny_base), "template": "chat",
        "data": {"train_file": str(root / STYLE), "eval_file": str(root / STYLE_HELD_OUT)},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0},
        "training": {"method": method, "max_steps": 6, "learning_rate": 3e-3, "lr_scheduler_type": "constant",
                     "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 100, "max_seq_length": 128,
                     "generation_check": 4, **training},
        "output_dir": str(out)})


def test_dpo_from_an_sft_adapter_raises_the_margin_and_writes_one_adapter(sft_start, tiny_base, root, tmp_path):
    from lorafleet.adapter import read_adapter
    from lorafleet.evaluation.run import evaluate
    from train.recipe import run

    cfg = pref_cfg(tiny_base, root, tmp_path / "dpo", "dpo").model_copy(update={"adapter_name_or_path": str(sft_start)})
    logs: list[str] = []
    out = run(cfg, log=logs.append)
    assert any("continuing from adapter" in m for m in logs)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []  # no "ref" copy of the start
    info = read_adapter(out)
    assert info.manifest["hyperparameters"]["training"]["method"] == "dpo"
    pref = info.manifest["results"]["preference"]
    assert pref["rewards/margins"] > 0
    assert info.manifest["results"]["generation_check"]["method"] == "dpo"
    # held-out pairs: DPO's chosen-over-rejected margin above its starting adapter's
    report = evaluate(str(out), str(root / STYLE_HELD_OUT), tmp_path / "eval", with_base=True,
                      base_model=str(sft_start), max_new_tokens=8, log=lambda m: None)
    assert report["base"] == str(sft_start)
    assert report["preference"]["adapter"]["mean_logp_margin"] > report["preference"]["base"]["mean_logp_margin"]


def test_dpo_resumed_from_sft_equals_the_uninterrupted_run(sft_start, tiny_base, root, tmp_path):
    """trl keeps a reference copy of the start ("ref"); a resume must restore the trained adapter
    from the checkpoint, not restart it from the start (huggingface/transformers#30478)."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from train.recipe import run

    def cfg(out):
        return pref_cfg(tiny_base, root, out, "dpo", save_steps=2, generation_check=0).model_copy(
            update={"adapter_name_or_path": str(sft_start)})

    whole = run(cfg(tmp_path / "whole"), log=lambda m: None)

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt  # a stop after checkpoint-2 was written

    with pytest.raises(KeyboardInterrupt):
        run(cfg(tmp_path / "cut"), log=lambda m: None, callbacks=[Crash()])
    logs: list[str] = []
    resumed = run(cfg(tmp_path / "cut"), resume=True, log=logs.append)
    assert any("resuming from" in m and "checkpoint-2" in m for m in logs)
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.mark.parametrize("method", ["kto", "orpo"])
def test_kto_and_orpo_train_an_adapter(method, tiny_base, root, tmp_path):
    from lorafleet.adapter import read_adapter
    from train.recipe import run

    logs: list[str] = []
    out = run(pref_cfg(tiny_base, root, tmp_path / method, method, max_steps=2), log=logs.append)
    man = read_adapter(out).manifest
    assert man["hyperparameters"]["training"]["method"] == method and man["results"]["steps"] == 2
    assert man["results"]["preference"]["rewards/chosen"] is not None
    if method == "orpo":
        assert any("ORPO is experimental in trl 1.16" in m for m in logs)


def test_preference_method_on_sft_data_names_the_record(tiny_base, root, tmp_path):
    from train.recipe import run

    cfg = pref_cfg(tiny_base, root, tmp_path / "x", "dpo")
    cfg.data.train_file = str(root / "examples/data/support.jsonl")
    cfg.data.eval_file = None
    with pytest.raises(UserError, match=r"support.jsonl:1: a preference record needs prompt/chosen/rejected"):
        run(cfg, log=lambda m: None)
    assert not (tmp_path / "x").exists()


@pytest.fixture()
def bos_tokenizer(tiny_tok):
    """The tiny tokenizer as Llama 3's behaves: it adds BOS when encoding, and its template writes
    BOS too (lorafleet renders with add_special_tokens=False, as vLLM does)."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tiny_tok)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<unk> $A", special_tokens=[("<unk>", tok.convert_tokens_to_ids("<unk>"))])
    tok.bos_token = "<unk>"  # a BOS that is not ChatML's <|im_start|>
    tok.chat_template = "{{ bos_token }}" + tiny_tok.chat_template
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    return tok


def test_kto_trains_on_dpos_tokens_with_a_template_that_writes_bos(bos_tokenizer, tiny_base, root, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafleet.records import read_records
    from train.preference_trainers import preference_set, preference_trainer

    recs = read_records(str(root / STYLE))[:4]
    template = bos_tokenizer.chat_template
    dpo = preference_set(recs, "dpo", bos_tokenizer, template, 256).rows
    kto = preference_set(recs, "kto", bos_tokenizer, template, 256).rows
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    cfg = pref_cfg(tiny_base, root, tmp_path / "kto", "kto")
    trainer = preference_trainer(cfg, model, bos_tokenizer, kto, [], tmp_path / "work", "cpu", False)
    trained = {(tuple(r["prompt_ids"]), tuple(r["completion_ids"])) for r in trainer.train_dataset}
    for row in dpo:  # every chosen and rejected answer of DPO, token for token
        for key in ("chosen_ids", "rejected_ids"):
            assert (tuple(row["prompt_ids"]), tuple(row[key])) in trained
    bos = bos_tokenizer.bos_token_id
    assert all(r["prompt_ids"].count(bos) == 1 and r["prompt_ids"][0] == bos for r in trainer.train_dataset)
    assert all("KL_completion_ids" in r for r in trainer.train_dataset)


def test_orpo_refuses_a_template_it_would_tokenize_otherwise(bos_tokenizer, tiny_base, root, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafleet.records import read_records
    from train.preference_trainers import preference_set, preference_trainer

    tok = bos_tokenizer
    tok.chat_template = tok.chat_template.removeprefix("{{ bos_token }}")  # trl would add the BOS itself
    rows = preference_set(read_records(str(root / STYLE))[:4], "orpo", tok, tok.chat_template, 256).rows
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    cfg = pref_cfg(tiny_base, root, tmp_path / "orpo", "orpo")
    with pytest.raises(UserError, match=r"ORPO .* tokenizes template 'chat' with tokens serving does not use \('<unk>'"):
        preference_trainer(cfg, model, tok, rows, [], tmp_path / "work", "cpu", False, log=lambda m: None)
