"""The HTTP front: what lorafleet serves itself, and the OpenAI routes it hands to a replica.

The front owns the fleet's side of a request: keys (serve/auth.py), the body size limit, the
drain state, per-key concurrency, the registry (which adapters exist, the gate, `/v1/models`,
the admin routes) and metrics. The OpenAI routes themselves (serve/contract.py OPENAI_ROUTES)
are answered by vLLM's serving classes in an engine replica (serve/openai_serving.py): the
front resolves `model`, passes the client's body on untouched with the adapter it resolved,
and relays the replica's answer byte for byte. A `Backend` reaches the replica, in this
process (fused topology) or through a Ray Serve handle (split).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafleet.config import LimitsSection
from serve.auth import KeyCheck
from serve.contract import (OPENAI_ROUTES, AdapterLoadError, AdapterRef, End, LoadLoRAAdapterRequest, ReplicaRequest,
                            Start, UnloadLoRAAdapterRequest)
from serve.errors import OpenAIError, adapter_refused
from serve.metrics import Metrics
from serve.registry import AdapterRegistry

log = logging.getLogger("lorafleet.serve")

UNLOAD_NOTICE_S = 600.0
# Which adapter version answered: `ALIAS@VERSION` (fleet file), `NAME@CONTENT_HASH`, or the base's name.
VERSION_HEADER = b"x-lorafleet-version"
# Client headers a replica may read (vLLM takes the request id and trace context from them).
PASSED_HEADERS = {b"x-request-id", b"traceparent", b"tracestate"}


class Backend(Protocol):
    """Reaches the engine replicas. A backend whose replica is in this process may also offer
    `serve_asgi(req, receive, send, on_start) -> End` (OpenAIReplica.serve_asgi), which the front
    then uses instead of relaying events."""

    def handle(self, req: ReplicaRequest) -> AsyncIterator[Start | bytes | End]: ...

    def replica_gone(self, e: BaseException) -> bool:
        """Whether `e` (raised before the replica's first event) says the replica itself is gone,
        so the same request may go to another one."""
        ...

    async def unload(self, name: str) -> None: ...

    async def health(self) -> None: ...


def vllm_model_card(**fields: Any) -> dict[str, Any]:
    """A /v1/models entry as vLLM's ModelCard writes it (the vLLM engine's server)."""
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission

    return ModelCard(**fields, permission=[ModelPermission()]).model_dump()


@dataclass
class Frontend:
    """Everything the front's routes need."""
    served_name: str
    registry: AdapterRegistry
    backend: Backend
    max_model_len: int
    limits: LimitsSection = field(default_factory=LimitsSection)
    api_keys: list[str] = field(default_factory=list)
    admin_keys: list[str] = field(default_factory=list)
    root_model: str = ""
    metrics: Metrics = field(default_factory=Metrics)
    # Builds one /v1/models entry from its fields (id, root, parent, owned_by, created, max_model_len):
    # vLLM's ModelCard for the vLLM engine, the openai package's Model for the ONNX engine.
    model_card: Callable[..., dict[str, Any]] = vllm_model_card
    fleet: Any = None  # serve/fleet.py FleetRouter: aliases and versions from the fleet file
    per_key_in_flight: defaultdict = field(default_factory=lambda: defaultdict(int))
    draining: bool = False
    # Adapters unloaded through the admin API, by time. The unload reaches one engine replica;
    # every request tells the replica it lands on to free these too (Ray Serve has no broadcast),
    # for UNLOAD_NOTICE_S, after which LRU eviction is left to do it.
    unloaded: dict[str, float] = field(default_factory=dict)

    def recently_unloaded(self) -> list[str]:
        cutoff = time.monotonic() - UNLOAD_NOTICE_S
        for name in [n for n, t in self.unloaded.items() if t < cutoff]:
            del self.unloaded[name]
        return list(self.unloaded)

    def drain(self) -> int:
        """Refuse new requests (503; /ready fails so load balancers stop sending); return how many run."""
        self.draining = True
        return sum(self.per_key_in_flight.values())

    def unknown_model(self, model: str | None) -> OpenAIError:
        """404 for a `model` that is neither the base nor an adapter (vLLM's message), naming them."""
        aliases = [c["id"] for c in self.fleet.cards()] if self.fleet else []
        names = [self.served_name, *aliases, *(a.name for a in self.registry.servable() if a.name not in aliases)]
        return OpenAIError(404, f"The model `{model}` does not exist. Models on this server: {', '.join(names)} "
                                "(GET /v1/models).", param="model")

    async def resolve(self, model: str | None, body: dict[str, Any] | None = None) -> AdapterRef | None:
        """The adapter version a request's `model` names, through the registry's gate; None for
        the base or a name the registry does not know. An alias of the fleet file goes to the
        version its caller sticks to (serve/fleet.py); ALIAS@VERSION pins one."""
        if not model or model == self.served_name:
            return None
        route = self.fleet.route(model, body) if self.fleet else None
        name = route.adapter if route else model
        a = await asyncio.to_thread(self.registry.get, name)
        if a is None:
            return None
        if name in self.registry.engine_refused:  # not again: each try could evict a good adapter
            raise adapter_refused(self.registry.rejected.get(name, f"the engine refused adapter {name}"))
        await asyncio.to_thread(self.registry.prepare, a)
        return AdapterRef(a.name, str(a.local_path), a.version, a.template, a.uri,
                          route.version if route else None, model if route else None)


# --------------------------------------------------------------------------- the OpenAI routes
async def read_body(receive, limit: int, declared: str | None) -> bytes:
    if declared and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"request body is {declared} bytes, above the {limit}-byte limit "
                               "(limits.max_body_bytes)")
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError()
        body += message.get("body", b"")
        if len(body) > limit:
            raise OpenAIError(413, f"request body is above the {limit}-byte limit (limits.max_body_bytes)")
        if not message.get("more_body", False):
            return body


def parse_body(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None: anything else is left for vLLM's own parsing to refuse,
    in its own words."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def requested_model(obj: dict[str, Any] | None) -> str | None:
    """The body's `model`, when it is a string."""
    model = obj.get("model") if obj else None
    return model if isinstance(model, str) else None


# Request fields the limits bound: the length fields of completions, chat and responses, and the
# number of choices (vLLM's best_of is gone; n is what multiplies the work).
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def check_limits(obj: dict[str, Any] | None, limits: LimitsSection) -> None:
    """Refuse (400, naming the field) a request above `limits.max_tokens` or `limits.max_n`.
    Fields that are not integers are left for vLLM's validation to refuse."""
    if not obj:
        return
    for name in TOKEN_FIELDS:
        value = obj.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > limits.max_tokens:
            raise OpenAIError(400, f"{name}={value} is above this server's limit of {limits.max_tokens} "
                                   "(limits.max_tokens); ask for fewer tokens", param=name)
    n = obj.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > limits.max_n:
        raise OpenAIError(400, f"n={n} is above this server's limit of {limits.max_n} (limits.max_n); "
                               "ask for fewer choices", param="n")


class OpenAIRoute:
    """An ASGI endpoint that hands one OpenAI route to a replica and relays its answer. Plain
    ASGI, so streamed chunks go from the replica to the socket without another layer, and a
    client that hangs up cancels the request in the engine (streamed or not)."""

    def __init__(self, fe: Frontend):
        self.fe = fe

    async def __call__(self, scope, receive, send):
        fe, m, path = self.fe, self.fe.metrics, scope["path"]
        t0 = time.perf_counter()
        key = scope.get("state", {}).get("key", "anonymous")
        model = "-"
        try:
            if fe.draining:
                raise OpenAIError(503, "the server is shutting down; retry on another replica",
                                  headers={"Retry-After": "5"})
            headers = dict(scope["headers"])
            body = await read_body(receive, fe.limits.max_body_bytes, (headers.get(b"content-length") or b"").decode())
            obj = parse_body(body)
            model = requested_model(obj) or fe.served_name
            adapter = await fe.resolve(model, obj)
            if adapter is None and model != fe.served_name:
                model = "unknown"  # a metric label per made-up name would grow without end
                raise fe.unknown_model(requested_model(obj))
            check_limits(obj, fe.limits)
            if fe.per_key_in_flight[key] >= fe.limits.max_concurrent_per_key:
                raise OpenAIError(429, f"too many concurrent requests for this key (limit "
                                       f"{fe.limits.max_concurrent_per_key}); retry shortly", headers={"Retry-After": "1"})
        except OpenAIError as e:
            if e.status == 404:
                model = "unknown"  # a made-up name (ALIAS@anything too) would grow the labels without end
            m.requests.labels(path, model, str(e.status), "").inc()
            return await e.response()(scope, receive, send)
        req = ReplicaRequest(scope["method"], path, body, adapter,
                             [(k, v) for k, v in scope["headers"] if k.lower() in PASSED_HEADERS],
                             fe.recently_unloaded())
        fe.per_key_in_flight[key] += 1
        m.in_flight.inc()
        version = adapter.label if adapter else ""
        answered_by = (f"{adapter.name}@{adapter.version}" if adapter and not adapter.fleet_version
                       else adapter.name if adapter else fe.served_name)
        send = _with_header(send, VERSION_HEADER, answered_by.encode())
        try:
            if hasattr(fe.backend, "serve_asgi"):  # the replica is in this process: straight onto the socket
                status = await self._direct(req, model, version, scope, receive, send, t0)
            else:
                status = await self._relay(req, model, version, scope, receive, send, t0)
        finally:
            fe.per_key_in_flight[key] -= 1
            m.in_flight.dec()
        m.requests.labels(path, model, str(status), version).inc()
        m.latency.labels(path).observe(time.perf_counter() - t0)
        m.version_latency.labels(model, version).observe(time.perf_counter() - t0)

    async def _direct(self, req: ReplicaRequest, model: str, version: str, scope, receive, send, t0: float) -> int:
        """Let the replica in this process answer on the client's connection; returns the status."""
        m = self.fe.metrics
        seen = {"status": 500, "started": False, "streamed": False, "first": True}

        def on_start(loaded: bool, evicted: list[str]) -> None:
            self._count_adapter_work(model, loaded, evicted)

        async def observed_send(message):
            if message["type"] == "http.response.start":
                seen.update(status=message["status"], started=True, streamed=_is_event_stream(message.get("headers", [])))
            elif seen["first"] and seen["streamed"] and message.get("body"):
                m.ttft.labels(model, version).observe(time.perf_counter() - t0)
                seen["first"] = False
            await send(message)

        try:
            end = await self.fe.backend.serve_asgi(req, receive, observed_send, on_start)
        except Exception as e:
            if seen["started"]:  # vLLM's handlers answer their own errors; this is past them
                log.error("request to %s failed mid-answer: %r", model, e)
                return 500
            err = self._failed(req, e)
            await err.response()(scope, receive, send)
            return err.status
        self._count_tokens(model, version, end)
        return seen["status"]

    async def _relay(self, req: ReplicaRequest, model: str, version: str, scope, receive, send, t0: float) -> int:
        """Send the replica's answer to the client; returns the status it had."""
        m = self.fe.metrics
        try:
            events, start = await self._start(req)
        except Exception as e:
            err = self._failed(req, e)
            await err.response()(scope, receive, send)
            return err.status
        self._count_adapter_work(model, start.loaded, start.evicted)
        await send({"type": "http.response.start", "status": start.status, "headers": start.headers})
        streamed = _is_event_stream(start.headers)

        async def pump():
            first = True
            async for ev in events:
                if isinstance(ev, End):
                    self._count_tokens(model, version, ev)
                    continue
                if first and streamed:
                    m.ttft.labels(model, version).observe(time.perf_counter() - t0)
                first = False
                await send({"type": "http.response.body", "body": ev, "more_body": True})

        status = start.status
        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not pumping.done():  # the client hung up: cancelling aborts the request in the engine
                pumping.cancel()
                status = 499
            with contextlib.suppress(asyncio.CancelledError):
                exc = pumping.exception() if not pumping.cancelled() else None
                if exc is not None:  # the replica failed after the answer began: end it cleanly
                    log.error("request to %s failed mid-answer: %r", model, exc)
                    status = 500
                    if streamed:
                        err = OpenAIError(500, f"generation failed: {type(exc).__name__}: {str(exc)[:200]}")
                        await send({"type": "http.response.body", "more_body": True,
                                    "body": f"data: {json.dumps(err.body())}\n\ndata: [DONE]\n\n".encode()})
            if status != 499:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watching.cancel()
            if not pumping.done():
                pumping.cancel()
            with contextlib.suppress(BaseException):
                await pumping
            with contextlib.suppress(Exception):
                await events.aclose()
        return status

    async def _start(self, req: ReplicaRequest) -> tuple[AsyncIterator[Start | bytes | End], Start]:
        """The replica's answer and its first event. A replica that is gone before it answered (its
        node died, it was killed) has sent the client nothing: the request goes once more, to
        whichever replica the router picks now. Anything else is the caller's error to report."""
        for attempt in (1, 2):
            events = self.fe.backend.handle(req)
            try:
                return events, await events.__anext__()
            except Exception as e:
                with contextlib.suppress(Exception):
                    await events.aclose()
                if attempt == 2 or not self.fe.backend.replica_gone(e):
                    raise
                self.fe.metrics.retries.inc()
                log.warning("the replica was gone before answering (%s): sending the request again", type(e).__name__)
        raise AssertionError("unreachable")

    def _count_adapter_work(self, model: str, loaded: bool, evicted: list[str]) -> None:
        if loaded:
            self.fe.metrics.adapter_loads.labels(model).inc()
        for name in evicted:
            self.fe.metrics.adapter_evictions.labels(name).inc()

    def _count_tokens(self, model: str, version: str, end: End) -> None:
        self.fe.metrics.prompt_tokens.labels(model, version).inc(end.prompt_tokens)
        self.fe.metrics.completion_tokens.labels(model, version).inc(end.completion_tokens)

    def _failed(self, req: ReplicaRequest, e: BaseException) -> OpenAIError:
        """The error for a replica that failed before answering."""
        if isinstance(e, OpenAIError):  # the replica refused the request itself (a field its engine lacks)
            return e
        if req.adapter is not None and isinstance(e, AdapterLoadError):  # also as Ray's RayTaskError(...)
            msg = str(getattr(e, "cause", None) or e)
            self.fe.registry.refused_by_engine(req.adapter.name, msg)
            return adapter_refused(msg)
        log.error("request failed in the replica: %r", e)
        return OpenAIError(503, f"the engine could not serve this request ({type(e).__name__}: {str(e)[:200]}); "
                                "retry shortly", headers={"Retry-After": "5"})


def _with_header(send, name: bytes, value: bytes):
    """`send` with one more header on the response's start."""
    async def sending(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name, value)]}
        await send(message)

    return sending


def _is_event_stream(headers) -> bool:
    """Whether an answer with these ASGI headers is a server-sent event stream (streamed)."""
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# ------------------------------------------------------------------------------------ the app
def model_cards(fe: Frontend) -> list[dict[str, Any]]:
    """/v1/models: the base and every adapter the registry serves, in the engine's card shape."""
    fe.registry.scan()
    out = [fe.model_card(id=fe.served_name, root=fe.root_model or fe.served_name, owned_by="lorafleet",
                         max_model_len=fe.max_model_len)]
    if fe.fleet:  # aliases: what each points to
        for alias in fe.fleet.cards():
            card = fe.model_card(id=alias["id"], root=alias["id"], parent=fe.served_name, owned_by="lorafleet")
            card["fleet"] = alias["fleet"]
            out.append(card)
    aliases = {c["id"] for c in fe.fleet.cards()} if fe.fleet else set()
    for a in fe.registry.servable():
        if a.name in aliases:
            continue  # an alias takes the name of an adapter found in a source: `model` resolves to the alias
        card = fe.model_card(id=a.name, root=a.uri, parent=fe.served_name, owned_by="lorafleet", created=a.created)
        if "@" in a.name:  # a fleet version
            card["fleet"] = {"alias": a.name.split("@", 1)[0], "version": a.name.split("@", 1)[1]}
        if a.eval:  # the recorded evaluation (lorafleet eval): what a client can judge the adapter by
            card["eval"] = {k: a.eval.get(k) for k in ("data", "items", "adapter_scores", "base_scores", "created")}
        out.append(card)
    return out


def build_app(fe: Frontend) -> FastAPI:
    """The front's FastAPI app: its own routes, the OpenAI routes relayed to a replica, keys
    checked in front of all of them."""
    app = FastAPI(title="lorafleet", version="0.1.0",
                  description="OpenAI-compatible API over a base model and its LoRA adapters (vLLM's serving).")
    app.state.frontend = fe
    m = fe.metrics

    @app.exception_handler(OpenAIError)
    async def _openai_error(_req, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(req, exc: StarletteHTTPException):
        msg = {404: f"no route {req.method} {req.url.path} on this server",
               405: f"{req.method} is not allowed on {req.url.path}"}.get(exc.status_code, str(exc.detail))
        return OpenAIError(exc.status_code, msg, headers=dict(exc.headers or {})).response()

    @app.get("/health")
    async def health():
        try:
            await asyncio.wait_for(fe.backend.health(), timeout=10)
        except Exception as e:  # an engine that died or hangs: not healthy, whatever the cause
            return JSONResponse({"status": "unhealthy", "error": str(e)[:200]}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if fe.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(m.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": await asyncio.to_thread(model_cards, fe)}

    @app.get("/v1/models/{model_id:path}")  # the base's id may be a path or an org/name id
    async def get_model(model_id: str):
        for card in await asyncio.to_thread(model_cards, fe):
            if card["id"] == model_id:
                return card
        raise OpenAIError(404, f"The model `{model_id}` does not exist.", param="model")

    add_admin_routes(app, fe)
    relay = OpenAIRoute(fe)
    for method, path in sorted(OPENAI_ROUTES):
        app.add_route(path, relay, methods=[method], include_in_schema=False)
    app.add_middleware(KeyCheck, api_keys=fe.api_keys, admin_keys=fe.admin_keys)
    return app


def add_admin_routes(app: FastAPI, fe: Frontend) -> None:
    """vLLM's runtime LoRA routes (same bodies), over the registry, and a rescan of the sources."""
    from pydantic import ValidationError

    async def parsed(request: Request, model):
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(x) for x in first["loc"]) or None
            raise OpenAIError(400, f"{param or 'body'}: {first['msg']}", param=param) from None

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request):
        req = await parsed(request, LoadLoRAAdapterRequest)
        if req.lora_name == fe.served_name:
            raise OpenAIError(400, f"The lora adapter '{req.lora_name}' conflicts with a served base model.",
                              param="lora_name")
        existing = fe.registry.adapters.get(req.lora_name)
        if existing and not req.load_inplace:
            raise OpenAIError(400, f"The lora adapter '{req.lora_name}' has already been loaded. If you want to "
                                   "load the adapter in place, set 'load_inplace' to True.", param="lora_name")
        try:
            await asyncio.to_thread(fe.registry.register, req.lora_name, req.lora_path, req.load_inplace)
        except OpenAIError as e:  # the gate's errors name `model` for requests; here it is the path
            if e.param == "model":
                e.param = "lora_path"
            raise
        fe.unloaded.pop(req.lora_name, None)  # the name is back: replicas tell versions apart themselves
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request):
        req = await parsed(request, UnloadLoRAAdapterRequest)
        if fe.registry.unregister(req.lora_name) is None:
            raise OpenAIError(404, f"The lora adapter '{req.lora_name}' cannot be found.", param="lora_name")
        fe.unloaded[req.lora_name] = time.monotonic()
        await fe.backend.unload(req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.get("/v1/fleet")
    async def fleet_state():
        if fe.fleet is None:
            raise OpenAIError(404, "this server follows no fleet file (set fleet_file)")
        return fe.fleet.state()

    @app.post("/v1/fleet/reload")
    async def fleet_reload():
        """Apply the fleet file now (the server also checks it every fleet_poll_s): 200 with the
        state, or 422 naming the line; the previous state keeps serving."""
        from lorafleet.fleet import FleetError

        if fe.fleet is None:
            raise OpenAIError(404, "this server follows no fleet file (set fleet_file)")
        try:
            await asyncio.to_thread(fe.fleet.apply)
        except FleetError as e:
            fe.fleet.error = str(e)
            raise OpenAIError(422, str(e)) from None
        return fe.fleet.state()

    @app.post("/v1/adapters/rescan")
    async def rescan():
        await asyncio.to_thread(fe.registry.scan)  # the gate runs on new adapters: refused ones are not listed
        return {"adapters": [a.name for a in fe.registry.servable()], "rejected": fe.registry.rejected}
