"""The adapters resident in one replica's engine: load on first use, LRU, versions, unload.

Each load of an adapter is its own identity to vLLM: a `LoRARequest` named
`<name>@<version>.<id>` with that int id, read from a snapshot of its files that this replica
owns (`<version>` hashes the files). That is what vLLM 0.32 needs for an exact in-place replacement:
- its prefix cache keys KV blocks on the LoRA name, so KV computed with old weights must not
  be found under the new weights' name;
- `LoRARequest` compares by name, so two versions in one batch must not share one;
- an adapter vLLM evicted is re-read from its path while a request still names it, so the
  bytes a request runs on stay on disk (the snapshot) until the last such request ends, even
  when the operator deletes or overwrites the source directory.
Unloading or replacing a version retires it: new requests get the new version (or 404 at the
front), requests already running finish on the old one, and the engine forgets it after them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import shutil
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lorafleet.adapter import CONFIG, normalised_config, read_adapter
from lorafleet.errors import UserError
from serve.contract import AdapterLoadError, AdapterRef

log = logging.getLogger("lorafleet.serve")


class LoRAEngine(Protocol):
    """The part of vLLM's EngineClient the cache drives."""

    async def add_lora(self, lora_request: Any) -> bool: ...

    async def remove_lora(self, lora_id: int) -> bool: ...

    @property
    def errored(self) -> bool: ...


@dataclass
class Loaded:
    ref: AdapterRef
    lora: Any  # vllm.lora.request.LoRARequest
    snapshot: Path


def snapshot_adapter(ref: AdapterRef, dest: Path, max_bytes: int = 2 * 1024**3) -> Path:
    """Copy the adapter's top-level files to `dest` (copies, not links: an in-place overwrite of
    the source must not change bytes a running request uses), with its config normalised for
    vLLM (lora_alpha written out as peft reads it). A remote adapter (s3://, hf://) is fetched
    from its source by this replica. Returns `dest`."""
    from serve.registry import download_adapter, is_remote

    root = dest.parent
    tmp = root / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if is_remote(ref.uri):
            download_adapter(ref.uri, tmp, max_bytes)
        else:
            for f in Path(ref.path).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        info = read_adapter(tmp, allow_pickle=True, read_tensors=False)
        (tmp / CONFIG).write_text(json.dumps(normalised_config(info), indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(dest)
    return dest


class AdapterCache:
    """Adapters resident in one engine (at most `max_resident`), least recently used first.

    `acquire` makes a version resident and counts the request as using it; `release` ends that
    use. Concurrent first requests for one adapter load it once. Eviction never takes a version
    a request is using; unload and replacement retire it until its requests end.
    """

    def __init__(self, engine: LoRAEngine, snapshot_root: Path, max_resident: int):
        self.engine = engine
        self.root = Path(snapshot_root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_resident = max_resident
        self.resident: OrderedDict[str, Loaded] = OrderedDict()  # public name -> current version
        self.retired: dict[str, Loaded] = {}  # engine name -> a version waiting for its requests
        self.in_flight: defaultdict[str, int] = defaultdict(int)  # engine name -> requests
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._ids = itertools.count(1)
        self.loads = 0
        self.evictions = 0

    async def acquire(self, ref: AdapterRef) -> tuple[Any, bool, list[str]]:
        """The LoRARequest for this version, resident; returns (lora_request, loaded now, names
        evicted). Raises AdapterLoadError when the engine refuses the adapter."""
        async with self._locks[ref.name]:  # concurrent first requests: one loads, the others wait
            cur = self.resident.get(ref.name)
            if cur is not None and cur.ref.version == ref.version:
                self.resident.move_to_end(ref.name)
                self.in_flight[cur.lora.lora_name] += 1
                return cur.lora, False, []
            if cur is not None:  # same name, other bytes: replaced in place or from a new path
                await self._retire(ref.name, "replaced by a new version")
            evicted = await self._make_room(ref.name)
            loaded = await self._load(ref)
            self.resident[ref.name] = loaded
            self.in_flight[loaded.lora.lora_name] += 1
            return loaded.lora, True, evicted

    async def release(self, lora: Any) -> None:
        """A request using `lora` has ended; a retired version is dropped after its last one."""
        name = lora.lora_name
        self.in_flight[name] -= 1
        if self.in_flight[name] <= 0:
            del self.in_flight[name]
            if name in self.retired:
                await self._drop(self.retired.pop(name))
            elif len(self.resident) > self.max_resident:  # it was kept over the limit while in use
                await self._evict_idle(len(self.resident) - self.max_resident)

    async def unload(self, name: str) -> bool:
        """Stop serving `name` here (admin unload); running requests finish first."""
        async with self._locks[name]:
            if name not in self.resident:
                return False
            await self._retire(name, "unloaded")
            return True

    async def forget(self, names: list[str]) -> list[str]:
        """Free adapters unloaded through another replica (the front lists them)."""
        return [n for n in names if n in self.resident and await self.unload(n)]

    def stats(self) -> dict[str, Any]:
        return {"resident": list(self.resident), "loads": self.loads, "evictions": self.evictions,
                "retired": len(self.retired)}

    # ---------------------------------------------------------------------------- internals
    async def _load(self, ref: AdapterRef) -> Loaded:
        from vllm.lora.request import LoRARequest

        int_id = next(self._ids)
        engine_name = f"{ref.name}@{ref.version}.{int_id}"
        try:
            snapshot = await asyncio.to_thread(snapshot_adapter, ref, self.root / engine_name)
        except (OSError, UserError) as e:  # the source went away or changed after the front's check
            raise AdapterLoadError(f"adapter {ref.name} could not be read from {ref.uri or ref.path}: {e}") from e
        lora = LoRARequest(lora_name=engine_name, lora_int_id=int_id, lora_path=str(snapshot))
        try:
            ok = await self.engine.add_lora(lora)
        except Exception as e:
            if self.engine.errored:
                raise
            await asyncio.to_thread(shutil.rmtree, snapshot, True)
            raise AdapterLoadError(f"the engine refused adapter {ref.name}: {e}") from e
        if ok is False:
            await asyncio.to_thread(shutil.rmtree, snapshot, True)
            raise AdapterLoadError(f"the engine refused adapter {ref.name}")
        self.loads += 1
        log.info("adapter %s loaded (version %s, id %d); resident %d/%d", ref.name, ref.version,
                 lora.lora_int_id, len(self.resident) + 1, self.max_resident)
        return Loaded(ref, lora, snapshot)

    async def _make_room(self, incoming: str) -> list[str]:
        return await self._evict_idle(len(self.resident) + 1 - self.max_resident, keep=incoming)

    async def _evict_idle(self, count: int, keep: str | None = None) -> list[str]:
        """Evict up to `count` adapters no request is using, least recently used first."""
        evicted = []
        for victim in list(self.resident):
            if len(evicted) >= count:
                break
            if victim != keep and self.in_flight[self.resident[victim].lora.lora_name] == 0:
                await self._retire(victim, "LRU")
                self.evictions += 1
                evicted.append(victim)
        return evicted

    async def _retire(self, name: str, why: str) -> None:
        loaded = self.resident.pop(name)
        log.info("adapter %s version %s retired (%s)", name, loaded.ref.version, why)
        if self.in_flight.get(loaded.lora.lora_name, 0) > 0:
            self.retired[loaded.lora.lora_name] = loaded  # dropped by the last release
        else:
            await self._drop(loaded)

    async def _drop(self, loaded: Loaded) -> None:
        try:
            await self.engine.remove_lora(loaded.lora.lora_int_id)
        except Exception as e:  # an engine that died: the replica is replaced anyway
            log.warning("could not remove adapter %s from the engine: %s", loaded.lora.lora_name, e)
        await asyncio.to_thread(shutil.rmtree, loaded.snapshot, True)
