"""A replica's adapter cache (serve/adapters.py) with a stand-in engine: versions, LRU, unload
while requests run, snapshots that outlive their source. The real engine: test_serve_stack.py."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from serve.adapters import AdapterCache
from serve.contract import AdapterLoadError, AdapterRef


class FakeEngine:
    """vLLM's add_lora/remove_lora; reads the adapter's config at add, as vLLM does."""

    errored = False

    def __init__(self):
        self.loaded: dict[int, tuple[str, str, dict]] = {}
        self.added: list[str] = []
        self.refuse: set[str] = set()

    async def add_lora(self, lora):
        await asyncio.sleep(0.01)
        if lora.lora_name.split("@")[0] in self.refuse:
            raise ValueError("adapter not supported")
        cfg = json.loads(open(f"{lora.lora_path}/adapter_config.json").read())
        self.loaded[lora.lora_int_id] = (lora.lora_name, lora.lora_path, cfg)
        self.added.append(lora.lora_name)
        return True

    async def remove_lora(self, lora_id):
        self.loaded.pop(lora_id)
        return True


def ref(src, name, version="v1"):
    return AdapterRef(name, str(src / name), version)


@pytest.fixture()
def cache(tiny_adapters, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_adapters, src)
    return AdapterCache(FakeEngine(), tmp_path / "snapshots", max_resident=1), src


def run(coro):
    return asyncio.run(coro)


def test_concurrent_first_requests_load_once(cache):
    c, src = cache

    async def burst():
        return await asyncio.gather(*[c.acquire(ref(src, "alpha")) for _ in range(8)])
    results = run(burst())
    assert c.engine.added == [results[0][0].lora_name] and sum(loaded for _, loaded, _ in results) == 1
    assert c.in_flight[results[0][0].lora_name] == 8


def test_each_version_is_its_own_engine_identity_and_reads_a_snapshot(cache):
    c, src = cache
    a1, _, _ = run(c.acquire(ref(src, "alpha", "v1")))
    run(c.release(a1))
    a2, loaded, _ = run(c.acquire(ref(src, "alpha", "v2")))
    assert loaded and a1.lora_name != a2.lora_name and a1.lora_int_id != a2.lora_int_id
    assert a2.lora_name.startswith("alpha@v2") and not a2.lora_path.startswith(str(src))
    assert list(c.engine.loaded) == [a2.lora_int_id]  # v1 had no request left: gone from the engine


def test_lru_never_evicts_an_adapter_in_use(cache):
    c, src = cache
    a, _, _ = run(c.acquire(ref(src, "alpha")))
    b, _, evicted = run(c.acquire(ref(src, "beta")))  # alpha is in use: kept, over the limit
    assert evicted == [] and set(c.resident) == {"alpha", "beta"}
    run(c.release(a))  # back within the limit as soon as alpha is idle
    assert list(c.resident) == ["beta"] and a.lora_int_id not in c.engine.loaded
    run(c.release(b))
    _, _, evicted = run(c.acquire(ref(src, "alpha", "v1")))
    assert evicted == ["beta"] and list(c.resident) == ["alpha"] and c.evictions == 2


def test_unload_waits_for_running_requests_and_the_snapshot_outlives_the_source(cache):
    c, src = cache
    a, _, _ = run(c.acquire(ref(src, "alpha")))
    assert run(c.unload("alpha"))
    shutil.rmtree(src / "alpha")  # the operator's clean-up after an unload
    assert a.lora_int_id in c.engine.loaded and (c.root / a.lora_name / "adapter_model.safetensors").is_file()
    run(c.release(a))  # the last request through it ends: now it goes
    assert a.lora_int_id not in c.engine.loaded and not (c.root / a.lora_name).exists()
    assert not run(c.unload("alpha"))


def test_a_missing_lora_alpha_is_written_out_as_peft_reads_it(cache):
    from peft import LoraConfig

    c, src = cache
    cfg_file = src / "beta" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["lora_alpha"]
    cfg_file.write_text(json.dumps(cfg))
    b, _, _ = run(c.acquire(ref(src, "beta")))
    assert c.engine.loaded[b.lora_int_id][2]["lora_alpha"] == LoraConfig(r=4).lora_alpha == 8
    assert "lora_alpha" not in json.loads(cfg_file.read_text())  # the source is left as it was


def test_an_adapter_the_engine_refuses(cache):
    c, src = cache
    c.engine.refuse.add("beta")
    with pytest.raises(AdapterLoadError, match="not supported"):
        run(c.acquire(ref(src, "beta")))
    assert not c.resident and not any(c.root.iterdir())
