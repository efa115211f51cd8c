"""The OpenAI-compatible HTTP API (FastAPI), independent of where the engine runs.

`build_app(frontend)` serves the routes; the `Frontend` holds what the HTTP side needs:
the registry, the tokenizer and templates, the limits and keys, and a `backend` that runs
generations (in this process, or on Ray Serve replicas through a deployment handle).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError

from lorafleet.config import LimitsSection
from lorafleet.templates import render_prompt_ids
from serve.protocol import (ChatCompletionRequest, CompletionRequest, LoadLoRAAdapterRequest, OpenAIError,
                            UnloadLoRAAdapterRequest, model_not_found, new_id, now)
from serve.engine import AdapterLoadError, check_sampling
from serve.registry import AdapterRegistry

log = logging.getLogger("lorafleet.serve")


class Backend(Protocol):
    def generate(self, call: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    async def unload(self, name: str) -> None: ...

    async def health(self) -> None: ...


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorafleet_requests", "Requests by route, model and status",
                                ["route", "model", "status"], registry=r)
        self.prompt_tokens = Counter("lorafleet_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.completion_tokens = Counter("lorafleet_completion_tokens", "Generated tokens", ["model"], registry=r)
        self.latency = Histogram("lorafleet_request_seconds", "End-to-end request latency", ["route"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.ttft = Histogram("lorafleet_time_to_first_token_seconds", "Time to first token", ["model"], registry=r,
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.adapter_loads = Counter("lorafleet_adapter_loads", "Adapter loads into an engine", ["model"], registry=r)
        self.adapter_evictions = Counter("lorafleet_adapter_evictions", "Adapters evicted (LRU)", ["model"], registry=r)
        self.in_flight = Gauge("lorafleet_requests_in_flight", "Requests being served", registry=r)


UNLOAD_NOTICE_S = 600.0


@dataclass
class Frontend:
    served_name: str
    tokenizer: Any
    base_template: str
    registry: AdapterRegistry
    backend: Backend
    max_model_len: int
    limits: LimitsSection = field(default_factory=LimitsSection)
    api_keys: list[str] = field(default_factory=list)
    admin_keys: list[str] = field(default_factory=list)
    root_model: str = ""
    metrics: Metrics = field(default_factory=Metrics)
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


# ------------------------------------------------------------------------------------ helpers
def _err(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _check_key(presented: str | None, keys: list[str]) -> bool:
    if presented is None:
        return False
    # compare against every key, always: the time taken does not reveal which key nearly matched
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(presented.encode(), k.encode())
    return ok


def _bearer(request: Request) -> str | None:
    h = request.headers.get("authorization", "")
    return h[7:].strip() if h.lower().startswith("bearer ") else None


def _param(loc: tuple) -> str | None:
    """The request field a pydantic error points at, without pydantic's union-member tags
    (`prompt.str`, `messages.1.content.str` -> `prompt`, `messages.1.content`)."""
    parts = [str(x) for x in loc if not (isinstance(x, str) and ("[" in x or x in _TYPE_TAGS))]
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "function-before"}


def _validation_error(e: ValidationError) -> OpenAIError:
    first = e.errors()[0]
    param = _param(first["loc"])
    msg = first["msg"]
    if param is None:
        msg = msg.removeprefix("Value error, ")
    elif first["type"] == "extra_forbidden":
        msg = f"unknown parameter {param!r}"
    elif first["type"] == "missing":
        msg = f"missing required parameter {param!r}"
    else:
        msg = f"invalid value for {param!r}: {msg}"
    return OpenAIError(400, msg, param=param, code="invalid_parameter")


def chat_logprobs(entries: list) -> dict[str, Any]:
    """TokenLogprob entries (serve/engine.py) in chat completions' shape."""
    def tok(t: str, lp: float) -> dict[str, Any]:
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
    return {"content": [{**tok(t, lp), "top_logprobs": [tok(a, alp) for a, alp in alts]} for t, lp, alts in entries]}


def completion_logprobs(entries: list, offset: int) -> dict[str, Any]:
    """TokenLogprob entries in (legacy) completions' shape; `offset`: where their text starts."""
    tokens, offsets = [], []
    for t, _, _ in entries:
        tokens.append(t)
        offsets.append(offset)
        offset += len(t)
    # up to logprobs + 1 entries: the sampled token is always among them (OpenAI's and vLLM's rule)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{**dict(alts), t: lp} for t, lp, alts in entries], "text_offset": offsets}


async def until_disconnected(request: Request, stream: AsyncIterator[Any], poll_s: float = 1.0):
    """`stream`'s items until it ends or the client hangs up; then closing `stream` aborts the
    request in the engine (a non-streamed answer nobody waits for frees its slot, as in vLLM)."""
    it = stream.__aiter__()
    nxt = asyncio.ensure_future(it.__anext__())
    clock = asyncio.get_running_loop().time
    checked = clock()
    try:
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=poll_s)
            if clock() - checked >= poll_s:
                checked = clock()
                if await request.is_disconnected():
                    raise ClientDisconnected()
            if not done:
                continue
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            yield item
            nxt = asyncio.ensure_future(it.__anext__())
    finally:
        if not nxt.done():
            nxt.cancel()  # raises CancelledError inside the generator: it aborts and closes itself
            await asyncio.wait({nxt})  # (wait, not await: its CancelledError is not ours to raise)
        with contextlib.suppress(Exception):
            await stream.aclose()


class ClientDisconnected(Exception):
    """The client of a non-streamed request went away before its answer."""


def _is_client_error(e: BaseException) -> bool:
    """vLLM's errors that are the request's fault (VLLMValidationError and its family, matched by
    name: the front end need not import vLLM), also when they come wrapped by Ray from an engine
    replica (its RayTaskError subclasses the cause)."""
    return isinstance(e, ValueError) or any(c.__name__ == "VLLMClientError" for c in type(e).__mro__)


def _cause(e: BaseException) -> BaseException:
    return getattr(e, "cause", None) or e  # Ray's RayTaskError keeps the original as .cause


def _client_error(e: BaseException) -> OpenAIError:
    cause = _cause(e)
    msg = cause.args[0] if cause.args and isinstance(cause.args[0], str) else str(cause)
    param = getattr(cause, "parameter", None)
    if param is None:  # vLLM's messages mostly start with the field's name ("n must be 1 when ...")
        first = msg.split(" ", 1)[0]
        param = first if first in _REQUEST_FIELDS else None
    return OpenAIError(400, msg, param=param, code="invalid_parameter")


_REQUEST_FIELDS = set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields)


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"request body is {declared} bytes, above the {limit}-byte limit",
                          code="request_too_large")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise OpenAIError(413, f"request body is above the {limit}-byte limit", code="request_too_large")
    try:
        obj = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise OpenAIError(400, "request body is not valid UTF-8", code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise OpenAIError(400, f"request body is not valid JSON: {e.msg} at position {e.pos}",
                          code="invalid_json") from None
    if not isinstance(obj, dict):
        raise OpenAIError(400, "request body must be a JSON object", code="invalid_json")
    return obj


def build_app(fe: Frontend) -> FastAPI:
    app = FastAPI(title="lorafleet", version="0.1.0",
                  description="OpenAI-compatible API over a base model and its LoRA adapters.")
    app.state.frontend = fe
    m = fe.metrics

    @app.exception_handler(OpenAIError)
    async def _openai_error(_req, exc: OpenAIError):
        return _err(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(req, exc: StarletteHTTPException):
        # unknown routes and wrong methods: OpenAI's error shape too, not FastAPI's {"detail": ...}
        msg = {404: f"no route {req.method} {req.url.path} on this server (GET /docs lists them)",
               405: f"{req.method} is not allowed on {req.url.path}"}.get(exc.status_code, str(exc.detail))
        return _err(OpenAIError(exc.status_code, msg, code={404: "not_found", 405: "method_not_allowed"}
                                .get(exc.status_code), headers=dict(exc.headers or {})))

    def auth_error(path: str, key: str | None) -> OpenAIError | None:
        """Why this request may not go on, or None: admin routes take the admin key, the rest any key."""
        if path in ("/health", "/ready", "/metrics") or path.startswith(("/docs", "/openapi")):
            return None
        if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/adapters/rescan"):
            if fe.admin_keys:
                if not _check_key(key, fe.admin_keys):
                    return OpenAIError(401 if key is None else 403, "admin routes need the admin key "
                                       "(LORAFLEET_ADMIN_KEY) as 'Authorization: Bearer <key>'",
                                       type="authentication_error", code="invalid_api_key")
            elif fe.api_keys:
                return OpenAIError(403, "admin routes are disabled: no admin key is configured "
                                        "(set LORAFLEET_ADMIN_KEY)", type="permission_error")
        elif fe.api_keys and not _check_key(key, fe.api_keys) and not _check_key(key, fe.admin_keys):
            return OpenAIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                               type="authentication_error", code="invalid_api_key")
        return None

    # A plain ASGI middleware, not @app.middleware("http"): that one pipes every chunk of a streamed
    # answer through an extra in-memory stream and task, a cost paid per token.
    class Auth:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            request = Request(scope)
            key = _bearer(request)
            err = auth_error(request.url.path, key)
            if err is not None:
                return await _err(err)(scope, receive, send)
            scope.setdefault("state", {})["key"] = key or "anonymous"
            await self.inner(scope, receive, send)

    app.add_middleware(Auth)

    # -------------------------------------------------------------------------- plain routes
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
        fe.registry.scan()
        data = [{"id": fe.served_name, "object": "model", "created": now(), "owned_by": "lorafleet",
                 "root": fe.root_model or fe.served_name, "parent": None, "max_model_len": fe.max_model_len}]
        for a in fe.registry.servable():
            data.append({"id": a.name, "object": "model", "created": a.created, "owned_by": "lorafleet",
                         "root": a.uri, "parent": fe.served_name})
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")  # the base's id may be a path or an org/name id
    async def get_model(model_id: str):
        listing = (await list_models())["data"]
        for d in listing:
            if d["id"] == model_id:
                return d
        raise model_not_found(model_id)

    # ------------------------------------------------------------------------------ admin
    @app.post("/v1/load_lora_adapter", openapi_extra=_body(LoadLoRAAdapterRequest))
    async def load_lora(request: Request):
        try:
            req = LoadLoRAAdapterRequest.model_validate(await _read_json(request, fe.limits.max_body_bytes))
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.lora_name == fe.served_name:
            raise OpenAIError(400, f"{req.lora_name} is the base model's name", param="lora_name")
        existing = fe.registry.adapters.get(req.lora_name)
        if existing and not req.load_inplace:
            raise OpenAIError(400, f"adapter {req.lora_name} is already registered; unload it first or pass "
                                   "load_inplace: true", param="lora_name")
        try:
            await asyncio.to_thread(fe.registry.register, req.lora_name, req.lora_path, req.load_inplace)
        except OpenAIError as e:  # the gate's errors name `model` for requests; here it is the path
            if e.param == "model":
                e.param = "lora_path"
            raise
        fe.unloaded.pop(req.lora_name, None)  # the name is back: replicas tell versions apart themselves
        if existing:
            # Free the old weights here now; other replicas see the new version on their next request.
            await fe.backend.unload(req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", openapi_extra=_body(UnloadLoRAAdapterRequest))
    async def unload_lora(request: Request):
        try:
            req = UnloadLoRAAdapterRequest.model_validate(await _read_json(request, fe.limits.max_body_bytes))
        except ValidationError as e:
            raise _validation_error(e) from None
        if fe.registry.unregister(req.lora_name) is None:
            raise OpenAIError(404, f"adapter {req.lora_name} is not registered", param="lora_name",
                              code="model_not_found")
        fe.unloaded[req.lora_name] = time.monotonic()
        await fe.backend.unload(req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.post("/v1/adapters/rescan")
    async def rescan():
        found = await asyncio.to_thread(fe.registry.scan)
        return {"adapters": sorted(found), "rejected": fe.registry.rejected}

    # ------------------------------------------------------------------------ generation
    async def resolve(model: str) -> tuple[dict[str, str] | None, str]:
        if model == fe.served_name:
            return None, fe.base_template
        a = await asyncio.to_thread(fe.registry.get, model)
        if a is None:
            raise model_not_found(model)
        if model in fe.registry.engine_refused:  # not again: each try could evict a good adapter
            raise OpenAIError(422, fe.registry.rejected.get(model, f"the engine refused adapter {model}"),
                              param="model", code="adapter_incompatible")
        await asyncio.to_thread(fe.registry.prepare, a)
        return {"name": a.name, "path": str(a.local_path), "version": a.version}, a.template or fe.base_template

    def sampling(req, prompt_len: int, kind: str) -> dict[str, Any]:
        limit = fe.max_model_len
        if prompt_len >= limit:
            raise OpenAIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt "
                                   f"has {prompt_len} tokens. Shorten the prompt.",
                              param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > fe.limits.max_tokens:
            raise OpenAIError(400, f"max_tokens={asked} is above this server's limit of {fe.limits.max_tokens}",
                              param="max_tokens", code="invalid_parameter")
        if asked is not None and prompt_len + asked > limit:
            raise OpenAIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                   f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the "
                                   f"completion). Reduce the prompt or max_tokens.", param="max_tokens",
                              code="context_length_exceeded")
        if req.n > fe.limits.max_n:
            raise OpenAIError(400, f"n={req.n} is above this server's limit of {fe.limits.max_n}", param="n",
                              code="invalid_parameter")
        if asked is not None and req.min_tokens > asked:
            raise OpenAIError(400, f"min_tokens={req.min_tokens} is above max_tokens={asked}", param="min_tokens",
                              code="invalid_parameter")
        max_tokens = asked or min(fe.limits.max_tokens, limit - prompt_len)
        p = {"n": req.n, "temperature": req.temperature, "top_p": req.top_p, "max_tokens": max_tokens,
             "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
             "min_p": req.min_p, "repetition_penalty": req.repetition_penalty,
             "min_tokens": min(req.min_tokens, max_tokens), "ignore_eos": req.ignore_eos}
        if req.top_k is not None:
            p["top_k"] = req.top_k
        if req.stop_list:
            p["stop"] = req.stop_list
        if req.seed is not None:
            p["seed"] = req.seed
        if req.logit_bias:
            bias = {int(k): v for k, v in req.logit_bias.items()}
            out = [t for t in bias if t >= len(fe.tokenizer)]
            if out:
                raise OpenAIError(400, f"logit_bias has token ids outside the vocabulary (size {len(fe.tokenizer)}): "
                                       f"{out[:5]}", param="logit_bias", code="invalid_parameter")
            p["logit_bias"] = bias
        if req.num_logprobs is not None:
            p["logprobs"] = req.num_logprobs
        try:
            check_sampling(p)
        except Exception as e:
            if not _is_client_error(e):
                raise
            raise _client_error(e) from None
        return p

    class _Slot:
        """Per-key concurrency: 429 with Retry-After above the limit."""

        def __init__(self, key: str):
            self.key = key

        def __enter__(self):
            if fe.per_key_in_flight[self.key] >= fe.limits.max_concurrent_per_key:
                raise OpenAIError(429, f"too many concurrent requests for this key (limit "
                                       f"{fe.limits.max_concurrent_per_key}); retry shortly",
                                  type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
            fe.per_key_in_flight[self.key] += 1
            m.in_flight.inc()

        def __exit__(self, *exc):
            fe.per_key_in_flight[self.key] -= 1
            m.in_flight.dec()

    async def run(route: str, request: Request, kind: str):
        t0 = time.perf_counter()
        if fe.draining:
            raise OpenAIError(503, "server is shutting down", type="server_error")
        body = await _read_json(request, fe.limits.max_body_bytes)
        try:
            req = (ChatCompletionRequest if kind == "chat" else CompletionRequest).model_validate(body)
        except ValidationError as e:
            raise _validation_error(e) from None
        adapter, template = await resolve(req.model)
        if kind == "chat":
            msgs = [{"role": "system" if x.role == "developer" else x.role, "content": x.text()}
                    for x in req.messages]
            try:
                prompt_ids = render_prompt_ids(fe.tokenizer, template, msgs)
            except Exception as e:  # a template may raise on role orders it does not support
                raise OpenAIError(400, f"the chat template cannot render these messages: {e}",
                                  param="messages") from None
        else:
            prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) else req.prompt
            if isinstance(prompt, list):
                bad = [t for t in prompt if t < 0 or t >= len(fe.tokenizer)]
                if bad:
                    raise OpenAIError(400, f"prompt token ids out of range: {bad[:5]}", param="prompt")
                prompt_ids = list(prompt)
            else:
                prompt_ids = fe.tokenizer(prompt)["input_ids"]
        params = sampling(req, len(prompt_ids), kind)
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        call = {"prompt_ids": prompt_ids, "params": params, "adapter": adapter, "request_id": rid,
                "stream": req.stream, "unloaded": fe.recently_unloaded()}
        slot = _Slot(request.state.key)
        slot.__enter__()
        try:
            stream = fe.backend.generate(call)
            first = await stream.__anext__()  # the "start" event: adapter loaded; errors surface here
        except BaseException as e:
            slot.__exit__()
            if adapter and isinstance(e, AdapterLoadError):  # also as Ray's RayTaskError(AdapterLoadError)
                msg = str(_cause(e))
                fe.registry.refused_by_engine(adapter["name"], msg)
                raise OpenAIError(422, msg, param="model", code="adapter_incompatible") from None
            raise
        if first.get("loaded") and adapter:
            m.adapter_loads.labels(adapter["name"]).inc()
        for v in first.get("evicted", []):
            m.adapter_evictions.labels(v).inc()
        created = now()
        if req.stream:
            return StreamingResponse(
                _sse(kind, req, rid, created, len(prompt_ids), stream, slot, t0, route),
                media_type="text/event-stream")
        try:
            texts = [""] * req.n
            ntoks = [0] * req.n
            finish: list[str | None] = [None] * req.n
            lps: list[list] = [[] for _ in range(req.n)]
            async for ev in until_disconnected(request, stream):
                for d in ev["deltas"]:
                    texts[d["index"]] += d["text"]
                    ntoks[d["index"]] += d["num_tokens"]
                    finish[d["index"]] = d["finish_reason"] or finish[d["index"]]
                    lps[d["index"]] += d.get("logprobs") or []
        finally:
            slot.__exit__()
        completion = sum(ntoks)
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                 "total_tokens": len(prompt_ids) + completion}
        _account(req.model, route, 200, len(prompt_ids), completion, t0)
        want_lp = req.num_logprobs is not None
        if kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": chat_logprobs(lps[i]) if want_lp else None,
                        "finish_reason": finish[i] or "stop"} for i in range(req.n)]
            return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": choices, "usage": usage}
        choices = [{"index": i, "text": texts[i], "logprobs": completion_logprobs(lps[i], 0) if want_lp else None,
                    "finish_reason": finish[i] or "stop"} for i in range(req.n)]
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, "usage": usage}

    def _account(model, route, status, prompt, completion, t0):
        m.requests.labels(route, model, str(status)).inc()
        m.prompt_tokens.labels(model).inc(prompt)
        m.completion_tokens.labels(model).inc(completion)
        m.latency.labels(route).observe(time.perf_counter() - t0)

    async def _sse(kind, req, rid, created, prompt_len, stream, slot, t0, route):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        completion = 0
        first_token = True
        want_lp = req.num_logprobs is not None
        offsets = [0] * req.n  # where each choice's next text starts (completions' text_offset)

        def chunk(choices, usage=None):
            c = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": choices}
            if req.include_usage:
                c["usage"] = usage
            return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

        try:
            if kind == "chat":
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(req.n)])
            async for ev in stream:
                choices = []
                for d in ev["deltas"]:
                    completion += d["num_tokens"]
                    lp = d.get("logprobs") or []
                    if kind == "chat":
                        delta = {"content": d["text"]} if d["text"] else {}
                        choices.append({"index": d["index"], "delta": delta,
                                        "logprobs": chat_logprobs(lp) if want_lp else None,
                                        "finish_reason": d["finish_reason"]})
                    else:
                        choices.append({"index": d["index"], "text": d["text"],
                                        "logprobs": completion_logprobs(lp, offsets[d["index"]]) if want_lp else None,
                                        "finish_reason": d["finish_reason"]})
                        offsets[d["index"]] += len(d["text"])
                if first_token and completion:
                    m.ttft.labels(req.model).observe(time.perf_counter() - t0)
                    first_token = False
                if choices:
                    yield chunk(choices)
            if req.include_usage:
                usage = {"prompt_tokens": prompt_len, "completion_tokens": completion,
                         "total_tokens": prompt_len + completion}
                yield chunk([], usage)
            yield "data: [DONE]\n\n"
            _account(req.model, route, 200, prompt_len, completion, t0)
        except asyncio.CancelledError:  # the client went away: the generator's close aborts the request
            raise
        except Exception as e:  # the engine failed mid-stream: end the stream with an error event
            log.exception("stream %s failed", rid)
            err = OpenAIError(500, f"generation failed: {e}", type="server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
            m.requests.labels(route, req.model, "500").inc()
        finally:
            slot.__exit__()

    @app.post("/v1/chat/completions", openapi_extra=_body(ChatCompletionRequest))
    async def chat(request: Request):
        return await _guarded("chat", request)

    @app.post("/v1/completions", openapi_extra=_body(CompletionRequest))
    async def completions(request: Request):
        return await _guarded("completions", request)

    async def _guarded(kind: str, request: Request):
        route = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        try:
            return await run(route, request, kind)
        except OpenAIError as e:
            m.requests.labels(route, "-", str(e.status)).inc()
            return _err(e)
        except ClientDisconnected:  # nobody is left to read an answer; counted as nginx's 499
            m.requests.labels(route, "-", "499").inc()
            return JSONResponse({}, status_code=499)
        except Exception as e:
            if _is_client_error(e):  # vLLM refused the request itself (its checks ran in the engine)
                m.requests.labels(route, "-", "400").inc()
                return _err(_client_error(e))
            # the engine died or its replica went away: a clean, retryable error
            log.exception("request failed in the engine")
            m.requests.labels(route, "-", "503").inc()
            return _err(OpenAIError(503, f"the engine could not serve this request ({type(e).__name__}: "
                                         f"{str(e)[:200]}); retry shortly", type="server_error",
                                    code="engine_unavailable", headers={"Retry-After": "5"}))

    _document_bodies(app)
    return app


BODY_MODELS = (ChatCompletionRequest, CompletionRequest, LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest)


def _body(model) -> dict[str, Any]:
    # The routes read the body themselves (size limit, clear JSON errors); this documents it.
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _document_bodies(app: FastAPI) -> None:
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for m in BODY_MODELS:
            s = m.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(s.pop("$defs", {}))
            comps[m.__name__] = s
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
