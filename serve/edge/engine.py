"""The edge engine: continuous batching over onnxruntime, one adapter per batch row.

onnxruntime-genai 0.18's continuous batching (`og.Engine`, `og.Request`) cannot choose an
adapter per request (neither `Request` nor `TurnOptions` takes one), and its generators apply one
adapter to the whole batch. So this engine schedules the export's graph itself (graph.py):

- a new request is prefilled alone (its prompt, its adapter), then joins the running batch;
- every step decodes one token for each running request in one graph call, each row with its
  own adapter's LoRA weights (base rows: zeros);
- a finished or cancelled request leaves at the next step; its cache rows are dropped.

The answer of a request is the one it gets alone: rows never mix (each row's attention covers
its own cache; its LoRA product uses its own weights). One thread owns the loop; requests arrive
through a queue and their tokens go back to each request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serve.edge.graph import RowsGraph, read_onnx_adapter

log = logging.getLogger("lorafleet.edge")


@dataclass
class Sampling:
    """What one request asks of the decoder. `temperature` 0: greedy; `top_k` None: off."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    min_tokens: int = 0  # the request's stop ids cannot be sampled before this many tokens


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
    released: bool = False  # its adapter's use count given back

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.tokens.put_nowait, item)


def distribution(logits: np.ndarray, s: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a sampled request may get and their probabilities: softmax(logits / T) cut to
    the `top_k` most likely, then to the smallest set whose mass reaches `top_p` (nucleus
    sampling, Holtzman et al. 2019), renormalised: transformers' TopK then TopP warpers."""
    z = logits.astype(np.float64) / s.temperature
    order = np.argsort(-z, kind="stable")
    if s.top_k:
        order = order[: s.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if s.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), s.top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return order, p


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """One token from `logits` [vocab]: the argmax at temperature 0, else a draw from
    `distribution` with the request's generator (seeded by `seed`: the same draws alone or batched)."""
    if s.temperature <= 0:
        return int(np.argmax(logits))
    order, p = distribution(logits, s)
    return int(order[rng.choice(len(p), p=p)])


@dataclass
class Row:
    """A running request: its job, cached length and the token it feeds next."""
    job: Job
    length: int
    next_token: int
    rng: np.random.Generator


class OnnxEngine:
    """An ONNX export (merge/onnx.py) loaded once, and the loop thread that batches its requests.

    `submit(job)` starts a request (call from the event loop), `cancel(job)` stops it (a client
    that hung up), `load_adapter(key, path)` / `unload_adapter(key)` manage the converted
    adapters. `max_batch` caps the rows decoded together; more requests wait their turn. `graph`:
    the export's RowsGraph when it is already loaded.
    `submit` raises RuntimeError once the loop thread died."""

    def __init__(self, onnx_dir: Path, max_batch: int = 16, graph: RowsGraph | None = None):
        import json

        self.dir = Path(onnx_dir)
        self.graph = graph or RowsGraph(self.dir)
        genai = json.loads((self.dir / "genai_config.json").read_text())["model"]
        self.context_length = int(genai["context_length"])
        self.vocab_size = int(genai["vocab_size"])
        self.max_batch = max_batch
        self.weights: dict[str, dict[str, np.ndarray]] = {}
        self.in_use: dict[str, int] = {}
        self._zeros = {n: np.zeros((1, *s), np.float32) for n, s in self.graph.lora_shapes.items()}
        self._lock = threading.Lock()  # weights and in_use: the loop thread and the front's loads
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: list[Job] = []
        self._rows: list[Row] = []
        self._current: Job | None = None  # the request being prefilled
        self._cache = self.graph.empty_cache(0)
        self._lora: dict[str, np.ndarray] | None = None  # the batch's stacked LoRA inputs, until rows change
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="onnx-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the front's side
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, job: Job) -> None:
        if not self.alive():
            raise RuntimeError(f"the ONNX engine stopped: {self.error!r}")
        job.loop = asyncio.get_running_loop()
        if job.adapter is not None:
            with self._lock:
                if job.adapter not in self.weights:
                    raise RuntimeError(f"adapter {job.adapter} is not loaded")
                self.in_use[job.adapter] = self.in_use.get(job.adapter, 0) + 1
        self._inbox.put(job)

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        self._inbox.put(None)  # wake the loop to drop it

    def load_adapter(self, key: str, path: Path) -> None:
        """Load a converted adapter (`.onnx_adapter`) under `key` once; ValueError when its
        parameters are not this export's LoRA inputs, onnxruntime's error when it is no adapter file."""
        with self._lock:
            if key in self.weights:
                return
        params = read_onnx_adapter(Path(path), self.graph.lora_shapes)
        with self._lock:
            self.weights.setdefault(key, params)

    def unload_adapter(self, key: str) -> bool:
        """Free an adapter no running request uses; False when one still does (or it is not loaded)."""
        with self._lock:
            if key not in self.weights or self.in_use.get(key):
                return False
            del self.weights[key]
            return True

    # ---------------------------------------------------------------- the loop thread
    def _run(self) -> None:
        try:
            while True:
                self._take(block=not (self._rows or self._waiting))
                self._drop_cancelled()
                while self._waiting and len(self._rows) < self.max_batch:
                    self._current = self._waiting.pop(0)
                    self._prefill(self._current)
                    self._current = None
                if self._rows:
                    self._decode()
        except BaseException as e:  # noqa: BLE001 - every waiting request must hear of it
            self.error = e
            log.exception("the ONNX engine loop failed")
            self._take(block=False)  # requests submitted meanwhile
            for job in [*(r.job for r in self._rows), *self._waiting, *([self._current] if self._current else [])]:
                if job is not None and not job.released:
                    job.put(e)

    def _take(self, block: bool) -> None:
        try:
            job = self._inbox.get(block=block)
            while True:
                if job is not None:
                    self._waiting.append(job)
                job = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            self._release(job)
        gone = [i for i, r in enumerate(self._rows) if r.job.cancelled]
        if gone:
            self._leave(gone)

    def _lora_for(self, adapters: list[str | None]) -> dict[str, np.ndarray]:
        """The LoRA inputs for rows using `adapters`: [1, ...] when all rows share one, else stacked."""
        with self._lock:
            sets = [self.weights[a] if a is not None else {} for a in adapters]
        if len(set(adapters)) == 1:
            return {n: sets[0][n][None] if n in sets[0] else z for n, z in self._zeros.items()}
        return {n: np.stack([w.get(n, z[0]) for w in sets]) for n, z in self._zeros.items()}

    def _prefill(self, job: Job) -> None:
        """Run the prompt alone with its adapter, emit its first token, and add it to the batch."""
        try:
            step = self.graph.run(np.asarray([job.ids], np.int64), np.zeros(1, np.int64), self.graph.empty_cache(),
                                  self._lora_for([job.adapter]))
            rng = np.random.default_rng(job.sampling.seed)
        except Exception as e:  # this request's failure (onnxruntime refused it), not the engine's
            self._release(job)
            job.put(e)
            return
        row = Row(job, len(job.ids), 0, rng)
        if self._advance(row, step.logits[0, -1]):
            self._join(row, step.cache)

    def _decode(self) -> None:
        rows = self._rows
        if self._lora is None:
            self._lora = self._lora_for([r.job.adapter for r in rows])
        ids = np.asarray([[r.next_token] for r in rows], np.int64)
        lengths = np.asarray([r.length for r in rows], np.int64)
        step = self.graph.run(ids, lengths, self._cache, self._lora)
        self._cache = step.cache
        done = []
        for i, row in enumerate(rows):
            row.length += 1
            if not self._advance(row, step.logits[i, -1]):
                done.append(i)
        if done:
            self._leave(done)

    def _advance(self, row: Row, logits: np.ndarray) -> bool:
        """Sample the row's next token and hand it over; False when the request is finished (or
        failed: a sampling error is that request's alone, it goes back to it)."""
        job = row.job
        if job.generated < job.sampling.min_tokens and job.stop_ids:  # vLLM's min_tokens: stops masked
            logits = logits.copy()
            logits[list(job.stop_ids)] = -np.inf
        try:
            token = sample(logits, job.sampling, row.rng)
        except Exception as e:  # e.g. non-finite probabilities: not the engine's fault
            job.put(e)
            self._release(job)
            return False
        if token in job.stop_ids:
            reason = "stop"
        else:
            job.generated += 1
            job.put(token)
            if job.generated < job.sampling.max_tokens:
                row.next_token = token
                return True
            reason = "length"
        job.put(reason)
        self._release(job)
        return False

    def _join(self, row: Row, cache: list[tuple[np.ndarray, np.ndarray]]) -> None:
        width = max(self._cache[0][0].shape[2], row.length)
        self._cache = [(np.concatenate([_pad(k, width), _pad(k1, width)]), np.concatenate([_pad(v, width), _pad(v1, width)]))
                       for (k, v), (k1, v1) in zip(self._cache, cache)]
        self._rows.append(row)
        self._lora = None

    def _leave(self, idx: list[int]) -> None:
        for i in idx:
            if not self._rows[i].job.released:  # cancelled while running
                self._rows[i].job.put("cancelled")
                self._release(self._rows[i].job)
        keep = [i for i in range(len(self._rows)) if i not in set(idx)]
        self._rows = [self._rows[i] for i in keep]
        width = max((r.length for r in self._rows), default=0)  # drop the columns no row needs any more
        self._cache = [(k[keep, :, :width], v[keep, :, :width]) for k, v in self._cache]
        self._lora = None

    def _release(self, job: Job) -> None:
        if job.adapter is not None and not job.released:
            with self._lock:
                self.in_use[job.adapter] -= 1
        job.released = True


def _pad(x: np.ndarray, width: int) -> np.ndarray:
    """Right-pad a cache [rows, heads, length, size] with zeros to `width` positions."""
    extra = width - x.shape[2]
    return x if extra == 0 else np.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0)))
