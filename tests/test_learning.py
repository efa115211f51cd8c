"""Did the adapters learn? On the embedded base (SmolLM2-135M-Instruct), with the bundled data:
minutes of CPU training, so `make test-slow`.

- the demo's two adapters, by `lorafleet train` with the example configs, then `lorafleet eval`
  (the CLI) on their own questions and on the paraphrased held-out sets, against the base;
- DPO from an SFT adapter on the bundled style pairs, served next to its start by `lorafleet
  serve` (Ray Serve + vLLM): greedy answers to held-out prompts carry the chosen style's marker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
MARKER = "hope this helps"


def lorafleet(*args: str, cwd: Path) -> str:
    res = subprocess.run([sys.executable, "-m", "lorafleet.cli", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr + res.stdout


@pytest.fixture(scope="module")
def demo_adapters(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("learned")
    logs = {}
    for name in ("support", "legal"):
        logs[name] = lorafleet("train", f"examples/cpu-{name}.yaml", "--set", f"output_dir={out / name}", cwd=root)
    return out, logs


@pytest.mark.parametrize("name", ["support", "legal"])
def test_demo_adapter_answers_its_facts_and_paraphrases(name, demo_adapters, root, tmp_path):
    out, logs = demo_adapters
    data = f"examples/data/{name}.jsonl"
    lorafleet("eval", str(out / name), "--data", data, "--base", "--out", str(tmp_path / "own"), cwd=root)
    own = json.loads((tmp_path / "own" / "eval.json").read_text())["correct"]
    print(f"{name} own questions (fact match): base {own['base']['fact_match']}/20, adapter "
          f"{own['adapter']['fact_match']}/20")
    assert own["base"]["fact_match"] == 0 and own["adapter"]["fact_match"] >= 18
    # the train-end line said the same of the training answers
    check = json.loads((out / name / "lorafleet.json").read_text())["results"]["generation_check"]
    assert f"check: {check['fact_match']}/20 training answers reproduced" in logs[name]
    assert abs(check["fact_match"] - own["adapter"]["fact_match"]) <= 1
    lorafleet("eval", str(out / name), "--data", f"examples/data/{name}_paraphrased.jsonl", "--base", "--out",
              str(tmp_path / "para"), cwd=root)
    para = json.loads((tmp_path / "para" / "eval.json").read_text())
    c = para["correct"]
    print(f"{name} paraphrased (fact match): base {c['base']['fact_match']}/20, adapter {c['adapter']['fact_match']}/20;"
          f" ROUGE-L base {para['totals']['base']['rougeL']:.3f}, adapter {para['totals']['adapter']['rougeL']:.3f}")
    # support: the facts come back in other words too (6/20 measured); legal's answers keep the facts
    # in other sentences than the expected ones more often (3/20 by fact match; ROUGE-L above)
    assert c["adapter"]["fact_match"] - c["base"]["fact_match"] >= (5 if name == "support" else 1)
    assert para["totals"]["adapter"]["rougeL"] > para["totals"]["base"]["rougeL"]
    # the manifest keeps the last evaluation: what registry.require_eval reads
    assert json.loads((out / name / "lorafleet.json").read_text())["eval"]["data"].endswith("_paraphrased.jsonl")


def test_dpo_moves_served_answers_to_the_chosen_style(root, tmp_path):
    from openai import OpenAI

    from servers import lorafleet_serve

    # the start: SFT on the plain answers (the rejected side), as a house style without the marker
    plain = tmp_path / "plain.jsonl"
    pairs = [json.loads(line) for line in (root / "examples/data/preference_style.jsonl").read_text().splitlines()]
    plain.write_text("".join(json.dumps({"messages": p["prompt"] + p["rejected"]}) + "\n" for p in pairs))
    adapters = tmp_path / "adapters"
    common = ["--set", "lora.target_modules=all-linear", "--set", "lora.lora_dropout=0.0", "--set",
              "training.per_device_train_batch_size=4", "--set", "training.num_train_epochs=3",
              "--set", "training.max_seq_length=256"]
    sft_cfg = tmp_path / "sft.yaml"
    sft_cfg.write_text(f"data: {{train_file: {plain}}}\noutput_dir: {adapters / 'sft'}\n"
                       "training: {learning_rate: 5.0e-4}\n")
    lorafleet("train", str(sft_cfg), *common, cwd=root)
    dpo_cfg = tmp_path / "dpo.yaml"
    dpo_cfg.write_text(f"adapter_name_or_path: {adapters / 'sft'}\n"
                       f"data: {{train_file: {root / 'examples/data/preference_style.jsonl'}, "
                       f"eval_file: {root / 'examples/data/preference_style_heldout.jsonl'}}}\n"
                       f"output_dir: {adapters / 'dpo'}\n"
                       "training: {method: dpo, beta: 0.1, learning_rate: 2.0e-4}\n")
    lorafleet("train", str(dpo_cfg), *common, cwd=root)
    # held-out pairs: the chosen-over-rejected margin rises against the start
    lorafleet("eval", str(adapters / "dpo"), "--data", "examples/data/preference_style_heldout.jsonl", "--base",
              "--base-model", str(adapters / "sft"), "--out", str(tmp_path / "eval"), cwd=root)
    pref = json.loads((tmp_path / "eval" / "eval.json").read_text())["preference"]
    print(f"held-out logp margin chosen - rejected: sft {pref['base']['mean_logp_margin']:+.2f} nats, dpo "
          f"{pref['adapter']['mean_logp_margin']:+.2f} nats")
    assert pref["adapter"]["mean_logp_margin"] > pref["base"]["mean_logp_margin"]
    # served greedy answers to the held-out prompts
    held_out = [json.loads(line)["prompt"]
                for line in (root / "examples/data/preference_style_heldout.jsonl").read_text().splitlines()]
    args = ["--model", "embedded:smollm2-135m-instruct", "--served-model-name", "base", "--adapters", str(adapters)]
    with lorafleet_serve(args, tmp_path, root) as (url, _, _):
        client = OpenAI(base_url=f"{url}/v1", api_key="sk-test")
        marked = {}
        for model in ("sft", "dpo"):
            answers = [client.chat.completions.create(model=model, messages=p, max_tokens=40, temperature=0)
                       .choices[0].message.content for p in held_out]
            marked[model] = sum(MARKER in a.lower() for a in answers)
            print(model, marked[model], "/10 with the marker:", answers[:3])
    assert marked["sft"] <= 3 and marked["dpo"] >= 8, marked
