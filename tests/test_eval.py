"""`lorafleet eval`, the train-end check and the promotion gate, on the tiny model.

The metrics are the libraries' (rouge-score, sacrebleu); the answers come from transformers +
peft here and from the real vLLM engine behind lorafleet's server (official openai client);
the gate is checked through that server: refused with 422 naming the numbers, others served.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from lorafleet.errors import UserError

pytestmark = pytest.mark.timeout(900)


# ------------------------------------------------------------------------------------ metrics
def test_scores_are_the_libraries_own():
    from rouge_score import rouge_scorer
    from sacrebleu import sentence_chrf

    from lorafleet.evaluation.metrics import score

    exp, got = "The notice period in Valdoria is 9 weeks.", "In Valdoria the notice period is nine weeks"
    s = score(exp, got)
    ref = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(exp, got)["rougeL"].fmeasure
    assert s["rougeL"] == pytest.approx(ref, abs=1e-4)
    assert s["chrf"] == pytest.approx(sentence_chrf(got, [exp]).score / 100, abs=1e-4)
    assert (s["exact_match"], s["contains"], s["fact_match"]) == (0.0, 0.0, 0.0)  # "nine" is not 9
    s = score("The answer is 9 weeks.", "the answer is 9 weeks")  # SQuAD normalisation: case, punctuation
    assert (s["exact_match"], s["contains"], s["fact_match"]) == (1.0, 1.0, 1.0)
    assert score("9 weeks", "It is 9 weeks, by Article 3.")["contains"] == 1.0


def test_items_from_every_training_format(tmp_path):
    from lorafleet.evaluation.items import load_items

    rows = [
        {"instruction": "You are support.", "input": "Reset?", "output": "Hold 10 s."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
         "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
        {"prompt": [{"role": "user", "content": "Sky?"}], "chosen": [{"role": "assistant", "content": "Blue!"}],
         "rejected": [{"role": "assistant", "content": "Blue."}]},
        {"input": {"messages": [{"role": "user", "content": "Grass?"}]},
         "preferred_output": [{"role": "assistant", "content": "Green!"}],
         "non_preferred_output": [{"role": "assistant", "content": "Green."}]},
    ]
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = load_items(str(f))
    assert [it.expected for it in items] == ["Hold 10 s.", "Hello.", "A.", "Blue!", "Green!"]
    assert items[0].messages == [{"role": "system", "content": "You are support."}, {"role": "user", "content": "Reset?"}]
    assert items[1].tools and items[4].question == "Grass?"
    (tmp_path / "text.jsonl").write_text('{"text": "just text"}\n')
    with pytest.raises(UserError, match=r"text.jsonl:1: a plain `text` record has no question"):
        load_items(str(tmp_path / "text.jsonl"))


# --------------------------------------------------------------------- adapters to evaluate
@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory, root):
    """Two adapters by `lorafleet train`: `good` (trained until it answers like its data) and
    `under` (one step at a tiny learning rate: no better than the base)."""
    from lorafleet.config import TrainConfig
    from train.recipe import run

    src = tmp_path_factory.mktemp("eval-adapters")
    logs: dict[str, list[str]] = {}
    for name, steps, lr in (("good", 60, 5e-3), ("under", 1, 1e-7)):
        logs[name] = []
        run(TrainConfig.model_validate({
            "base_model": str(tiny_base), "template": "chat",
            "data": {"train_file": str(root / "examples/data/support.jsonl")},
            "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0},
            "training": {"max_steps": steps, "learning_rate": lr, "lr_scheduler_type": "constant",
                         "logging_steps": 5, "save_steps": 1000, "max_seq_length": 128},
            "output_dir": str(src / name)}), log=logs[name].append)
    return src, logs


def test_train_end_check_is_logged_and_kept(adapters):
    from lorafleet.adapter import read_adapter

    src, logs = adapters
    for name in ("good", "under"):
        check = read_adapter(src / name).manifest["results"]["generation_check"]
        assert check["split"] == "train" and check["items"] == 20
        line = next(m for m in logs[name] if m.startswith("check: "))
        assert line.startswith(f"check: {check['fact_match']}/20 training answers reproduced")
    under = read_adapter(src / "under").manifest["results"]["generation_check"]
    assert "only 1 optimizer steps" in under["hint"] and "training loss is still" in under["hint"]


def test_eval_local_writes_report_and_manifest(adapters, tiny_base, root, tmp_path):
    from lorafleet.evaluation.generate import LocalModel
    from lorafleet.evaluation.items import load_items
    from lorafleet.evaluation.run import evaluate

    src, _ = adapters
    data = str(root / "examples/data/support.jsonl")
    report = evaluate(str(src / "good"), data, tmp_path / "report", with_base=True, limit=8, max_new_tokens=24,
                      log=lambda m: None)
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"eval.json", "eval.md", "eval.png"}
    assert report["items"] == 8 and report["base"] == str(tiny_base)
    assert report["totals"]["adapter"]["rougeL"] > report["totals"]["base"]["rougeL"]
    # the base's answers are the base model's own (peft's disable_adapter == the plain model)
    plain = LocalModel(str(tiny_base), template=report_template(src / "good"))
    items = load_items(data, limit=8)
    assert [r["base"]["answer"] for r in report["per_item"]] == plain.answers(items, max_new_tokens=24)
    man = json.loads((src / "good" / "lorafleet.json").read_text())
    assert man["eval"]["adapter_scores"] == report["totals"]["adapter"]
    assert man["eval"]["base_scores"] == report["totals"]["base"] and man["eval"]["items"] == 8
    assert "| rougeL |" in (tmp_path / "report" / "eval.md").read_text()


def report_template(adapter: Path) -> str:
    from lorafleet.adapter import read_adapter

    return read_adapter(adapter).template


def test_eval_refuses_a_model_that_cannot_load(tmp_path, root):
    from lorafleet.evaluation.run import evaluate

    with pytest.raises(UserError, match="nope does not exist"):
        evaluate(str(tmp_path / "nope"), str(root / "examples/data/support.jsonl"), tmp_path / "r", limit=1)
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------- the gate
def test_gate_messages_name_the_numbers():
    from lorafleet.config import RequireEval
    from lorafleet.evaluation.gate import eval_refusal

    ev = {"eval": {"data": "held.jsonl", "items": 20, "adapter_scores": {"fact_match": 0.15},
                   "base_scores": {"fact_match": 0.2}}}
    assert "no recorded evaluation" in eval_refusal("x", {}, RequireEval(min=0.5))
    assert "fact_match 0.150 on 20 items of held.jsonl, below the minimum 0.500" in eval_refusal(
        "x", ev, RequireEval(min=0.5))
    assert "does not beat its base" in eval_refusal("x", ev, RequireEval(beats_base=True))
    assert eval_refusal("x", ev, RequireEval(min=0.1)) is None
    with pytest.raises(ValueError, match="require_eval needs"):
        RequireEval()


@pytest.fixture(scope="module")
def gated(tiny_base, adapters, root, tmp_path_factory):
    """Both adapters evaluated against the base on their data; a server that requires adapters to
    beat the base on ROUGE-L."""
    from lorafleet.evaluation.run import evaluate
    from servers import InProcessServer

    src, _ = adapters
    work = tmp_path_factory.mktemp("gated")
    for name in ("good", "under"):
        evaluate(str(src / name), str(root / "examples/data/support.jsonl"), work / name, with_base=True,
                 limit=8, max_new_tokens=24, log=lambda m: None)
    s = InProcessServer(tiny_base, src, work, [], registry={"require_eval": {"metric": "rougeL", "beats_base": True}})
    yield s, src, work
    s.close()


def test_gate_refuses_what_does_not_beat_the_base_and_serves_the_rest(gated, root):
    server, src, work = gated
    models = {m.id: m for m in server.client.models.list().data}
    assert "good" in models and "under" not in models
    shown = models["good"].model_extra["eval"]
    assert shown["adapter_scores"]["rougeL"] > shown["base_scores"]["rougeL"] and shown["items"] == 8
    r = server.client.chat.completions.create(model="good", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4, temperature=0)
    assert r.choices[0].message.content is not None
    with pytest.raises(openai.UnprocessableEntityError) as e:
        server.client.chat.completions.create(model="under", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    under = json.loads((src / "under" / "lorafleet.json").read_text())["eval"]
    msg = e.value.body["message"] if isinstance(e.value.body, dict) else str(e.value)
    assert "does not beat its base" in msg
    assert f"rougeL {under['adapter_scores']['rougeL']:.3f} vs base {under['base_scores']['rougeL']:.3f}" in msg
    rescan = httpx.post(f"{server.url}/v1/adapters/rescan", headers={"Authorization": "Bearer sk-admin"}).json()
    assert "does not beat its base" in rescan["rejected"]["under"] and "good" not in rescan["rejected"]


def test_eval_through_the_server_matches_the_local_answers(gated, root, tmp_path):
    """The served adapter (vLLM, its recorded template) answers as transformers + peft does."""
    from lorafleet.evaluation.run import evaluate

    server, src, work = gated
    local = json.loads((work / "good" / "eval.json").read_text())
    served = evaluate("good", str(root / "examples/data/support.jsonl"), tmp_path / "served", url=server.url,
                      api_key="sk-user", limit=8, max_new_tokens=24, log=lambda m: None)
    same = sum(a["adapter"]["answer"] == b["adapter"]["answer"] for a, b in zip(local["per_item"], served["per_item"]))
    assert same >= 7, [(a["adapter"]["answer"], b["adapter"]["answer"]) for a, b in
                       zip(local["per_item"], served["per_item"])]
    with pytest.raises(UserError, match="does not serve 'nope'"):
        evaluate("nope", str(root / "examples/data/support.jsonl"), tmp_path / "x", url=server.url, api_key="sk-user")
