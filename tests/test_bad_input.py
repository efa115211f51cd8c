"""A catalogue of malformed requests: each gets a 4xx that names the problem; the server stays healthy.

Runs against the HTTP layer with the fake engine (tests/test_serve_api.py), so it is fast; the
same validation code runs in front of the real engine.
"""

from __future__ import annotations

import json

import pytest

from test_serve_api import post, stack  # noqa: F401  (fixture)

M = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"

# (route, body or raw bytes, expected status, a word the error message must contain)
CASES = [
    (CHAT, b"", 400, "JSON"),
    (CHAT, b"{", 400, "JSON"),
    (CHAT, b"[1, 2]", 400, "object"),
    (CHAT, b'"just a string"', 400, "object"),
    (CHAT, b"\xff\xfe\x00garbage", 400, "UTF-8"),
    (CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "\xc3\x28"}]}', 400, "UTF-8"),
    (CHAT, {"messages": M}, 400, "model"),
    (CHAT, {"model": "tiny"}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": []}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": "hi"}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user"}]}, 400, "content"),
    (CHAT, {"model": "tiny", "messages": [{"content": "hi"}]}, 400, "role"),
    (CHAT, {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": 42}]}, 400, "content"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "text"),
    (CHAT, {"model": "", "messages": M}, 400, "model"),
    (CHAT, {"model": 7, "messages": M}, 400, "model"),
    (CHAT, {"model": "nope", "messages": M}, 404, "does not exist"),
    (CHAT, {"model": "../../etc/passwd", "messages": M}, 404, "does not exist"),
    (CHAT, {"model": "tiny", "messages": M, "temperature": -1}, 400, "temperature"),
    (CHAT, {"model": "tiny", "messages": M, "temperature": 3.5}, 400, "temperature"),
    (CHAT, {"model": "tiny", "messages": M, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"model": "tiny", "messages": M, "top_p": 0}, 400, "top_p"),
    (CHAT, {"model": "tiny", "messages": M, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"model": "tiny", "messages": M, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"model": "tiny", "messages": M, "max_tokens": -5}, 400, "max_tokens"),
    (CHAT, {"model": "tiny", "messages": M, "max_tokens": 10**9}, 400, "max_tokens"),
    (CHAT, {"model": "tiny", "messages": M, "max_tokens": "many"}, 400, "max_tokens"),
    (CHAT, {"model": "tiny", "messages": M, "n": 0}, 400, "n"),
    (CHAT, {"model": "tiny", "messages": M, "n": 1000}, 400, "n"),
    (CHAT, {"model": "tiny", "messages": M, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (CHAT, {"model": "tiny", "messages": M, "stop": 5}, 400, "stop"),
    (CHAT, {"model": "tiny", "messages": M, "stream": "yes please"}, 400, "stream"),
    (CHAT, {"model": "tiny", "messages": M, "stream": 2}, 400, "stream"),
    (CHAT, {"model": "tiny", "messages": M, "seed": "x"}, 400, "seed"),
    (CHAT, {"model": "tiny", "messages": M, "presence_penalty": 9}, 400, "presence_penalty"),
    (CHAT, {"model": "tiny", "messages": M, "frequency_penalty": -9}, 400, "frequency_penalty"),
    (CHAT, {"model": "tiny", "messages": M, "max_tokn": 5}, 400, "max_tokn"),
    (CHAT, {"model": "tiny", "messages": M, "tools": [{"type": "function"}]}, 400, "tools"),
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


@pytest.mark.parametrize("route,body,status,word", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_malformed_request(stack, route, body, status, word):  # noqa: F811
    r = post(stack, route, None if isinstance(body, bytes) else body, raw=body if isinstance(body, bytes) else None)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert word.lower() in (err["message"] + " " + str(err.get("param"))).lower(), err
    assert set(err) == {"message", "type", "param", "code"}


def test_catalogue_is_large_and_server_stays_healthy(stack):  # noqa: F811
    assert len(CASES) >= 40
    for route, body, _, _ in CASES:
        post(stack, route, None if isinstance(body, bytes) else body, raw=body if isinstance(body, bytes) else None)
    assert stack.client.get("/health").json() == {"status": "ok"}
    r = post(stack, CHAT, {"model": "tiny", "messages": M, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_openapi_documents_request_bodies(stack):  # noqa: F811
    spec = stack.client.get("/openapi.json").json()
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("ChatCompletionRequest")
    assert "ChatMessage" in spec["components"]["schemas"]
    json.dumps(spec)
