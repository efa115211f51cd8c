"""onnxruntime-genai behind one loop thread: base requests continuously batched, adapters per request.

onnxruntime-genai 0.18's continuous batching (`og.Engine`, `og.Request`) has no adapter per
request: neither `Request` nor `TurnOptions` takes one, and an export's LoRA weights are graph
inputs without a batch dimension, so one graph call applies one adapter to every row. The
correct scheme is therefore:

- requests for the base go to one `og.Engine`, which batches them continuously;
- each request for an adapter gets its own `og.Generator` with that adapter active
  (`set_active_adapter`), so no answer is ever computed with another request's adapter.

One thread owns every onnxruntime-genai object (its C API is not thread safe) and steps the
engine and the generators in turn, one token each per round; requests arrive through a queue
and their tokens go back to each request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("lorafleet.edge")


@dataclass
class Sampling:
    """What one request asks of the decoder. `temperature` 0: greedy; `top_k` None: off."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None


@dataclass
class Job:
    """One request in the engine. Tokens arrive on `tokens` (ints); then a finish reason (str:
    "stop" for EOS or an end-of-turn token, "length" for max_tokens) or an Exception."""
    ids: list[int]
    sampling: Sampling
    adapter: str | None  # the loaded adapter's key (name@version), None for the base
    stop_ids: frozenset[int]
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False
    generated: int = 0
    turn: int = 0  # og.Request.begin_turn's id, for cancel_turn

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.tokens.put_nowait, item)


class OnnxEngine:
    """An exported model (merge/onnx.py) loaded once, and the loop thread that runs it.

    `submit(job)` starts a request (thread-safe; call from the event loop), `cancel(job)` stops it
    (a client that hung up), `load_adapter(key, path)` / `unload_adapter(key)` manage the
    onnxruntime adapters (og.Adapters). Raises RuntimeError from `submit` once the thread died.
    """

    def __init__(self, onnx_dir: Path):
        import onnxruntime_genai as og

        self.og = og
        self.dir = Path(onnx_dir)
        self.model = og.Model(str(self.dir))
        self.adapters = og.Adapters(self.model)
        self.engine: Any = None  # made in the loop thread: og.Engine serves only the thread that made it
        genai = json.loads((self.dir / "genai_config.json").read_text())["model"]
        self.context_length = int(genai["context_length"])
        self.vocab_size = int(genai["vocab_size"])
        self.loaded: set[str] = set()
        self.in_use: dict[str, int] = {}
        self._lock = threading.Lock()  # og calls: the loop thread, adapter loads from the front
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._base: dict[int, tuple[Any, Job]] = {}  # id(og.Request) -> (request, job)
        self._adapted: list[tuple[Any, Job]] = []  # (og.Generator, job)
        self.error: BaseException | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="onnx-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if self.error is not None:
            raise RuntimeError(f"onnxruntime-genai could not start its engine on {self.dir}: {self.error}")

    # ---------------------------------------------------------------- the front's side
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, job: Job) -> None:
        if not self.alive():
            raise RuntimeError(f"the ONNX engine stopped: {self.error!r}")
        job.loop = asyncio.get_running_loop()
        if job.adapter is not None:
            with self._lock:
                self.in_use[job.adapter] = self.in_use.get(job.adapter, 0) + 1
        self._inbox.put(job)

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        self._inbox.put(None)  # wake the loop to drop it

    def load_adapter(self, key: str, path: Path) -> None:
        """Load an .onnx_adapter under `key` once (og.Adapters.load); raises what onnxruntime raises."""
        with self._lock:
            if key not in self.loaded:
                self.adapters.load(str(path), key)
                self.loaded.add(key)

    def unload_adapter(self, key: str) -> bool:
        """Free an adapter no running request uses; False when one still does (or it is not loaded)."""
        with self._lock:
            if key not in self.loaded or self.in_use.get(key):
                return False
            self.adapters.unload(key)
            self.loaded.discard(key)
            return True

    # ---------------------------------------------------------------- the loop thread
    def _run(self, ready: threading.Event) -> None:
        try:
            self.engine = self.og.Engine(self.model)
            self._buffer = self.engine.create_event_buffer(256)
        except BaseException as e:  # noqa: BLE001 - reported by __init__
            self.error = e
            return
        finally:
            ready.set()
        try:
            while True:
                self._take(block=not (self._base or self._adapted))
                self._drop_cancelled()
                if self._base:
                    self._step_engine()
                self._step_generators()
        except BaseException as e:  # noqa: BLE001 - every waiting request must hear of it
            self.error = e
            log.exception("the ONNX engine loop failed")
            for _, job in [*self._base.values(), *self._adapted]:
                job.put(e)

    def _take(self, block: bool) -> None:
        try:
            job = self._inbox.get(block=block)
            while True:
                if job is not None and not job.cancelled:
                    try:
                        with self._lock:
                            self._start(job)
                    except Exception as e:  # this request's failure (og refused it), not the engine's
                        self._release(job)
                        job.put(e)
                job = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _start(self, job: Job) -> None:
        s = job.sampling
        if job.adapter is None:
            req = self.engine.create_request()
            opts = self.og.TurnOptions(req)
            opts.set_max_generated_tokens(s.max_tokens)
            opts.set_do_sample(s.temperature > 0)
            if s.temperature > 0:
                opts.set_temperature(s.temperature)
                opts.set_top_p(s.top_p)
                opts.set_top_k(s.top_k or self.vocab_size)
                if s.seed is not None:
                    opts.set_seed(s.seed)
            job.turn = req.begin_turn(np.asarray(job.ids, dtype=np.int32), opts)
            self._base[id(req)] = (req, job)
            return
        params = self.og.GeneratorParams(self.model)
        search: dict[str, Any] = {"max_length": len(job.ids) + s.max_tokens, "do_sample": s.temperature > 0}
        if s.temperature > 0:
            search.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or self.vocab_size)
            if s.seed is not None:
                search["random_seed"] = s.seed
        params.set_search_options(**search)
        gen = self.og.Generator(self.model, params)
        gen.set_active_adapter(self.adapters, job.adapter)
        gen.append_tokens(job.ids)
        self._adapted.append((gen, job))

    def _step_engine(self) -> None:
        flags = self.og.EngineEventFlags
        with self._lock:
            events = list(self.engine.run(self._buffer))
        for ev in events:
            entry = self._base.get(id(ev.request))
            if entry is None:
                continue
            req, job = entry
            if int(ev.flags) & int(flags.FAILED):
                self._finish_base(req, job, RuntimeError(f"onnxruntime-genai failed the request ({ev.error_code.name})"))
                continue
            if int(ev.flags) & int(flags.TOKEN) and self._emit(job, int(ev.token)):
                self._finish_base(req, job, "stop", cancel=not int(ev.flags) & int(flags.TURN_FINISHED))
                continue
            if int(ev.flags) & int(flags.TURN_FINISHED):
                reason = "length" if ev.finish_reason == self.og.FinishReason.MAX_GENERATED_TOKENS else "stop"
                self._finish_base(req, job, reason)

    def _step_generators(self) -> None:
        still = []
        for gen, job in self._adapted:
            if job.cancelled:
                self._release(job)
                continue
            with self._lock:
                gen.generate_next_token()
                token = int(gen.get_next_tokens()[0])
                done = gen.is_done()
            if self._emit(job, token):
                job.put("stop")
            elif done or job.generated >= job.sampling.max_tokens:
                job.put("length" if job.generated >= job.sampling.max_tokens else "stop")
            else:
                still.append((gen, job))
                continue
            self._release(job)
        self._adapted = still

    def _emit(self, job: Job, token: int) -> bool:
        """Hand one token to the request; True when it ends the answer (EOS, end of turn)."""
        if token in job.stop_ids:
            return True
        job.generated += 1
        job.put(token)
        return False

    def _finish_base(self, req: Any, job: Job, outcome: Any, cancel: bool = False) -> None:
        self._base.pop(id(req), None)
        with self._lock:
            if cancel:
                req.cancel_turn(job.turn)
            req.close()
        job.put(outcome)

    def _drop_cancelled(self) -> None:
        for key, (req, job) in list(self._base.items()):
            if job.cancelled:
                self._finish_base(req, job, "cancelled", cancel=True)

    def _release(self, job: Job) -> None:
        if job.adapter is not None:
            with self._lock:
                self.in_use[job.adapter] -= 1
