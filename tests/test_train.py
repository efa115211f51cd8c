"""Training stage: config validation, data formats, template parity, the real trainer, resume."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.config import TrainConfig, load_config
from lorafleet.errors import UserError
from lorafleet.templates import SEED_TEMPLATE, render_prompt_ids, split_prompt_completion
from lorafleet.records import read_records
from train.data import tokenize_records


# ----------------------------------------------------------------------------------- config
def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_config_unknown_key_is_named(tmp_path):
    p = _write(tmp_path, """
        data: {train_file: x.jsonl}
        output_dir: out
        lora: {r: 8, lora_alhpa: 16}
    """)
    with pytest.raises(UserError, match=r"lora\.lora_alhpa: unknown key"):
        load_config(TrainConfig, p)


def test_config_wrong_type_and_bad_rank(tmp_path):
    p = _write(tmp_path, "data: {train_file: x.jsonl}\noutput_dir: o\ntraining: {learning_rate: fast}\n")
    with pytest.raises(UserError, match=r"training\.learning_rate"):
        load_config(TrainConfig, p)
    p = _write(tmp_path, "data: {train_file: x.jsonl}\noutput_dir: o\nlora: {r: 0}\n")
    with pytest.raises(UserError, match=r"lora\.r: .*positive"):
        load_config(TrainConfig, p)


def test_config_set_overrides(tmp_path):
    p = _write(tmp_path, "data: {train_file: x.jsonl}\noutput_dir: o\n")
    cfg = load_config(TrainConfig, p, ["lora.r=32", "training.packing=true", "lora.target_modules=all-linear"])
    assert cfg.lora.r == 32 and cfg.training.packing is True and cfg.lora.target_modules == "all-linear"
    with pytest.raises(UserError, match="missing"):
        load_config(TrainConfig, _write(tmp_path, "output_dir: o\n"))


# ------------------------------------------------------------------------------------- data
RECORDS = {
    "alpaca": {"instruction": "You are support.", "input": "What is K9?", "output": "A drone."},
    "messages": {"messages": [{"role": "system", "content": "You are support."},
                              {"role": "user", "content": "What is K9?"},
                              {"role": "assistant", "content": "A drone."}]},
    "sharegpt": {"conversations": [{"from": "system", "value": "You are support."},
                                   {"from": "human", "value": "What is K9?"}, {"from": "gpt", "value": "A drone."}]},
}


@pytest.mark.parametrize("fmt", ["alpaca", "messages", "sharegpt"])
@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet"])
def test_chat_formats_tokenize_identically(fmt, ext, tiny_tok, tmp_path):
    """The three chat formats of one example give the same ids, from every file type."""
    path = tmp_path / f"d.{ext}"
    recs = [RECORDS[fmt]] * 3
    if ext == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in recs))
    elif ext == "json":
        path.write_text(json.dumps(recs))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(recs), path)
    ts = tokenize_records(read_records(str(path)), "auto", tiny_tok, SEED_TEMPLATE, 256)
    ref = tokenize_records(read_records_inline(RECORDS["alpaca"]), "alpaca", tiny_tok, SEED_TEMPLATE, 256)
    assert ts.rows[0] == ref.rows[0]
    answer = [i for i, m in zip(ts.rows[0]["input_ids"], ts.rows[0]["completion_mask"]) if m]
    assert tiny_tok.decode(answer).startswith("A drone.")


def read_records_inline(rec):
    from lorafleet.records import Record

    return [Record("inline", rec)]


def test_csv_and_text_formats(tiny_tok, tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("instruction,input,output\nSay hi,,hi there\n")
    ts = tokenize_records(read_records(str(p)), "auto", tiny_tok, SEED_TEMPLATE, 128)
    assert len(ts.rows) == 1 and 0 in ts.rows[0]["completion_mask"]
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"text": "plain pretraining text"}) + "\n")
    ts = tokenize_records(read_records(str(p)), "auto", tiny_tok, SEED_TEMPLATE, 128)
    assert all(ts.rows[0]["completion_mask"])  # loss on every token


def test_data_errors_name_file_and_line(tiny_tok, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(RECORDS["alpaca"]) + "\n" + json.dumps({"instruction": "x", "input": "y"}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: alpaca record lacks 'output'"):
        tokenize_records(read_records(str(p)), "alpaca", tiny_tok, SEED_TEMPLATE, 128)
    p.write_text("{not json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:1: not valid JSON"):
        read_records(str(p))
    p.write_text("")
    with pytest.raises(UserError, match="holds no records"):
        read_records(str(p))
    with pytest.raises(UserError, match="not found"):
        read_records(str(tmp_path / "missing.jsonl"))


def test_all_examples_too_long_is_an_error(tiny_tok):
    long = dict(RECORDS["alpaca"], input="word " * 400)
    with pytest.raises(UserError, match=r"all 1 examples lose their whole answer at max_seq_length=32"):
        tokenize_records(read_records_inline(long), "alpaca", tiny_tok, SEED_TEMPLATE, 32)


# ------------------------------------------------------------------------------ templates
@pytest.mark.parametrize("template", ["seed", "chat"])
def test_train_and_serve_prompts_have_the_same_token_ids(template, tiny_tok):
    """The ids trained before an answer equal the ids serving sends for the same messages."""
    from lorafleet.templates import resolve_template

    _, tpl = resolve_template(template, tiny_tok)
    convo = RECORDS["messages"]["messages"]
    ids, mask, last_prompt = split_prompt_completion(tiny_tok, tpl, convo)
    serve_ids = render_prompt_ids(tiny_tok, tpl, convo[:-1])
    assert last_prompt == serve_ids
    assert ids[: len(serve_ids)] == serve_ids and mask.index(1) == len(serve_ids)
    # two turns: the second answer's prompt is also what serving renders
    two = convo + [{"role": "user", "content": "And K10?"}, {"role": "assistant", "content": "Newer."}]
    _, _, last_prompt = split_prompt_completion(tiny_tok, tpl, two)
    assert last_prompt == render_prompt_ids(tiny_tok, tpl, two[:-1])


def test_seed_template_matches_the_tutorial(tiny_tok):
    from lorafleet.templates import render

    text = render(tiny_tok, SEED_TEMPLATE, RECORDS["messages"]["messages"], add_generation_prompt=False)
    assert text.startswith("### 指令\nYou are support.\n\n### 输入\nWhat is K9?\n\n### 回答\nA drone.")


# ------------------------------------------------------------------------------- training
def test_train_writes_a_complete_adapter(train_cfg, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.recipe import run

    cfg = train_cfg(data__eval_fraction=0.2)
    out = run(cfg, log=lambda m: None)
    for f in ["adapter_config.json", "adapter_model.safetensors", "lorafleet.json", "metrics.jsonl", "loss.png",
              "README.md"]:
        assert (out / f).is_file(), f
    man = json.loads((out / "lorafleet.json").read_text())
    assert man["template"]["name"] == "seed" and man["template"]["text"] == SEED_TEMPLATE
    assert man["parameters"]["trainable"] > 0 and man["results"]["steps"] == 4
    assert man["results"]["eval_loss"] is not None and man["data"]["eval_examples"] == 4
    assert len(man["base_model"]["fingerprint"]) == 16
    assert not list(out.parent.glob(".adapter.tmp-*")) and not (out.parent / "adapter.checkpoints").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    model = PeftModel.from_pretrained(base, out)
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and any(p.abs().sum() > 0 for p in b)  # it trained: B moved from its zero init
    with pytest.raises(UserError, match="already exists"):
        run(cfg, log=lambda m: None)


def test_train_rejects_unknown_target_module(train_cfg):
    from train.recipe import run

    cfg = train_cfg(lora__target_modules=["q_proj", "qkv_proj"])
    with pytest.raises(UserError, match=r"\['qkv_proj'\] are not modules of this model; its linear modules are"):
        run(cfg, log=lambda m: None)
    assert not (cfg.output_dir and __import__("pathlib").Path(cfg.output_dir).exists())


KILLABLE_RUN = """
import os, signal, sys
sys.path.insert(0, {root!r})
from transformers import Trainer, TrainerCallback
import train.sft as sft
MODE = {mode!r}
# 8 steps, 5 per epoch, a checkpoint every 2: step 6 is in the second epoch, step 8 the last
STEP = {{"after_save": 6, "mid_save": 4, "after_last_save": 8}}.get(MODE)

class Marks(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        print("TRAIN_BEGIN", flush=True)
    def on_save(self, args, state, control, **kw):
        if MODE.startswith("after_") and state.global_step == STEP:
            os.kill(os.getpid(), signal.SIGKILL)   # right after checkpoint STEP is complete

orig_build = sft.build_trainer
def build(*a, **k):
    t = orig_build(*a, **k); t.add_callback(Marks()); return t
sft.build_trainer = build

orig_save_opt = Trainer._save_optimizer_and_scheduler
def save_opt(self, output_dir):
    if MODE == "mid_save" and self.state.global_step == STEP:
        os.kill(os.getpid(), signal.SIGKILL)       # checkpoint 4 has its weights, not its optimizer or state
    return orig_save_opt(self, output_dir)
Trainer._save_optimizer_and_scheduler = save_opt

from lorafleet.config import TrainConfig
from train.recipe import run
run(TrainConfig.model_validate_json({cfg!r}), log=print)
"""


def _start_training(cfg, root, mode):
    return subprocess.Popen([sys.executable, "-c", KILLABLE_RUN.format(root=str(root), cfg=cfg.model_dump_json(),
                                                                       mode=mode)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=root)


def _wait_for_training(proc) -> float:
    """Block until the trainer starts; return that moment."""
    for line in proc.stdout:
        if "TRAIN_BEGIN" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return time.monotonic()
    raise AssertionError(f"training never started (exit {proc.wait()})")


def _assert_same_adapter(a_dir, b_dir, why):
    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys(), why
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{why}: {k}: {m}")


def test_kill_9_then_resume_equals_uninterrupted_run(train_cfg, tmp_path, root):
    """SIGKILL right after a checkpoint in the second epoch, in the middle of writing one, right
    after the last step's checkpoint, and at a random moment; each time `--resume` must end with
    the adapter an uninterrupted run writes. `--resume` on a finished adapter leaves it as it is."""
    from train.recipe import run

    common = dict(training__max_steps=8, training__save_steps=2)
    straight_cfg = train_cfg(output_dir=str(tmp_path / "straight"), **common)
    proc = _start_training(straight_cfg, root, "none")
    began = _wait_for_training(proc)
    assert proc.wait() == 0
    train_window = time.monotonic() - began
    straight = tmp_path / "straight"

    seed = int(os.environ.get("LORAFLEET_KILL_SEED", random.SystemRandom().randrange(10**6)))
    moment = random.Random(seed).uniform(0, train_window)
    for mode in ("after_save", "mid_save", "after_last_save", "random"):
        cfg = train_cfg(output_dir=str(tmp_path / mode), **common)
        why = f"kill {mode}" + (f" {moment:.2f}s into {train_window:.1f}s of training "
                                f"(LORAFLEET_KILL_SEED={seed})" if mode == "random" else "")
        proc = _start_training(cfg, root, mode)
        _wait_for_training(proc)
        if mode == "random":
            time.sleep(moment)
            proc.kill()
        assert proc.wait() in (-9, 0), why  # 0: the random moment fell after the end
        if mode != "random":
            assert not (tmp_path / mode).exists(), f"{why}: the crash left a half-written adapter"
        if mode == "mid_save":
            assert not (tmp_path / "mid_save.checkpoints/checkpoint-4/trainer_state.json").exists()
        resumed = run(cfg, resume=True, log=lambda m: None)
        _assert_same_adapter(straight, resumed, why)
        assert not list(tmp_path.glob(f".{mode}.*")), f"{why}: a temp directory was left behind"

    (tmp_path / ".straight.tmp-killed").mkdir()  # what a kill while writing the adapter leaves
    said, before = [], (straight / "adapter_model.safetensors").stat().st_mtime_ns
    assert run(straight_cfg, resume=True, log=said.append) == straight
    assert said == ["removing .straight.tmp-killed: left by a run stopped while writing straight",
                    f"{straight} is already complete: nothing to resume"]
    assert not (tmp_path / ".straight.tmp-killed").exists()
    assert (straight / "adapter_model.safetensors").stat().st_mtime_ns == before


def test_qlora_on_cpu_when_asked(train_cfg):
    """load_in_4bit: true on a CPU is honoured (bitsandbytes NF4), and the adapter is ordinary."""
    pytest.importorskip("bitsandbytes")
    from train.recipe import run

    said = []
    out = run(train_cfg(quantization={"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"},
                        training__max_steps=2), log=said.append)
    assert any("QLoRA as asked" in m for m in said)
    man = json.loads((out / "lorafleet.json").read_text())
    assert man["hyperparameters"]["quantization"]["used_4bit"] is True
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors and all(t.is_floating_point() for t in tensors.values())


def test_cpu_default_says_it_falls_back(train_cfg):
    from train.recipe import decide_quantization

    said = []
    assert decide_quantization(train_cfg(), "cpu", said.append) is False
    assert "plain LoRA" in said[0]
    assert decide_quantization(train_cfg(), "cuda", said.append) is True
