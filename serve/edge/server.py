"""The edge server: lorafleet's front over the ONNX engine, `lorafleet serve-edge`.

The front (serve/routes.py) is the vLLM server's: keys, limits, drain, the registry and its gate,
/v1/models, the admin routes, metrics and the error shape. `EdgeBackend` is the engine side of its
`Backend` seam: it renders the prompt with the adapter's recorded template (lorafleet/templates.py,
the renderer training used), stops at the template's end of turn, runs the request on the
OnnxEngine (continuous batching, one adapter per batch row) and writes the answer in the openai
package's types.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, AsyncIterator

from lorafleet.config import ServeConfig
from lorafleet.edge_adapter import ADAPTERS_DIR, WEIGHTS
from lorafleet.errors import UserError
from serve.contract import AdapterLoadError, AdapterRef, End, ReplicaRequest, Start
from serve.edge.engine import Job, OnnxEngine, Sampling
from serve.edge.protocol import CHAT, COMPLETIONS, Ask, answer, chunk, new_id, parse
from serve.errors import OpenAIError

log = logging.getLogger("lorafleet.edge")
SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
JSON = [(b"content-type", b"application/json")]


def openai_model_card(**fields: Any) -> dict[str, Any]:
    """A /v1/models entry as the openai package's Model (its extra fields kept, as vLLM writes them)."""
    from openai.types import Model

    fields.setdefault("created", int(time.time()))
    return Model(object="model", **fields).model_dump(mode="json", exclude_none=True)


class EdgeBackend:
    """The front's Backend over one OnnxEngine. `max_resident`: adapters kept loaded (LRU)."""

    def __init__(self, engine: OnnxEngine, tokenizer: Any, base_template: str | None, max_resident: int = 8):
        self.engine, self.tok, self.base_template = engine, tokenizer, base_template
        self.max_resident = max_resident
        self.lru: OrderedDict[str, None] = OrderedDict()
        eos = tokenizer.eos_token_id
        self.eos = {eos} if isinstance(eos, int) else set(eos or [])
        self._end_of_turn: dict[str, frozenset[int]] = {}

    # ------------------------------------------------------------------ Backend
    async def handle(self, req: ReplicaRequest) -> AsyncIterator[Start | bytes | End]:
        if req.path not in (CHAT, COMPLETIONS):
            raise OpenAIError(404, f"{req.method} {req.path} is not served by the edge server; it serves "
                                   f"{CHAT} and {COMPLETIONS}")
        try:
            body = json.loads(req.body)
        except (ValueError, UnicodeDecodeError):
            raise OpenAIError(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the body must be a JSON object")
        ask = parse(req.path, body)
        template = (req.adapter.template if req.adapter else None) or self.base_template
        ids, stop_ids = self._prompt(ask, template)
        sampling = self._sampling(ask, len(ids))
        key, loaded = await self._adapter(req.adapter)
        job = Job(ids, sampling, key, frozenset() if ask.ignore_eos else stop_ids)
        self.engine.submit(job)
        finished = False
        try:
            # Nothing is answered before the engine has: a request it fails gets an error status,
            # never a 200 with an empty or cut body (a stream after its first token can only end
            # with an error event).
            if ask.stream:
                first = await job.tokens.get()
                if isinstance(first, BaseException):
                    raise _failed(first)
                yield Start(200, SSE, loaded=loaded)
                async for piece in self._stream(ask, job, first):
                    yield piece
            else:
                try:
                    whole = await self._whole(ask, job)
                except Exception as e:
                    raise _failed(e) from None
                yield Start(200, JSON, loaded=loaded)
                yield whole
            finished = True
            yield End(len(ids), job.generated)
        finally:
            if not finished:
                self.engine.cancel(job)

    def replica_gone(self, e: BaseException) -> bool:
        return False  # one engine in this process: nowhere else to send a request

    async def unload(self, name: str) -> None:
        for key in [k for k in self.lru if k.rsplit("@", 1)[0] == name]:  # keys are NAME@CONTENT_HASH
            if self.engine.unload_adapter(key):
                self.lru.pop(key, None)

    async def health(self) -> None:
        if not self.engine.alive():
            raise RuntimeError(f"the ONNX engine stopped: {self.engine.error!r}")

    # ------------------------------------------------------------------ one request
    def _prompt(self, ask: Ask, template: str | None) -> tuple[list[int], frozenset[int]]:
        from lorafleet.templates import end_of_turn_ids, render_prompt_ids

        if ask.route == CHAT:
            if not template:
                raise OpenAIError(400, "this model has no chat template; use /v1/completions", param="messages")
            if template not in self._end_of_turn:
                self._end_of_turn[template] = frozenset(self.eos | set(end_of_turn_ids(self.tok, template)))
            return render_prompt_ids(self.tok, template, ask.messages), self._end_of_turn[template]
        ids = ask.prompt if isinstance(ask.prompt, list) else self.tok(ask.prompt)["input_ids"]
        if not ids:
            raise OpenAIError(400, "prompt: empty (no tokens); send some text or token ids", param="prompt")
        if any(not 0 <= t < self.engine.vocab_size for t in ids):
            raise OpenAIError(400, f"prompt: token ids must be in [0, {self.engine.vocab_size})", param="prompt")
        return list(ids), frozenset(self.eos)

    def _sampling(self, ask: Ask, prompt_len: int) -> Sampling:
        room = self.engine.context_length - prompt_len
        field = "messages" if ask.route == CHAT else "prompt"
        if room <= 0:
            raise OpenAIError(400, f"the prompt is {prompt_len} tokens, this model's context is "
                                   f"{self.engine.context_length}; send a shorter one", param=field)
        if ask.max_tokens is not None and ask.max_tokens > room:
            raise OpenAIError(400, f"max_tokens={ask.max_tokens} and the prompt's {prompt_len} tokens exceed this "
                                   f"model's context of {self.engine.context_length}; ask for at most {room}",
                              param="max_tokens")
        if ask.max_tokens is not None and ask.max_tokens < 1:
            raise OpenAIError(400, "max_tokens must be at least 1", param="max_tokens")
        if not 0 <= ask.temperature <= 2:
            raise OpenAIError(400, "temperature must be between 0 and 2", param="temperature")
        if not 0 < ask.top_p <= 1:
            raise OpenAIError(400, "top_p must be in (0, 1]", param="top_p")
        if ask.top_k is not None and ask.top_k < 1:
            raise OpenAIError(400, "top_k must be at least 1", param="top_k")
        if ask.min_tokens > (ask.max_tokens or room):
            raise OpenAIError(400, f"min_tokens={ask.min_tokens} is above max_tokens", param="min_tokens")
        return Sampling(ask.max_tokens or room, ask.temperature, ask.top_p, ask.top_k, ask.seed, ask.min_tokens)

    async def _adapter(self, ref: AdapterRef | None) -> tuple[str | None, bool]:
        """The engine's key for the adapter version (loaded now if it was not), and whether it was."""
        if ref is None:
            return None, False
        key = f"{ref.name}@{ref.version}"
        if key in self.lru:
            self.lru.move_to_end(key)
            return key, False
        try:
            await asyncio.to_thread(self.engine.load_adapter, key, Path(ref.path) / WEIGHTS)
        except Exception as e:  # onnxruntime's own error types: the adapter's fault, a 422
            raise AdapterLoadError(f"the ONNX engine could not load adapter {ref.name}: {str(e)[:300]}") from None
        self.lru[key] = None
        for old in [k for k in self.lru if k != key][: max(0, len(self.lru) - self.max_resident)]:
            if self.engine.unload_adapter(old):  # in use: stays until a later request frees room
                self.lru.pop(old)
        return key, True

    async def _tokens(self, ask: Ask, job: Job, first: Any = None) -> AsyncIterator[tuple[str, str | None]]:
        """(new text, None) as tokens arrive (`first`: one already taken from the queue), then
        ("", finish reason), cut at the request's stops."""
        ids: list[int] = []
        sent = 0
        hold = max((len(s) for s in ask.stop), default=1) - 1
        while True:
            item, first = (first, None) if first is not None else (await job.tokens.get(), None)
            if isinstance(item, BaseException):
                raise item
            done = isinstance(item, str)
            if not done:
                ids.append(item)
            text = self.tok.decode(ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(s, max(0, sent - len(s) + 1)) for s in ask.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.engine.cancel(job)
                yield text[sent:cut], None
                yield "", "stop"
                return
            if done:
                yield text[sent:], None
                yield "", item
                return
            upto = len(text) - hold if not text.endswith("\ufffd") else len(text) - hold - 1
            if upto > sent:
                yield text[sent:upto], None
                sent = upto

    async def _whole(self, ask: Ask, job: Job) -> bytes:
        parts, finish = [], "stop"
        async for text, end in self._tokens(ask, job):
            parts.append(text)
            finish = end or finish
        return json.dumps(answer(ask, new_id(ask.route), "".join(parts), finish, len(job.ids), job.generated)).encode()

    async def _stream(self, ask: Ask, job: Job, first: Any) -> AsyncIterator[bytes]:
        rid, created = new_id(ask.route), int(time.time())

        def sse(obj: dict) -> bytes:
            return f"data: {json.dumps(obj)}\n\n".encode()

        if ask.route == CHAT:
            yield sse(chunk(ask, rid, created, role=True))
        async for text, end in self._tokens(ask, job, first):
            if text:
                yield sse(chunk(ask, rid, created, text=text))
            if end:
                yield sse(chunk(ask, rid, created, finish=end))
        if ask.include_usage:
            yield sse(chunk(ask, rid, created, usage_of=(len(job.ids), job.generated)))
        yield b"data: [DONE]\n\n"


def _failed(e: BaseException) -> OpenAIError:
    """The error answer for a request the engine failed before answering: 503 when the engine
    itself stopped (the server's /health says so too), else 500 naming what failed."""
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, RuntimeError) and "stopped" in str(e):
        return OpenAIError(503, str(e)[:300], headers={"Retry-After": "5"})
    return OpenAIError(500, f"generation failed: {type(e).__name__}: {str(e)[:200]}")


# ------------------------------------------------------------------------------ the app
def build_edge_app(cfg: ServeConfig, onnx_dir: Path):
    """The front's app over the ONNX export at `onnx_dir` (cfg.model); UserError when it is not one."""
    from concurrent.futures import ThreadPoolExecutor

    from serve.edge.graph import RowsGraph

    onnx_dir = Path(onnx_dir)
    if not (onnx_dir / "genai_config.json").is_file():
        raise UserError(f"{onnx_dir} is not an ONNX export (no genai_config.json); make one with "
                        "`lorafleet export-onnx --model MODEL --out DIR`")
    # onnxruntime builds its session (graph optimisation, weight prepacking) without the GIL: it
    # runs while the tokenizer's imports and the registry's scan go on here.
    with ThreadPoolExecutor(1, thread_name_prefix="onnx-load") as pool:
        graph = pool.submit(RowsGraph, onnx_dir)
        try:
            return _build_edge_app(cfg, onnx_dir, graph)
        finally:
            graph.cancel()


def _build_edge_app(cfg: ServeConfig, onnx_dir: Path, graph):
    # The fast tokenizer class itself: AutoTokenizer imports transformers' model configs, which
    # import torch where it is installed.
    from transformers import PreTrainedTokenizerFast

    from lorafleet.edge_adapter import read_lora_inputs
    from lorafleet.models import cache_root
    from serve.auth import read_keys
    from serve.edge.registry import EdgeRegistry
    from serve.fleet import start_router
    from serve.registry import log_adapters
    from serve.routes import Frontend, build_app

    try:
        inputs, why = read_lora_inputs(onnx_dir), ""
    except UserError as e:
        inputs, why = None, str(e)
    served = cfg.served_model_name or onnx_dir.name
    sources = [str(onnx_dir / ADAPTERS_DIR), *cfg.adapters]
    for src in cfg.adapters:
        if "://" not in src and not Path(src).exists():
            raise UserError(f"adapter source {src} does not exist; create it or fix `adapters`")
    registry = EdgeRegistry(sources, cache_dir=cache_root() / "edge-adapters", lora_inputs=inputs,
                            no_inputs_reason=why, max_adapter_bytes=cfg.limits.max_adapter_bytes, base_name=served,
                            require_eval=cfg.registry.require_eval)
    registry.scan()
    fleet = start_router(cfg.fleet_file, registry, cfg.registry.require_eval, cfg.fleet_poll_s)
    log_adapters(registry, str(onnx_dir))
    if not (onnx_dir / "tokenizer.json").is_file():
        raise UserError(f"{onnx_dir} has no tokenizer.json; export it again with `lorafleet export-onnx`")
    tok = PreTrainedTokenizerFast.from_pretrained(onnx_dir)
    template_file = onnx_dir / "chat_template.jinja"
    base_template = template_file.read_text() if template_file.is_file() else tok.chat_template
    engine = OnnxEngine(onnx_dir, max_batch=cfg.engine.max_num_seqs, graph=graph.result())
    backend = EdgeBackend(engine, tok, base_template, max_resident=cfg.max_resident_adapters)
    fe = Frontend(served_name=served, registry=registry, backend=backend, max_model_len=engine.context_length,
                  limits=cfg.limits, api_keys=read_keys("LORAFLEET_API_KEY", cfg.api_keys_file),
                  admin_keys=read_keys("LORAFLEET_ADMIN_KEY", cfg.admin_keys_file), root_model=str(onnx_dir),
                  model_card=openai_model_card, fleet=fleet)
    return build_app(fe)


def serve_edge(cfg: ServeConfig, log_fn=print) -> None:
    """Run the edge server on cfg.host:cfg.port until SIGTERM/SIGINT; in-flight requests get
    cfg.shutdown_grace_s to finish (uvicorn's graceful shutdown), new ones a 503."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = build_edge_app(cfg, Path(cfg.model))
    log_fn(f"edge server for {cfg.model} on http://{cfg.host}:{cfg.port}/v1 (onnxruntime)")
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                            timeout_graceful_shutdown=int(cfg.shutdown_grace_s))
    server = uvicorn.Server(config)
    fe = app.state.frontend
    original = server.handle_exit

    def handle_exit(sig, frame):  # stop taking requests at once; uvicorn lets the running ones finish
        fe.drain()
        original(sig, frame)

    server.handle_exit = handle_exit
    server.run()


def main(argv: list[str] | None = None) -> None:
    """`python -m serve.edge CONFIG.yaml [--set key=value ...]` (the edge image's entry point)."""
    import argparse
    import sys

    from lorafleet.config import load_config

    p = argparse.ArgumentParser(prog="python -m serve.edge", description=main.__doc__)
    p.add_argument("config", nargs="?")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args(argv)
    try:
        serve_edge(load_config(ServeConfig, a.config, a.overrides))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
