"""The edge server (serve/edge/) against the real onnxruntime-genai engine and the official client.

An open export of the tiny base (LoRA inputs on every projection, rank 16) with two adapters
converted afterwards; the server runs as `python -m serve.edge`. Answers are compared with peft
(greedy, float32), with the same request sent alone, and with each other under concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lorafleet.net import free_port, stop_server, wait_until_serving

quiet = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def export(tiny_base, tiny_adapters, tmp_path_factory):
    from merge.onnx import export_onnx
    from merge.onnx_adapters import convert_adapter

    out = export_onnx(tiny_base, tmp_path_factory.mktemp("edge") / "tiny-edge", max_lora_rank=16, **quiet)
    for name in ("alpha", "beta"):
        convert_adapter(out, tiny_adapters / name)
    return out


@contextlib.contextmanager
def edge_server(export: Path, work: Path, *extra: str):
    port = free_port()
    log = work / f"edge-{port}.log"
    env = dict(os.environ, LORAFLEET_API_KEY="sk-edge", LORAFLEET_ADMIN_KEY="sk-admin",
               LORAFLEET_CACHE=str(work / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "serve.edge", "--set", f"model={export}", "--set", f"port={port}",
                             "--set", "served_model_name=tiny", *extra],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc, log, timeout=120)
        yield url, log
    finally:
        stop_server(proc, grace_s=10)


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    work = tmp_path_factory.mktemp("edge-server")
    extra = work / "more-adapters"
    extra.mkdir()
    with edge_server(export, work, "--set", f"adapters=[{extra}]") as (url, log):
        yield url, extra, log


def client(url: str, key: str = "sk-edge"):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def peft_greedy(tiny_base, tiny_adapters, adapter: str | None, ids: list[int], n: int) -> list[int]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, str(tiny_adapters / adapter))
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0][len(ids):].tolist()


def test_each_model_answers_as_peft(server, tiny_base, tiny_adapters, tiny_tok):
    """Greedy completions of the base and of each adapter equal peft's on the float model."""
    url, _, _ = server
    ids = [5, 17, 33, 2, 41, 9]
    c = client(url)
    texts = {}
    for model, adapter in (("tiny", None), ("alpha", "alpha"), ("beta", "beta")):
        r = c.completions.create(model=model, prompt=ids, max_tokens=10, temperature=0)
        want = tiny_tok.decode(peft_greedy(tiny_base, tiny_adapters, adapter, ids, 10), skip_special_tokens=True)
        assert r.choices[0].text == want, model
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10
        texts[model] = r.choices[0].text
    assert len(set(texts.values())) == 3  # the adapters really change the answer


def test_chat_answers_equal_lorafleet_generate(server, export):
    """Each model's greedy chat answer is, token for token, what `lorafleet generate --onnx
    [--adapter]` (onnxruntime-genai's own generator) gives for the same question."""
    from merge.onnx import generate_text

    url, _, _ = server
    c = client(url)
    for model, adapter in (("tiny", None), ("alpha", "alpha"), ("beta", "beta")):
        for question in ("What is the refund window?", "hi"):
            want = generate_text(export, question, max_new_tokens=12, adapter=adapter)
            got = c.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            max_tokens=12, temperature=0).choices[0].message.content
            assert got == want, (model, question)


def test_concurrent_answers_equal_alone(server):
    """Requests for the base and both adapters at once, streamed and not: each answer is exactly the
    one the same request gets alone (no request ever computed with another's adapter)."""
    from openai import AsyncOpenAI

    url, _, _ = server
    rng = random.Random(int(os.environ.get("LORAFLEET_FUZZ_SEED", "20261206")))
    reqs = []
    for i in range(24):
        chat = rng.random() < 0.5
        body = {"model": rng.choice(["tiny", "alpha", "beta"]), "max_tokens": rng.randint(3, 24), "temperature": 0}
        if rng.random() < 0.3:  # sampled with a seed: the same draws alone and batched
            body.update(temperature=0.9, seed=rng.randrange(1000), top_p=rng.choice([1.0, 0.8]),
                        extra_body={"top_k": rng.choice([None, 20])})
        if rng.random() < 0.2:
            body["extra_body"] = {**body.get("extra_body", {}), "ignore_eos": True}
        if chat:
            body["messages"] = [{"role": "user", "content": f"question {i} " + "x" * rng.randint(0, 30)}]
        else:
            body["prompt"] = [rng.randrange(3, 700) for _ in range(rng.randint(1, 12))]
        reqs.append((chat, rng.random() < 0.5, body))

    async def one(c, chat, stream, body):
        api = c.chat.completions if chat else c.completions
        if not stream:
            r = await api.create(**body)
            return r.choices[0].message.content if chat else r.choices[0].text
        parts = []
        async for ch in await api.create(**body, stream=True):
            if ch.choices:
                parts.append((ch.choices[0].delta.content if chat else ch.choices[0].text) or "")
        return "".join(parts)

    async def run():
        c = AsyncOpenAI(base_url=url + "/v1", api_key="sk-edge", max_retries=0)
        alone = [await one(c, *r) for r in reqs]
        together = await asyncio.gather(*(one(c, *r) for r in reqs))
        return alone, together

    alone, together = asyncio.run(run())
    assert together == alone


def test_hung_up_streams_leave_the_others_whole(server):
    """Clients that hang up mid-stream leave the batch; the requests beside them still get their
    lone answers, and the adapters they used serve again afterwards."""
    url, _, _ = server
    def body(model, i):
        return {"model": model, "prompt": [5 + i, 17, 33], "max_tokens": 40, "temperature": 0, "ignore_eos": True}

    alone = {m: httpx.post(url + "/v1/completions", json=body(m, 0), headers={"Authorization": "Bearer sk-edge"},
                           timeout=60).json()["choices"][0]["text"] for m in ("alpha", "beta", "tiny")}

    async def run():
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer sk-edge"}, timeout=60) as c:
            async def hang_up(model, i):
                async with c.stream("POST", "/v1/completions", json={**body(model, i), "stream": True}) as r:
                    async for _ in r.aiter_lines():
                        return  # leaves after the first line: the server sees the client go

            async def whole(model):
                r = await c.post("/v1/completions", json=body(model, 0))
                return model, r.json()["choices"][0]["text"]

            results = await asyncio.gather(*(hang_up(m, i) for i, m in enumerate(["alpha", "beta", "alpha"] * 2)),
                                           *(whole(m) for m in ("alpha", "beta", "tiny")))
            return dict(r for r in results if r)

    assert asyncio.run(run()) == alone
    again = client(url).completions.create(**{k: v for k, v in body("alpha", 0).items() if k != "ignore_eos"},
                                           extra_body={"ignore_eos": True})
    assert again.choices[0].text == alone["alpha"] and again.usage.completion_tokens == 40


def test_sampling_is_transformers_top_k_then_top_p():
    """The tokens a sampled request can get are exactly those transformers' TopK and TopP warpers keep."""
    import numpy as np
    import torch
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from serve.edge.engine import Sampling, distribution

    rng = np.random.default_rng(0)
    for _ in range(50):
        logits = rng.normal(0, 3, 300).astype(np.float32)
        s = Sampling(8, temperature=float(rng.uniform(0.3, 1.5)), top_p=float(rng.choice([1.0, 0.9, 0.5])),
                     top_k=int(rng.choice([0, 5, 40])) or None)
        scores = torch.tensor(logits, dtype=torch.float64)[None] / s.temperature
        if s.top_k:
            scores = TopKLogitsWarper(s.top_k)(None, scores)
        if s.top_p < 1:
            scores = TopPLogitsWarper(s.top_p)(None, scores)
        order, p = distribution(logits, s)
        assert set(order.tolist()) == set(torch.nonzero(torch.isfinite(scores[0])).flatten().tolist())
        want = torch.softmax(scores[0], -1).numpy()[order]
        np.testing.assert_allclose(p, want, rtol=1e-9, atol=1e-12)


def test_stream_shapes_and_usage(server):
    url, _, _ = server
    chunks = list(client(url).chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    whole = client(url).chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=6, temperature=0)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1]) == whole.choices[0].message.content


def test_refusals_name_the_field(server):
    """What the engine cannot honour is a 400 naming the field, never a 200 that ignored it."""
    import openai

    url, _, _ = server
    c = client(url)
    msgs = [{"role": "user", "content": "hi"}]
    cases = [({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
             ({"response_format": {"type": "json_object"}}, "response_format"), ({"n": 2}, "n"),
             ({"logprobs": True}, "logprobs"), ({"presence_penalty": 0.5}, "presence_penalty"),
             ({"max_tokens": 100000}, "max_tokens"), ({"temperature": "hot"}, "temperature"),
             ({"seed": -1, "temperature": 1}, "seed"), ({"extra_body": {"top_k": 2.5}}, "top_k"),
             ({"top_p": 0}, "top_p")]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="beta", messages=msgs, **extra)
        assert e.value.body["param"] == param, extra
    with pytest.raises(openai.NotFoundError, match="tiny, alpha, beta"):
        c.chat.completions.create(model="gamma", messages=msgs)
    with pytest.raises(openai.AuthenticationError):
        client(url, "sk-wrong").chat.completions.create(model="tiny", messages=msgs)
    r = httpx.post(url + "/v1/responses", json={"model": "tiny", "input": "hi"}, headers={"Authorization": "Bearer sk-edge"})
    assert r.status_code == 404 and "/v1/chat/completions" in r.json()["error"]["message"]
    ok = c.chat.completions.create(model="beta", messages=msgs, max_tokens=2, n=1, logprobs=False,  # "off" values
                                   extra_body={"top_k": -1, "ignore_eos": True})  # vLLM's top_k off
    assert ok.choices[0].finish_reason == "length"  # and the engine lives on after the refusals
    ids = {m.id: m for m in c.models.list().data}
    assert set(ids) == {"tiny", "alpha", "beta"} and ids["alpha"].parent == "tiny"
    metrics = httpx.get(url + "/metrics").text
    assert 'lorafleet_requests_total{model="beta",route="/v1/chat/completions",status="400",version=""}' in metrics


def test_new_adapter_without_restart(server, export, tiny_base, tmp_path):
    """An adapter trained after the export is converted on its own and served by the running server
    (admin load, then rescan); one converted for another export is refused, naming why."""
    from fixtures import make_random_adapter
    from merge.onnx import export_onnx
    from merge.onnx_adapters import convert_adapter

    url, extra, _ = server
    admin = {"Authorization": "Bearer sk-admin"}
    gamma = make_random_adapter(tiny_base, tmp_path / "gamma", seed=7, r=4, targets=("k_proj", "gate_proj"))
    convert_adapter(export, gamma, out_dir=extra)
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(extra / "gamma")},
                   headers=admin)
    assert r.status_code == 200, r.text
    c = client(url)
    g = c.completions.create(model="gamma", prompt=[5, 17, 33], max_tokens=8, temperature=0).choices[0].text
    b = c.completions.create(model="tiny", prompt=[5, 17, 33], max_tokens=8, temperature=0).choices[0].text
    assert g != b

    delta = make_random_adapter(tiny_base, tmp_path / "delta", seed=8, r=4)
    convert_adapter(export, delta, out_dir=extra)
    narrow = export_onnx(tiny_base, tmp_path / "narrow", max_lora_rank=8, **quiet)
    convert_adapter(narrow, make_random_adapter(tiny_base, tmp_path / "wrong", seed=9, r=4), out_dir=extra)
    found = httpx.post(url + "/v1/adapters/rescan", headers=admin).json()
    assert {"delta", "gamma"} <= set(found["adapters"]) and "wrong" not in found["adapters"]
    assert "rank 8" in found["rejected"]["wrong"] and "onnx-adapter" in found["rejected"]["wrong"]
    assert {m.id for m in c.models.list().data} >= {"gamma", "delta"}
    assert "wrong" not in {m.id for m in c.models.list().data}
    assert c.completions.create(model="delta", prompt=[5], max_tokens=2).usage.completion_tokens == 2


def test_edge_server_imports_no_torch_vllm_ray(export, tmp_path):
    """The edge server, built and answering a request, has not imported torch, vLLM or Ray."""
    code = f"""
import sys, json
from starlette.testclient import TestClient
from lorafleet.config import ServeConfig
from serve.edge.server import build_edge_app
app = build_edge_app(ServeConfig(model={str(export)!r}, served_model_name="tiny"), {str(export)!r})
with TestClient(app) as c:
    r = c.post("/v1/chat/completions", json={{"model": "alpha", "messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 3}})
    assert r.status_code == 200, r.text
    assert c.get("/v1/models").status_code == 200
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "vllm", "ray", "peft"}})))
"""
    env = dict(os.environ, LORAFLEET_CACHE=str(tmp_path / "cache"))
    env.pop("LORAFLEET_API_KEY", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_lora_protocol_matches_vllm():
    """The admin routes' bodies (serve/contract.py) are vLLM's, field for field."""
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

    from serve import contract

    for mine, theirs in ((contract.LoadLoRAAdapterRequest, LoadLoRAAdapterRequest),
                         (contract.UnloadLoRAAdapterRequest, UnloadLoRAAdapterRequest)):
        assert {k: (f.annotation, f.default) for k, f in mine.model_fields.items()} == \
               {k: (f.annotation, f.default) for k, f in theirs.model_fields.items()}
