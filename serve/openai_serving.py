"""One engine replica's OpenAI API: vLLM's own serving classes over the replica's `AsyncLLM`.

vLLM's server state is built by vLLM's `init_app_state` from vLLM's parsed arguments, and
requests are answered by vLLM's own routes (chat completions, completions, responses, tokenize,
detokenize) with vLLM's exception handlers: what vLLM's server accepts, this accepts, with its
semantics and error shapes. lorafleet adds only what vLLM has no notion of, per request:

- the adapter: the front resolved `model` through the registry; the replica makes that version
  resident (serve/adapters.py) and vLLM's serving sees exactly that `LoRARequest` under the
  adapter's public name (`RequestScopedLoRAs`), while responses name the adapter as the client
  did (`model: legal`, not the engine-side `legal@<version>.<id>`);
- the adapter's chat template: a request to an adapter is rendered with the template in its
  manifest. vLLM renders with one template per server, so the replica keeps one set of vLLM's
  serving objects per template (shallow copies sharing the engine, models and tokenizer);
- the template's end of turn: chat and responses requests stop at the token that ends an
  assistant turn in their template, also where the base's EOS is another token;
- token counts per request, for lorafleet's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator, Callable

from serve.adapters import AdapterCache
from serve.asgi import asgi_scope, body_then, call_app
from serve.contract import TEMPLATED_ROUTES, End, ReplicaRequest, Start

log = logging.getLogger("lorafleet.serve")


@dataclass
class RequestScope:
    """What lorafleet knows of the request the current task serves."""
    model: str | None = None  # the adapter's public name, or None for the base
    lora: Any = None  # its LoRARequest (this replica's loaded version)
    stop_token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0


_scope: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar("lorafleet_request", default=None)


class RequestScopedLoRAs(Mapping):
    """vLLM's `OpenAIServingModels.lora_requests`, as seen by the request being served: its own
    adapter version under its public name, and nothing else. Two requests for two versions of
    one adapter, in flight at once, each see theirs."""

    def _current(self) -> dict[str, Any]:
        s = _scope.get()
        return {s.model: s.lora} if s is not None and s.lora is not None else {}

    def __getitem__(self, name):
        return self._current()[name]

    def __iter__(self):
        return iter(self._current())

    def __len__(self):
        return len(self._current())


class FleetEngineClient:
    """The replica's AsyncLLM as vLLM's serving classes call it, with the request's end-of-turn
    stop tokens added and its tokens counted. Everything else is AsyncLLM's own."""

    def __init__(self, engine: Any):
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        scope = _scope.get()
        if scope is not None and scope.stop_token_ids:
            extra = [t for t in scope.stop_token_ids if t not in sampling_params.all_stop_token_ids]
            if extra:
                sampling_params.stop_token_ids = [*(sampling_params.stop_token_ids or []), *extra]
                sampling_params.all_stop_token_ids.update(extra)
        from vllm.sampling_params import RequestOutputKind

        delta = sampling_params.output_kind == RequestOutputKind.DELTA
        counted: dict[int, int] = {}
        stream = self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs)
        try:
            async for out in stream:
                if scope is not None:
                    for o in out.outputs:
                        counted[o.index] = counted.get(o.index, 0) * delta + len(o.token_ids)
                    if out.prompt_token_ids is not None:
                        scope.prompt_tokens = len(out.prompt_token_ids)
                yield out
        finally:
            if scope is not None:
                scope.completion_tokens += sum(counted.values())
            await stream.aclose()  # aborts the request in the engine if it is still running


class OpenAIReplica:
    """vLLM's OpenAI serving for one engine, with lorafleet's adapters and templates.

    Build with `await OpenAIReplica.create(...)`. A front in another process (split topology)
    calls `handle(ReplicaRequest)`, which yields Start, body chunks (bytes) and End; a front in
    this process (fused) calls `serve_asgi`, which answers on the client's connection itself.
    """

    def __init__(self, engine: Any, args: Any, base_state: Any, adapters: AdapterCache):
        self.engine = engine  # AsyncLLM
        self.args = args
        self.adapters = adapters
        self._states = {None: base_state}  # template text (None: the base's) -> vLLM's app state
        self._apps: dict[str | None, Any] = {}
        self._stops: dict[str | None, list[int]] = {}
        self.restarting = False

    @classmethod
    async def create(cls, engine: Any, args: Any, snapshot_root: Path, max_resident: int) -> "OpenAIReplica":
        from fastapi import FastAPI

        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        holder = FastAPI()  # only for its State, which vLLM's init fills
        holder.state.args = args
        # vLLM's handler for a dead engine answers in its error shape and asks its uvicorn server
        # (app.state.server) to exit; here there is none to ask: EngineWatch restarts the engine
        # or ends the replica.
        holder.state.server = SimpleNamespace(should_exit=False)
        client = FleetEngineClient(engine)
        await init_app_state(client, holder.state, args, await engine.get_supported_tasks())
        models = holder.state.openai_serving_models
        models.lora_requests = RequestScopedLoRAs()
        # Responses and chunks name the adapter as the client did, not the engine-side identity.
        models.model_name = lambda lora=None: (_scope.get().model if lora is not None and _scope.get()
                                               else models.base_model_paths[0].name)
        return cls(engine, args, holder.state, AdapterCache(engine, snapshot_root, max_resident))

    # ------------------------------------------------------------------------------ serving
    async def handle(self, req: ReplicaRequest) -> AsyncIterator[Start | bytes | End]:
        """Answer `req` as events (for a front in another process: the split topology)."""
        async with self._serving(req) as (app, scope, loaded, evicted):
            context = contextvars.copy_context()
            context.run(_scope.set, scope)
            async for item in call_app(app, req, context):
                if isinstance(item, Start):
                    item.loaded, item.evicted = loaded, evicted
                yield item
            yield End(scope.prompt_tokens, scope.completion_tokens)

    async def serve_asgi(self, req: ReplicaRequest, receive, send, on_start) -> End:
        """Answer `req` straight onto the client's connection (a front in this process: the fused
        topology), with no event hop per streamed chunk. `receive` is the client's (vLLM's routes
        listen on it for a disconnect); `on_start(loaded, evicted)` is called once the adapter is
        resident. Returns the token counts."""
        async with self._serving(req) as (app, scope, loaded, evicted):
            on_start(loaded, evicted)
            token = _scope.set(scope)
            try:
                await app(asgi_scope(req), body_then(req.body, receive), send)
            finally:
                _scope.reset(token)
            return End(scope.prompt_tokens, scope.completion_tokens)

    @contextlib.asynccontextmanager
    async def _serving(self, req: ReplicaRequest):
        """The adapter version resident and in use for the request's lifetime; yields (vLLM's
        app for its template, its RequestScope, loaded now, names evicted)."""
        adapters = self.adapters  # this engine's: a restart_engine meanwhile brings another
        if req.unloaded:
            await adapters.forget(req.unloaded)
        lora, loaded, evicted = None, False, []
        if req.adapter is not None:
            lora, loaded, evicted = await adapters.acquire(req.adapter)
        try:
            template = req.adapter.template if req.adapter is not None else None
            scope = RequestScope((req.adapter.served_as or req.adapter.name) if req.adapter else None, lora,
                                 self._end_of_turn(template) if req.path in TEMPLATED_ROUTES else [])
            yield self._app(template), scope, loaded, evicted
        finally:
            if lora is not None:
                await adapters.release(lora)

    async def unload(self, name: str) -> bool:
        return await self.adapters.unload(name)

    async def restart_engine(self, start: Callable[[], Any]) -> None:
        """Replace a dead engine with `start()`'s (vLLM does not restart one), in this process.

        `start` runs in a thread: this event loop goes on answering (errors, until the new
        engine is up) meanwhile. vLLM's serving state is rebuilt over the new engine; every
        adapter loads again on its next request. While this runs, `check_health` passes, so that
        Ray Serve does not replace the replica it is bringing back."""
        self.restarting = True
        try:
            with contextlib.suppress(Exception):  # what is left of the dead one
                self.engine.shutdown()
            engine = await asyncio.to_thread(start)
            shutil.rmtree(self.adapters.root, ignore_errors=True)  # the dead engine's snapshots
            fresh = await OpenAIReplica.create(engine, self.args, self.adapters.root, self.adapters.max_resident)
            self.engine, self.adapters = fresh.engine, fresh.adapters
            self._states, self._apps, self._stops = fresh._states, {}, {}
        finally:
            self.restarting = False

    async def check_health(self) -> None:
        """Ray Serve's liveness check: passes while a new engine starts in place of a dead one
        (restart_engine), so that Ray Serve does not replace the replica bringing it back."""
        if self.restarting:
            return
        await self.engine.check_health()

    async def check_ready(self) -> None:
        """The `/health` probe: raises RuntimeError until the engine answers, a restarting one too."""
        if self.restarting:
            raise RuntimeError("the engine died and a new one is starting")
        await self.engine.check_health()

    @property
    def max_model_len(self) -> int:
        return self.engine.model_config.max_model_len

    @property
    def dead(self) -> bool:
        """The engine process has died or its output loop has failed; vLLM does not restart it."""
        return self.engine.errored

    def stats(self) -> dict[str, Any]:
        return {**self.adapters.stats(), "max_model_len": self.max_model_len}

    def shutdown(self) -> None:
        self.engine.shutdown()

    # ------------------------------------------------------------------------- per template
    def _state(self, template: str | None) -> Any:
        """vLLM's app state rendering with `template`: the base state's serving objects, copied
        with that chat template (engine, models, tokenizer and parsers shared)."""
        if template not in self._states:
            from starlette.datastructures import State

            base = self._states[None]
            state = State(dict(base._state))
            renderer = copy.copy(base.online_renderer)
            renderer.chat_template = template
            state.online_renderer = renderer
            for attr in ("openai_serving_chat", "openai_serving_responses", "openai_serving_completion",
                         "serving_tokenization"):
                obj = getattr(base, attr, None)
                if obj is not None:
                    obj = copy.copy(obj)
                    obj.online_renderer = renderer
                    if hasattr(obj, "chat_template"):
                        obj.chat_template = template
                    setattr(state, attr, obj)
            self._states[template] = state
        return self._states[template]

    def _app(self, template: str | None) -> Any:
        """vLLM's routes for the OpenAI API, over the state for `template`."""
        if template not in self._apps:
            self._apps[template] = vllm_routes(self._state(template), self.args)
        return self._apps[template]

    def _end_of_turn(self, template: str | None) -> list[int]:
        if template not in self._stops:
            from lorafleet.templates import end_of_turn_ids

            tokenizer = self.engine.renderer.tokenizer
            text = template if template is not None else self._states[None].online_renderer.chat_template
            text = text or getattr(tokenizer, "chat_template", None)
            self._stops[template] = end_of_turn_ids(tokenizer, text) if text else []
        return self._stops[template]


def vllm_routes(state: Any, args: Any):
    """A FastAPI app with vLLM's own routes and exception handlers for what lorafleet serves
    (serve/contract.py OPENAI_ROUTES), over `state` (vLLM's app state)."""
    from fastapi import FastAPI

    from vllm.entrypoints.openai.chat_completion.api_router import attach_router as chat
    from vllm.entrypoints.openai.completion.api_router import attach_router as completion
    from vllm.entrypoints.openai.responses.api_router import router as responses
    from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
    from vllm.entrypoints.serve.tokenize.api_router import router as tokenize

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state = state  # vLLM's routes read their serving objects from here
    chat(app)
    completion(app)
    for router in (responses, tokenize):  # their POST routes only (no stored-response lookups)
        for route in router.routes:
            if "POST" in getattr(route, "methods", ()) and "{" not in route.path:
                app.router.routes.append(route)
    init_exception_handler(app)
    return app
