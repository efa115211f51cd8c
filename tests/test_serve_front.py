"""The HTTP front with a stand-in replica (fast): keys, limits, drain, registry, gate, admin,
metrics, disconnects. What vLLM answers is tested against vLLM itself (test_openai_compat.py).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from lorafleet.config import LimitsSection
from serve.contract import AdapterLoadError, End, ReplicaRequest, Start
from serve.registry import AdapterRegistry
from serve.routes import Frontend, build_app

JSON = [(b"content-type", b"application/json")]


class FakeReplica:
    """Answers every OpenAI route with what it was asked: the route, model, adapter version."""

    def __init__(self):
        self.requests: list[ReplicaRequest] = []
        self.unloaded: list[str] = []
        self.refuse: set[str] = set()  # adapters "the engine" refuses
        self.dead = False
        self.chunks = 1
        self.cancelled = asyncio.Event()

    async def handle(self, req: ReplicaRequest):
        self.requests.append(req)
        if req.adapter is not None and req.adapter.name in self.refuse:
            raise AdapterLoadError(f"the engine refused adapter {req.adapter.name}: not supported")
        body = json.loads(req.body)
        yield Start(200, JSON, loaded=req.adapter is not None, evicted=[])
        try:
            for i in range(self.chunks):
                if i:
                    await asyncio.sleep(0.05)
                yield json.dumps({"path": req.path, "model": body.get("model"),
                                  "adapter": req.adapter and req.adapter.name}).encode()
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.set()
            raise
        yield End(3, 4)

    async def unload(self, name):
        self.unloaded.append(name)

    def replica_gone(self, e):
        return isinstance(e, ReplicaGone)

    async def serve_asgi(self, req, receive, send, on_start):
        """The in-process path (fused topology): the answer goes straight to the client's send."""
        events = self.handle(req)
        start = await events.__anext__()
        on_start(start.loaded, start.evicted)
        await send({"type": "http.response.start", "status": start.status, "headers": start.headers})
        end = End()
        async for ev in events:
            if isinstance(ev, End):
                end = ev
            else:
                await send({"type": "http.response.body", "body": ev, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return end

    async def health(self):
        if self.dead:
            raise RuntimeError("engine process died")


class ReplicaGone(Exception):
    """What RayBackend.replica_gone recognises (Ray's actor errors), for the fakes."""


class RemoteReplica(FakeReplica):
    """A replica reached over Ray (split topology): events only, no serve_asgi."""
    serve_asgi = None

    def __getattribute__(self, name):
        if name == "serve_asgi":
            raise AttributeError(name)
        return super().__getattribute__(name)


@pytest.fixture(params=["relayed", "in-process"])
def front(request, tiny_base, tiny_adapters, tmp_path):
    from lorafleet.models import base_fingerprint, module_shapes

    src = tmp_path / "adapters"
    shutil.copytree(tiny_adapters, src)
    reg = AdapterRegistry([str(src)], tmp_path / "cache", base_shapes=module_shapes(str(tiny_base)),
                          base_fingerprint=base_fingerprint(str(tiny_base))["fingerprint"], max_lora_rank=16,
                          base_name="tiny")
    reg.scan()
    replica = RemoteReplica() if request.param == "relayed" else FakeReplica()
    fe = Frontend(served_name="tiny", registry=reg, backend=replica, max_model_len=128,
                  limits=LimitsSection(max_body_bytes=64 * 1024, max_concurrent_per_key=2),
                  api_keys=["sk-user"], admin_keys=["sk-admin"])
    client = TestClient(build_app(fe))
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-user", http_client=client, max_retries=0)
    return type("Front", (), dict(fe=fe, replica=replica, client=client, oai=oai, src=src))


def post(front, path, body, key="sk-user", raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return front.client.post(path, content=raw, headers={**headers, "content-type": "application/json"})
    return front.client.post(path, json=body, headers=headers)


def error_keys(r) -> set:
    return set(r.json()["error"])


def test_models_list_base_and_adapters_in_vllms_shape(front):
    ids = {m.id: m for m in front.oai.models.list().data}
    assert set(ids) == {"tiny", "alpha", "beta"}
    assert ids["alpha"].model_extra["parent"] == "tiny" and ids["tiny"].model_extra["parent"] is None
    assert ids["tiny"].model_extra["max_model_len"] == 128
    assert front.client.get("/v1/models/alpha", headers={"Authorization": "Bearer sk-user"}).json()["id"] == "alpha"
    r = front.client.get("/v1/models/nope", headers={"Authorization": "Bearer sk-user"})
    assert r.status_code == 404 and error_keys(r) == {"message", "type", "param", "code"}


def test_the_body_goes_to_the_replica_untouched_with_the_adapter_resolved(front):
    raw = b'{"model": "beta", "messages": [{"role": "user", "content": "x"}], "anything": [1, null]}'
    assert post(front, "/v1/chat/completions", None, raw=raw).json()["adapter"] == "beta"
    req = front.replica.requests[-1]
    assert req.body == raw and req.adapter.name == "beta" and req.adapter.path.endswith("beta")
    assert len(req.adapter.version) == 16
    assert post(front, "/v1/completions", {"model": "tiny", "prompt": "x"}).json()["adapter"] is None
    # a model that is neither the base nor an adapter: vLLM's 404, with what there is instead
    r = post(front, "/v1/responses", {"model": "gamma", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model", r.text
    assert "`gamma` does not exist" in r.json()["error"]["message"] and "alpha" in r.json()["error"]["message"]
    assert post(front, "/tokenize", {"prompt": "x"}).json()["path"] == "/tokenize"


def test_keys_on_every_route_but_the_probes(front):
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize", "/detokenize"):
        r = post(front, path, {"model": "tiny"}, key=None)
        assert r.status_code == 401 and error_keys(r) == {"message", "type", "param", "code"}, path
        assert post(front, path, {"model": "tiny"}, key="sk-wrong").status_code == 401
    assert front.client.get("/v1/models").status_code == 401
    assert front.client.get("/docs").status_code == 401
    for open_path in ("/health", "/ready", "/metrics"):
        assert front.client.get(open_path).status_code == 200
    r = post(front, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"})
    assert r.status_code == 403 and r.json()["error"]["code"] == 403
    assert post(front, "/v1/chat/completions", {"model": "tiny"}, key="sk-admin").status_code == 200


def test_missing_key_file_stops_the_server(tmp_path):
    from lorafleet.errors import UserError
    from serve.auth import read_keys

    with pytest.raises(UserError, match="cannot be read"):
        read_keys("LORAFLEET_NO_SUCH_VAR", str(tmp_path / "keys.txt"))
    (tmp_path / "empty.txt").write_text("# no keys yet\n\n")
    with pytest.raises(UserError, match="holds no key"):
        read_keys("LORAFLEET_NO_SUCH_VAR", str(tmp_path / "empty.txt"))
    (tmp_path / "ok.txt").write_text("sk-1\n# comment\nsk-2\n")
    assert read_keys("LORAFLEET_NO_SUCH_VAR", str(tmp_path / "ok.txt")) == ["sk-1", "sk-2"]


def test_unknown_routes_and_methods_in_the_error_shape(front):
    r = front.client.get("/v1/nope", headers={"Authorization": "Bearer sk-user"})
    assert r.status_code == 404 and error_keys(r) == {"message", "type", "param", "code"}
    r = front.client.get("/v1/chat/completions", headers={"Authorization": "Bearer sk-user"})
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


@pytest.mark.parametrize("path, field, value, limit", [
    ("/v1/completions", "max_tokens", 4097, "limits.max_tokens"),
    ("/v1/chat/completions", "max_completion_tokens", 5000, "limits.max_tokens"),
    ("/v1/responses", "max_output_tokens", 10**6, "limits.max_tokens"),
    ("/v1/chat/completions", "n", 9, "limits.max_n"),
])
def test_limits_refuse_in_vllms_shape_naming_the_field(front, path, field, value, limit):
    for model in ("tiny", "alpha"):
        r = post(front, path, {"model": model, field: value})
        assert r.status_code == 400 and error_keys(r) == {"message", "type", "param", "code"}, r.text
        assert r.json()["error"]["param"] == field and limit in r.json()["error"]["message"]
    n = len(front.replica.requests)
    ok = post(front, path, {"model": "alpha", field: 4096 if field != "n" else 8})  # at the limit: served
    assert ok.status_code == 200 and len(front.replica.requests) == n + 1


def test_body_limit_concurrency_and_drain(front):
    r = post(front, "/v1/chat/completions", None, raw=b'{"model": "tiny", "x": "' + b"a" * 70000 + b'"}')
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
    front.fe.per_key_in_flight["sk-user"] = 2
    r = post(front, "/v1/chat/completions", {"model": "tiny"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    front.fe.per_key_in_flight["sk-user"] = 0
    assert front.fe.drain() == 0
    assert post(front, "/v1/chat/completions", {"model": "tiny"}).status_code == 503
    assert front.client.get("/ready").status_code == 503


def test_gate_refusals_are_422_and_others_keep_serving(front, tiny_base, tmp_path):
    from fixtures import build_tiny_llama, make_random_adapter

    make_random_adapter(tiny_base, front.src / "biased", seed=9, bias="lora_only")
    make_random_adapter(tiny_base, front.src / "big", seed=7, r=32)
    other = build_tiny_llama(tmp_path / "other", __import__("pathlib").Path(__file__).parents[1], hidden=192)
    make_random_adapter(other, front.src / "foreign", seed=1)
    for name, words in (("biased", "bias"), ("big", "rank 32"), ("foreign", "another base")):
        with pytest.raises(openai.UnprocessableEntityError) as e:
            front.oai.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
        assert words in e.value.body["message"] and e.value.body["param"] == "model", name
    listed = {m.id for m in front.oai.models.list().data}
    assert not {"biased", "big", "foreign"} & listed
    assert post(front, "/v1/chat/completions", {"model": "alpha"}).status_code == 200


def test_an_adapter_the_engine_refuses_is_422_once_and_leaves_the_listing(front):
    front.replica.refuse.add("beta")
    r = post(front, "/v1/chat/completions", {"model": "beta"})
    assert r.status_code == 422 and "not supported" in r.json()["error"]["message"]
    sent = len(front.replica.requests)
    assert post(front, "/v1/chat/completions", {"model": "beta"}).status_code == 422
    assert len(front.replica.requests) == sent  # not sent to the engine again
    assert "beta" not in {m.id for m in front.oai.models.list().data}


def test_a_dead_replica_is_a_retryable_503(front):
    async def broken(req):
        raise RuntimeError("actor died")
        yield  # noqa: an async generator

    async def broken_direct(req, receive, send, on_start):
        raise RuntimeError("engine died")
    front.replica.handle = broken
    if hasattr(front.replica, "serve_asgi"):
        front.replica.serve_asgi = broken_direct
    r = post(front, "/v1/chat/completions", {"model": "tiny"})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    front.replica.dead = True
    assert front.client.get("/health").status_code == 503


def test_a_replica_gone_before_answering_is_retried_once(front):
    """Relayed (split topology): the request goes again when its replica was gone before it
    sent anything; a second loss is the client's 503."""
    if hasattr(front.replica, "serve_asgi"):
        pytest.skip("in-process: the replica is this process")
    answer, losses = front.replica.handle, []

    def losing(n):
        async def handle(req):
            if len(losses) < n:
                losses.append(req)
                raise ReplicaGone("the replica's node died")
            async for ev in answer(req):
                yield ev
        return handle

    front.replica.handle = losing(1)
    r = post(front, "/v1/chat/completions", {"model": "alpha"})
    assert r.status_code == 200 and r.json()["adapter"] == "alpha" and len(losses) == 1
    assert "lorafleet_replica_retries_total 1.0" in front.client.get("/metrics").text
    losses.clear()
    front.replica.handle = losing(2)
    assert post(front, "/v1/chat/completions", {"model": "alpha"}).status_code == 503 and len(losses) == 2


def test_admin_load_unload_rescan(front, tiny_base, tmp_path):
    from fixtures import make_random_adapter

    make_random_adapter(tiny_base, front.src / "late" / "gamma", seed=5, r=8)
    r = post(front, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(front.src / "late" / "gamma")},
             key="sk-admin")
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'gamma' added successfully."
    assert post(front, "/v1/chat/completions", {"model": "gamma"}).json()["adapter"] == "gamma"
    r = post(front, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(front.src / "alpha")},
             key="sk-admin")
    assert r.status_code == 400 and "load_inplace" in r.json()["error"]["message"]
    outside = make_random_adapter(tiny_base, tmp_path / "elsewhere", seed=6)
    (front.src / "link").symlink_to(outside)
    r = post(front, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": str(front.src / "link")},
             key="sk-admin")
    assert r.status_code == 403 and r.json()["error"]["param"] == "lora_path"
    r = post(front, "/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": str(front.src / "alpha")},
             key="sk-admin")
    assert r.status_code == 400 and "base model" in r.json()["error"]["message"]
    assert post(front, "/v1/load_lora_adapter", {"lora_name": "x"}, key="sk-admin").status_code == 400
    assert post(front, "/v1/unload_lora_adapter", {"lora_name": "gamma"}, key="sk-admin").status_code == 200
    assert front.replica.unloaded == ["gamma"]
    assert post(front, "/v1/unload_lora_adapter", {"lora_name": "gamma"}, key="sk-admin").status_code == 404
    # unloaded stays gone (vLLM's meaning), though a scanned source still holds it; others learn of it
    assert post(front, "/v1/unload_lora_adapter", {"lora_name": "beta"}, key="sk-admin").status_code == 200
    assert "beta" not in post(front, "/v1/adapters/rescan", {}, key="sk-admin").json()["adapters"]
    assert post(front, "/v1/chat/completions", {"model": "beta"}).status_code == 404
    post(front, "/v1/chat/completions", {"model": "tiny"})  # the next request tells its replica
    assert "beta" in front.replica.requests[-1].unloaded


def test_replaced_in_place_is_a_new_version(front, tiny_base):
    from fixtures import make_random_adapter

    post(front, "/v1/chat/completions", {"model": "alpha"})
    before = front.replica.requests[-1].adapter.version
    post(front, "/v1/chat/completions", {"model": "alpha"})
    assert front.replica.requests[-1].adapter.version == before  # same bytes, same version
    make_random_adapter(tiny_base, front.src / "alpha", seed=42, r=8)
    r = post(front, "/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": str(front.src / "alpha"),
                                              "load_inplace": True}, key="sk-admin")
    assert r.status_code == 200, r.text
    post(front, "/v1/chat/completions", {"model": "alpha"})
    assert front.replica.requests[-1].adapter.version != before


def test_an_adapter_named_like_the_base_is_not_served_under_that_name(front):
    shutil.copytree(front.src / "alpha", front.src / "tiny")
    front.fe.registry.scan()
    assert [m.id for m in front.oai.models.list().data].count("tiny") == 1
    assert "base model's served name" in front.fe.registry.rejected["tiny"]
    assert post(front, "/v1/chat/completions", {"model": "tiny"}).json()["adapter"] is None


def test_metrics_count_requests_tokens_and_loads(front):
    r = post(front, "/v1/chat/completions", {"model": "alpha"})
    post(front, "/v1/chat/completions", {"model": "gamma"})
    version = front.fe.registry.adapters["alpha"].version  # an adapter outside a fleet file: its content hash
    assert r.headers["x-lorafleet-version"] == f"alpha@{version}"
    text = front.client.get("/metrics").text
    assert (f'lorafleet_requests_total{{model="alpha",route="/v1/chat/completions",status="200",version="{version}"}} '
            '1.0') in text
    assert f'lorafleet_completion_tokens_total{{model="alpha",version="{version}"}} 4.0' in text
    assert 'lorafleet_adapter_loads_total{model="alpha"} 1.0' in text


def test_a_client_that_hangs_up_cancels_the_request_in_the_replica(front):
    """Over a real socket: the front sees the disconnect and closes the replica's answer, which
    is how the engine's request is aborted (streamed or not). In process, vLLM's own routes watch
    the client's connection (their with_cancellation and StreamingResponse)."""
    if hasattr(front.replica, "serve_asgi"):
        pytest.skip("in process, the disconnect reaches vLLM's routes directly (tests/test_openai_replica.py)")
    import threading

    import uvicorn

    from lorafleet.net import free_port

    front.replica.chunks = 200  # 10 s of answer
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(front.client.app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        while not server.started:
            asyncio.run(asyncio.sleep(0.05))
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "alpha"},
                          headers={"Authorization": "Bearer sk-user"}, timeout=10) as r:
            next(r.iter_raw())
        for _ in range(100):
            if front.replica.cancelled.is_set():
                break
            asyncio.run(asyncio.sleep(0.05))
        assert front.replica.cancelled.is_set()
        assert front.fe.per_key_in_flight["sk-user"] == 0
    finally:
        server.should_exit = True
        t.join(10)


def test_replica_listener_serves_the_app_and_reports_when_it_stops(front):
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
        ReplicaListener.start(build_app(front.fe), "127.0.0.1", port), loop).result(timeout=30)
    try:
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-user", max_retries=0)
        assert [m.id for m in oai.models.list().data] == ["tiny", "alpha", "beta"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "alpha"},
                       headers={"Authorization": "Bearer sk-user"})
        assert r.json()["adapter"] == "alpha"
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
