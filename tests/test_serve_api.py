"""The HTTP layer with a fake engine (fast): protocol, errors, auth, limits, registry, LRU.

The real engine is exercised in test_serve_stack.py; here the engine is a stand-in so every
error path and header can be checked in milliseconds, through the official openai client.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time

import openai
import pytest
from fastapi.testclient import TestClient

from lorafleet.config import LimitsSection
from serve.app import Frontend, build_app
from serve.deployment import LocalBackend
from serve.engine import Delta, ModelServer
from serve.registry import AdapterRegistry


class FakeEngine:
    """Echoes: answer = '<adapter or base>:' + the last 3 prompt ids, one token per step."""

    max_model_len = 128

    def __init__(self):
        self.added, self.removed, self.calls = [], [], []
        self.dead = False
        self.refuse: set[str] = set()  # adapters the engine itself refuses (as vLLM does some)

    async def generate(self, prompt_ids, params, adapter, request_id, stream):
        self.calls.append((prompt_ids, params, adapter))
        words = [adapter[0] if adapter else "base"] + [str(t) for t in prompt_ids[-3:]]
        words = words[: params["max_tokens"]]
        for i in range(params["n"]):
            for j, w in enumerate(words):
                await asyncio.sleep(0)
                last = j == len(words) - 1
                text = (" " if j else "") + w
                # logprobs: -1 for the token, then alternatives -1, -2, ... (as many as asked)
                lps = None if params.get("logprobs") is None else [
                    (text, -1.0, ([(text, -1.0)] + [(f"alt{k}", -1.0 - k) for k in range(1, 20)])[:params["logprobs"]])]
                yield [Delta(i, text, 1, ("length" if len(words) == params["max_tokens"] else "stop")
                             if last else None, lps)]

    async def add_adapter(self, name, int_id, path):
        if name in self.refuse:
            raise RuntimeError(f"Call to add_lora method failed: adapter {name} is not supported")
        self.added.append(name)

    async def remove_adapter(self, int_id):
        self.removed.append(int_id)

    async def check_health(self):
        if self.dead:
            raise RuntimeError("engine process died")

    def shutdown(self):
        pass


@pytest.fixture()
def stack(tiny_base, tiny_adapters, tiny_tok, tmp_path):
    from lorafleet.models import base_fingerprint, module_shapes

    src = tmp_path / "adapters"
    shutil.copytree(tiny_adapters, src)
    engine = FakeEngine()
    server = ModelServer(engine, max_resident=1)
    reg = AdapterRegistry([str(src)], tmp_path / "cache", base_shapes=module_shapes(str(tiny_base)),
                          base_fingerprint=base_fingerprint(str(tiny_base))["fingerprint"], max_lora_rank=16)
    reg.scan()
    fe = Frontend(served_name="tiny", tokenizer=tiny_tok, base_template=tiny_tok.chat_template, registry=reg,
                  backend=LocalBackend(server), max_model_len=128,
                  limits=LimitsSection(max_tokens=64, max_n=4, max_body_bytes=64 * 1024, max_concurrent_per_key=8),
                  api_keys=["sk-user"], admin_keys=["sk-admin"])
    client = TestClient(build_app(fe))
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-user", http_client=client, max_retries=0)
    return type("Stack", (), dict(fe=fe, engine=engine, server=server, client=client, oai=oai, src=src))


def post(stack, path, body, key="sk-user", raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return stack.client.post(path, content=raw, headers={**headers, "content-type": "application/json"})
    return stack.client.post(path, json=body, headers=headers)


def test_models_lists_base_and_adapters_with_parent(stack):
    ids = {m.id: m for m in stack.oai.models.list().data}
    assert set(ids) == {"tiny", "alpha", "beta"}
    assert ids["alpha"].model_extra["parent"] == "tiny" and ids["tiny"].model_extra["parent"] is None


def test_chat_picks_adapter_per_request(stack):
    r = stack.oai.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert r.choices[0].message.content.startswith("beta") and r.object == "chat.completion"
    assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens == len(stack.engine.calls[-1][0])
    r = stack.oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content.startswith("base") and stack.engine.calls[-1][2] is None


def test_chat_prompt_uses_the_adapter_template(stack, tiny_tok):
    """An adapter with a manifest is prompted with its recorded template, not the base's."""
    from lorafleet.templates import SEED_TEMPLATE, render_prompt_ids

    man = {"template": {"name": "seed", "text": SEED_TEMPLATE}}
    (stack.src / "alpha" / "lorafleet.json").write_text(json.dumps(man))
    stack.fe.registry.adapters["alpha"].info = None  # re-read on next use
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    stack.oai.chat.completions.create(model="alpha", messages=msgs, max_tokens=2)
    assert stack.engine.calls[-1][0] == render_prompt_ids(tiny_tok, SEED_TEMPLATE, msgs)
    stack.oai.chat.completions.create(model="beta", messages=msgs, max_tokens=2)
    assert stack.engine.calls[-1][0] == render_prompt_ids(tiny_tok, tiny_tok.chat_template, msgs)


def test_streaming_chat_and_completions(stack):
    chunks = list(stack.oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}],
                                                    max_tokens=3, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("alpha") and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 3 and [c for c in chunks if c.choices][-1].choices[0].finish_reason
    chunks = list(stack.oai.completions.create(model="tiny", prompt="hello", max_tokens=2, stream=True))
    assert "".join(c.choices[0].text for c in chunks).startswith("base")
    raw = post(stack, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2, "stream": True})
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_n_stop_seed_reach_the_engine(stack):
    r = stack.oai.completions.create(model="tiny", prompt="hello", max_tokens=5, n=2, stop=["x"], seed=3,
                                     temperature=0.5, top_p=0.9)
    assert len(r.choices) == 2
    params = stack.engine.calls[-1][1]
    assert params == {"n": 2, "temperature": 0.5, "top_p": 0.9, "max_tokens": 5, "presence_penalty": 0.0,
                      "frequency_penalty": 0.0, "stop": ["x"], "seed": 3, "min_p": 0.0, "repetition_penalty": 1.0,
                      "min_tokens": 0, "ignore_eos": False}


def test_vllm_sampling_extensions_reach_the_engine(stack):
    """vLLM's extra sampling fields, as the openai client sends them (extra_body)."""
    stack.oai.completions.create(model="tiny", prompt="hello", max_tokens=4, extra_body={
        "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 3, "ignore_eos": True})
    params = stack.engine.calls[-1][1]
    assert (params["top_k"], params["min_p"], params["repetition_penalty"], params["ignore_eos"]) == (5, 0.1, 1.2, True)
    assert params["min_tokens"] == 3
    with pytest.raises(openai.BadRequestError) as e:  # as vLLM: not silently lowered
        stack.oai.completions.create(model="tiny", prompt="hello", max_tokens=4, extra_body={"min_tokens": 9})
    assert e.value.body["param"] == "min_tokens"
    stack.oai.completions.create(model="tiny", prompt="hello", extra_body={"min_tokens": 500})
    assert stack.engine.calls[-1][1]["min_tokens"] == stack.engine.calls[-1][1]["max_tokens"]  # the default fits
    with pytest.raises(openai.BadRequestError, match="repetition_penalty"):
        stack.oai.completions.create(model="tiny", prompt="hello", extra_body={"repetition_penalty": 0})


def test_errors_have_openai_shape(stack):
    with pytest.raises(openai.NotFoundError) as e:
        stack.oai.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        stack.oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        stack.oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 200}])
    assert e.value.body["code"] == "context_length_exceeded" and "128" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        stack.oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 40}],
                                          max_tokens=60)
    assert "maximum context length is 128" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        stack.oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=100)
    assert "limit of 64" in e.value.body["message"]
    r = post(stack, "/v1/chat/completions", None, raw=b"{bad json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = post(stack, "/v1/chat/completions", {"model": "tiny", "messages": [], "max_tokns": 3})
    assert r.status_code == 400 and r.json()["error"]["param"]


def test_auth_and_admin_keys(stack):
    assert post(stack, "/v1/chat/completions", {}, key=None).status_code == 401
    assert post(stack, "/v1/chat/completions", {}, key="sk-wrong").status_code == 401
    assert stack.client.get("/health").status_code == 200  # health needs no key
    r = post(stack, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "authentication_error"


def test_hot_load_unload_and_gate(stack, tiny_base, tmp_path):
    from fixtures import make_random_adapter

    make_random_adapter(tiny_base, stack.src / "late" / "gamma", seed=5, r=8)
    r = post(stack, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(stack.src / "late" / "gamma")},
             key="sk-admin")
    assert r.status_code == 200, r.text
    assert "gamma" in {m.id for m in stack.oai.models.list().data}
    assert stack.oai.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "x"}],
                                             max_tokens=1).choices[0].message.content == "gamma"
    # outside the roots: refused, even through a symlink
    outside = make_random_adapter(tiny_base, tmp_path / "elsewhere", seed=6)
    (stack.src / "link").symlink_to(outside)
    r = post(stack, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": str(stack.src / "link")},
             key="sk-admin")
    assert r.status_code == 403
    # rank above max_lora_rank: 422 at load time, others keep serving
    make_random_adapter(tiny_base, stack.src / "late" / "big", seed=7, r=32)
    r = post(stack, "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(stack.src / "late" / "big")},
             key="sk-admin")
    assert r.status_code == 422 and "rank 32" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "lora_path"
    assert stack.oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}],
                                             max_tokens=1).choices
    r = post(stack, "/v1/unload_lora_adapter", {"lora_name": "gamma"}, key="sk-admin")
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        stack.oai.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "x"}])


def test_adapter_for_another_base_is_refused(stack, tmp_path):
    from fixtures import build_tiny_llama, make_random_adapter

    other = build_tiny_llama(tmp_path / "other", __import__("pathlib").Path(__file__).parents[1], hidden=192)
    make_random_adapter(other, stack.src / "foreign", seed=1)
    stack.fe.registry.scan()
    with pytest.raises(openai.UnprocessableEntityError) as e:
        stack.oai.chat.completions.create(model="foreign", messages=[{"role": "user", "content": "x"}])
    assert "another base" in e.value.body["message"]
    assert stack.oai.chat.completions.create(model="beta", messages=[{"role": "user", "content": "x"}]).choices


def test_gate_reads_what_other_peft_code_writes(stack, tiny_base):
    # A regex target_modules is judged by the modules in the weights (served); bias="lora_only"
    # is refused at load (vLLM cannot apply it) and then no longer listed; neither stops the others.
    from fixtures import make_random_adapter

    msgs = [{"role": "user", "content": "x"}]
    make_random_adapter(tiny_base, stack.src / "regex", seed=8, targets=r".*\.(q_proj|v_proj)")
    make_random_adapter(tiny_base, stack.src / "biased", seed=9, bias="lora_only")
    assert stack.oai.chat.completions.create(model="regex", messages=msgs, max_tokens=1).choices
    assert {"regex", "biased"} <= {m.id for m in stack.oai.models.list().data}
    with pytest.raises(openai.UnprocessableEntityError, match="bias"):
        stack.oai.chat.completions.create(model="biased", messages=msgs, max_tokens=1)
    assert "biased" not in {m.id for m in stack.oai.models.list().data}
    assert stack.oai.chat.completions.create(model="alpha", messages=msgs, max_tokens=1).choices


def test_unloaded_adapter_stays_gone_until_loaded_again(stack):
    # An adapter found by scanning the source, unloaded through the admin API: gone from the
    # listing and 404 (vLLM's meaning of unload), though its directory is still in the source.
    msgs = [{"role": "user", "content": "x"}]
    assert post(stack, "/v1/unload_lora_adapter", {"lora_name": "beta"}, key="sk-admin").status_code == 200
    for _ in range(2):  # every listing rescans the sources
        assert "beta" not in {m.id for m in stack.oai.models.list().data}
    assert "beta" not in post(stack, "/v1/adapters/rescan", {}, key="sk-admin").json()["adapters"]
    with pytest.raises(openai.NotFoundError):
        stack.oai.chat.completions.create(model="beta", messages=msgs, max_tokens=1)
    r = post(stack, "/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": str(stack.src / "beta")}, key="sk-admin")
    assert r.status_code == 200, r.text
    assert stack.oai.chat.completions.create(model="beta", messages=msgs, max_tokens=1).choices


def test_an_adapter_named_like_the_base_is_not_served_under_that_name(stack):
    shutil.copytree(stack.src / "alpha", stack.src / "tiny")
    stack.fe.registry.base_name = "tiny"
    stack.fe.registry.scan()
    ids = [m.id for m in stack.oai.models.list().data]
    assert ids.count("tiny") == 1 and "base model's served name" in stack.fe.registry.rejected["tiny"]
    r = stack.oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert r.choices[0].message.content == "base" and stack.engine.calls[-1][2] is None


def test_lru_eviction_and_single_load(stack):
    """max_resident=1: alternating adapters evicts; concurrent first requests load once."""
    async def burst():
        async def one():
            chunks = []
            async for ev in stack.server.generate({"prompt_ids": [1, 2], "params": {"n": 1, "max_tokens": 2},
                                                   "adapter": {"name": "alpha", "path": str(stack.src / "alpha")},
                                                   "request_id": "r", "stream": False}):
                chunks.append(ev)
            return chunks
        await asyncio.gather(*[one() for _ in range(8)])
    asyncio.run(burst())
    assert stack.engine.added == ["alpha"]
    stack.oai.chat.completions.create(model="beta", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert stack.engine.added == ["alpha", "beta"] and len(stack.engine.removed) == 1
    metrics = stack.client.get("/metrics").text
    assert 'lorafleet_adapter_evictions_total{model="alpha"} 1.0' in metrics
    assert 'lorafleet_requests_total{model="beta"' in metrics


def test_adapter_replaced_in_place_is_reloaded_by_every_replica(stack, tiny_base):
    """The version travels with each request: a replica that never saw the admin call still
    reloads an adapter whose files changed (load_inplace), and keeps one that did not."""
    from fixtures import make_random_adapter

    def ask():
        stack.oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}], max_tokens=1)

    ask()
    ask()
    assert stack.engine.added.count("alpha") == 1  # same bytes: loaded once
    time.sleep(0.01)  # a new mtime for the rewritten weights
    make_random_adapter(tiny_base, stack.src / "alpha", seed=42, r=8)
    stack.fe.backend.unload = lambda name: asyncio.sleep(0)  # as if the admin call went to another replica
    r = post(stack, "/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": str(stack.src / "alpha"),
                                              "load_inplace": True}, key="sk-admin")
    assert r.status_code == 200, r.text
    ask()
    assert stack.engine.added.count("alpha") == 2


def test_health_reports_a_dead_engine(stack):
    assert stack.client.get("/health").json() == {"status": "ok"}
    stack.engine.dead = True
    assert stack.client.get("/health").status_code == 503


def test_client_errors_are_400s_naming_the_parameter(stack):
    # vLLM's own checks (VLLMValidationError) run before anything streams: a 400, never a retryable 503
    msgs = [{"role": "user", "content": "x"}]
    cases = [
        (dict(stop=""), "stop"), (dict(stop=["a", ""]), "stop"), (dict(n=2, temperature=0), "n"),
        (dict(seed=2**70), "seed"), (dict(logit_bias={"99999999": 5}), "logit_bias"),
        (dict(logit_bias={"x": 5}), "logit_bias"), (dict(logit_bias={"5": 101}), "logit_bias"),
        (dict(stream_options={"include_usage": True}), None), (dict(top_logprobs=2), None),
        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    ]
    for kwargs, param in cases:
        for stream in (False, True) if "stream_options" not in kwargs else (False,):
            with pytest.raises(openai.BadRequestError) as e:
                stack.oai.chat.completions.create(model="alpha", messages=msgs, max_tokens=3, stream=stream, **kwargs)
            assert e.value.body["param"] == param, (kwargs, e.value.body)
    for kwargs, param in [(dict(echo=True), "echo"), (dict(suffix="END"), "suffix"), (dict(best_of=3), "best_of"),
                          (dict(logprobs=21), "logprobs")]:
        with pytest.raises(openai.BadRequestError, match=param) as e:
            stack.oai.completions.create(model="tiny", prompt="hello", max_tokens=3, **kwargs)
        assert e.value.body["param"] == param
    r = post(stack, "/v1/chat/completions", None, raw=b'{"model": "tiny", "messages": [{"role": "user", '
                                                      b'"content": "x"}], "temperature": NaN}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature" and "finite" in r.text
    r = post(stack, "/v1/completions", {"model": "tiny", "prompt": [True, 5]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt"), r.text
    r = post(stack, "/v1/completions", {"model": "tiny", "prompt": ["a", ["b"]]})
    assert r.status_code == 400 and ".str" not in r.json()["error"]["param"], r.text
    r = post(stack, "/v1/completions", {"model": "tiny", "prompt": "word " * 200})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert stack.engine.calls == []  # none of them reached the engine


def test_logit_bias_and_logprobs(stack):
    stack.oai.completions.create(model="tiny", prompt="hello", max_tokens=3, logit_bias={"7": -100, "9": 2.5})
    assert stack.engine.calls[-1][1]["logit_bias"] == {7: -100, 9: 2.5}
    msgs = [{"role": "user", "content": "x"}]
    r = stack.oai.chat.completions.create(model="alpha", messages=msgs, max_tokens=3, logprobs=True, top_logprobs=2)
    assert stack.engine.calls[-1][1]["logprobs"] == 2
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and "".join(t.token for t in content) == r.choices[0].message.content
    assert content[0].logprob == -1.0 and [a.logprob for a in content[0].top_logprobs] == [-1.0, -2.0]
    assert content[0].bytes == list(content[0].token.encode())
    r = stack.oai.chat.completions.create(model="alpha", messages=msgs, max_tokens=3)
    assert r.choices[0].logprobs is None and "logprobs" not in stack.engine.calls[-1][1]
    chunks = list(stack.oai.chat.completions.create(model="alpha", messages=msgs, max_tokens=3, logprobs=True,
                                                    stream=True))
    toks = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(toks) == 3 and toks[0].top_logprobs == []  # logprobs without top_logprobs: the token's own
    r = stack.oai.completions.create(model="tiny", prompt="hello", max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and lp.token_logprobs == [-1.0] * 3
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    assert lp.top_logprobs[1] == {lp.tokens[1]: -1.0, "alt1": -2.0}
    r = stack.oai.completions.create(model="tiny", prompt="hello", max_tokens=3, logprobs=0)
    lp = r.choices[0].logprobs  # the sampled token is always among top_logprobs (logprobs + 1 entries)
    assert lp.top_logprobs == [{t: -1.0} for t in lp.tokens]
    chunks = list(stack.oai.completions.create(model="tiny", prompt="hello", max_tokens=3, logprobs=1, stream=True))
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


def test_an_adapter_the_engine_refuses_is_a_422_and_leaves_the_listing(stack):
    stack.engine.refuse.add("beta")
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.UnprocessableEntityError, match="beta") as e:
        stack.oai.chat.completions.create(model="beta", messages=msgs, max_tokens=2)
    assert e.value.body["code"] == "adapter_incompatible"
    assert {m.id for m in stack.oai.models.list().data} == {"tiny", "alpha"}
    stack.oai.chat.completions.create(model="alpha", messages=msgs, max_tokens=2)
    loads = stack.server.loads
    with pytest.raises(openai.UnprocessableEntityError, match="beta"):  # not sent to the engine again:
        stack.oai.chat.completions.create(model="beta", messages=msgs, max_tokens=2)
    assert stack.server.loads == loads and "alpha" in stack.server.resident  # nothing evicted for it
    assert stack.oai.chat.completions.create(model="alpha", messages=msgs, max_tokens=2).choices[0].message.content


def test_models_by_path_id_and_openai_shaped_404s(stack):
    stack.fe.served_name = "org/base-model"
    assert stack.oai.models.retrieve("org/base-model").id == "org/base-model"
    for method, path, status in [("GET", "/v1/embeddings", 404), ("GET", "/v1/chat/completions", 405)]:
        r = stack.client.request(method, path, headers={"Authorization": "Bearer sk-user"})
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text


def test_a_non_streamed_request_is_aborted_when_its_client_leaves():
    from serve.app import ClientDisconnected, until_disconnected

    closed = asyncio.Event()

    async def slow():
        try:
            while True:
                await asyncio.sleep(0.01)
                yield 1
        finally:
            closed.set()

    class Request:
        calls = 0

        async def is_disconnected(self):
            self.calls += 1
            return self.calls > 2

    async def consume():
        async for _ in until_disconnected(Request(), slow(), poll_s=0.05):
            await asyncio.sleep(0.1)  # the answer is assembled slowly; the client leaves meanwhile

    async def main():
        with pytest.raises(ClientDisconnected):
            await asyncio.wait_for(consume(), 10)
        await asyncio.wait_for(closed.wait(), 5)

    asyncio.run(main())


def test_api_key_flag_like_vllms(monkeypatch):
    from typer.testing import CliRunner

    import serve.launch
    from lorafleet.cli import app

    seen = {}
    monkeypatch.setattr(serve.launch, "launch", lambda cfg, log: seen.update(cfg=cfg, keys=os.environ["LORAFLEET_API_KEY"]))
    monkeypatch.setenv("LORAFLEET_API_KEY", "sk-env")
    r = CliRunner().invoke(app, ["serve", "--model", "m", "--api-key", "sk-a", "--api-key", "sk-b"])
    assert r.exit_code == 0, r.output
    assert seen["keys"] == "sk-env,sk-a,sk-b" and seen["cfg"].model == "m"


def test_a_dead_engine_ends_the_replica_process():
    # vLLM does not restart its engine: the replica's process ends (exit code 70) so that Ray Serve
    # starts a new one, as vLLM's own server exits. An engine shut down on purpose is no death.
    from serve.deployment import EngineWatch

    engine, exits = FakeEngine(), []
    EngineWatch(engine, poll_s=0.01, exit=exits.append)
    time.sleep(0.1)
    assert exits == []
    engine.dead = True
    deadline = time.time() + 5
    while not exits and time.time() < deadline:
        time.sleep(0.01)
    assert exits == [70]

    engine, exits = FakeEngine(), []
    watch = EngineWatch(engine, poll_s=0.01, exit=exits.append)
    watch.stop()
    engine.dead = True
    watch.thread.join(5)
    assert exits == [] and not watch.thread.is_alive()


def test_body_limit_and_per_key_concurrency(stack):
    r = post(stack, "/v1/chat/completions", None, raw=b'{"model": "tiny", "x": "' + b"a" * 70_000 + b'"}')
    assert r.status_code == 413
    stack.fe.per_key_in_flight["sk-user"] = 8
    r = post(stack, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"


def test_disappearing_adapter_source(stack):
    """A PVC that goes away: its adapters answer 404 with a clear message, the base keeps serving,
    and they come back when the path does."""
    backup = stack.src.with_name("adapters-away")
    stack.src.rename(backup)
    try:
        with pytest.raises(openai.NotFoundError) as e:
            stack.oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}])
        assert e.value.body["code"] == "model_not_found"
        assert {m.id for m in stack.oai.models.list().data} == {"tiny"}
        assert stack.oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}]).choices
    finally:
        backup.rename(stack.src)
    r = stack.oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert r.choices[0].message.content == "alpha"


def test_lean_ray_defaults_only_for_a_ray_started_here():
    from serve.launch import LOCAL_RAY_DEFAULTS, local_ray_environment

    assert local_ray_environment(None, {}) == LOCAL_RAY_DEFAULTS
    assert local_ray_environment("ray://head:10001", {}) == {}  # a cluster has its own settings
    assert local_ray_environment(None, {"RAY_ADDRESS": "head:6379"}) == {}
    kept = local_ray_environment(None, {"RAY_enable_metrics_collection": "1"})
    assert "RAY_enable_metrics_collection" not in kept and len(kept) == len(LOCAL_RAY_DEFAULTS) - 1


def test_unload_frees_the_adapter_on_every_replica(stack):
    # Ray Serve routes the admin unload to one engine replica; the others learn it from the next
    # request they get (the ingress lists recent unloads in every call) and free it then.
    replicas = [ModelServer(FakeEngine(), max_resident=4), ModelServer(FakeEngine(), max_resident=4)]
    turn = iter(range(10**6))

    class TwoReplicas:
        def generate(self, call):
            return replicas[next(turn) % 2].generate(call)

        async def unload(self, name):
            await replicas[0].unload(name)

        async def health(self):
            pass

    stack.fe.backend = TwoReplicas()
    ask = lambda model: stack.oai.completions.create(model=model, prompt="x", max_tokens=1)  # noqa: E731
    ask("alpha"), ask("alpha")  # one request on each replica: both hold alpha
    assert all("alpha" in r.resident for r in replicas)
    assert post(stack, "/v1/unload_lora_adapter", {"lora_name": "alpha"}, key="sk-admin").status_code == 200
    assert "alpha" not in replicas[0].resident and "alpha" in replicas[1].resident
    ask("beta"), ask("beta")  # the next request on replica 1 carries the notice
    assert not any("alpha" in r.resident for r in replicas)
    assert replicas[1].engine.removed, "the engine was not asked to remove the adapter"
    # registered again: no longer listed as unloaded, loads as usual
    path = str(stack.src / "alpha")
    assert post(stack, "/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": path},
                key="sk-admin").status_code == 200
    assert stack.fe.recently_unloaded() == []
    assert ask("alpha").choices[0].text.startswith("alpha")


def test_who_listens_on_the_port():
    from lorafleet.config import ServeConfig
    from serve.launch import replica_listens

    assert replica_listens(ServeConfig(), {})  # lorafleet's own Ray, one replica: the replica listens
    assert not replica_listens(ServeConfig(address="ray://head:10001"), {})  # a cluster keeps Ray's proxy
    assert not replica_listens(ServeConfig(), {"RAY_ADDRESS": "head:6379"})
    assert not replica_listens(ServeConfig(autoscaling={"max_replicas": 2}), {})  # several replicas: routed
    assert not replica_listens(ServeConfig(http_listener="proxy"), {})
    assert replica_listens(ServeConfig(http_listener="replica", address="ray://head:10001"), {})
    with pytest.raises(ValueError, match="http_listener replica needs the fused topology"):
        ServeConfig(http_listener="replica", topology="split")


def test_taken_port_is_one_clear_error_before_ray_starts():
    import socket

    from lorafleet.config import ServeConfig
    from lorafleet.errors import UserError
    from serve.launch import launch

    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        with pytest.raises(UserError, match=rf"cannot listen on 127.0.0.1:{port} .*--port"):
            launch(ServeConfig(port=port), log=lambda m: None)


def test_replica_listener_serves_the_app_and_reports_when_it_stops(stack):
    """serve/listener.py on an event loop of its own, as in the fused replica: the openai client
    gets its answers over real HTTP; a second bind of the port is refused with the fix; once
    stopped, check() raises (Ray Serve's health check then replaces the replica)."""
    import threading

    from lorafleet.net import free_port
    from serve.listener import ReplicaListener, bind

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    port = free_port()
    listener = asyncio.run_coroutine_threadsafe(
        ReplicaListener.start(build_app(stack.fe), "127.0.0.1", port), loop).result(timeout=30)
    try:
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-user", max_retries=0)
        r = oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}], max_tokens=4)
        assert r.choices[0].message.content.startswith("alpha")
        streamed = oai.completions.create(model="tiny", prompt="x", max_tokens=3, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices).startswith("base")
        listener.check()
        with pytest.raises(RuntimeError, match=rf"cannot listen on 127.0.0.1:{port} .*--port"):
            bind("127.0.0.1", port)
    finally:
        loop.call_soon_threadsafe(listener.stop)
    deadline = time.time() + 10
    while not listener.task.done() and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(RuntimeError, match="HTTP listener stopped"):
        listener.check()
    loop.call_soon_threadsafe(loop.stop)


def test_rayservice_entrypoint_keeps_rays_proxy():
    from lorafleet.errors import UserError
    from serve.entrypoint import build

    with pytest.raises(UserError, match="http_listener replica is for `lorafleet serve`"):
        build({"http_listener": "replica"})
