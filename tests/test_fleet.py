"""Adapter versions, aliases and gated rollout (lorafleet/fleet.py, serve/fleet.py).

The file's checks and the sticky split are tested on their own; then a real server (the edge
server: lorafleet's front over onnxruntime, which starts in seconds) follows a fleet file while
clients stream, and every answer is compared with the answer of the version its header names.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from lorafleet.fleet import FleetError, canary, promote, read_fleet, rollback
from lorafleet.net import free_port, stop_server, wait_until_serving

ROOT = Path(__file__).resolve().parents[1]
ADMIN = {"Authorization": "Bearer sk-admin"}
KEY = {"Authorization": "Bearer sk-fleet"}


def with_eval(directory: Path, score: float, data: str = "held_out.jsonl") -> Path:
    """Record an evaluation in the version's lorafleet.json, as `lorafleet eval` writes it."""
    man = directory / "lorafleet.json"
    doc = json.loads(man.read_text()) if man.is_file() else {}
    doc["eval"] = {"data": data, "items": 20, "adapter_scores": {"fact_match": score},
                   "base_scores": {"fact_match": 0.1}, "created": "2026-12-07"}
    man.write_text(json.dumps(doc))
    return directory


def write_fleet(path: Path, traffic: dict[str, int], **extra) -> Path:
    alias = {"versions": {"v1": "legal/v1", "v2": "legal/v2"}, "traffic": traffic, **extra}
    path.write_text(yaml.safe_dump({"aliases": {"legal": alias}}, sort_keys=False))
    return path


@pytest.fixture()
def plain_versions(tmp_path):
    """A fleet dir with legal/v1 and legal/v2 as plain directories (for the file's own checks)."""
    for v, score in (("v1", 0.8), ("v2", 0.9)):
        (tmp_path / "legal" / v).mkdir(parents=True)
        with_eval(tmp_path / "legal" / v, score)
    return tmp_path


# ------------------------------------------------------------------------------ the file
@pytest.mark.parametrize("text, line, words", [
    ("aliases:\n  legal:\n    versions: {v1: legal/v1}\n    traffic: {v1: 90, v3: 10}\n", 4, "version 'v3'"),
    ("aliases:\n  legal:\n    versions: {v1: legal/v1, v2: legal/v2}\n    traffic: {v1: 90, v2: 20}\n", 4,
     "sums to 110"),
    ("aliases:\n  legal:\n    versions:\n      v1: legal/v1\n      v9: legal/v9\n    traffic: {v1: 100}\n", 5,
     "does not exist"),
    ("aliases:\n  legal:\n    versions: {v1: legal/v1\n    traffic: {v1: 100}\n", 4, "not valid YAML"),
    ("aliases:\n  legal:\n    versions: {v1: legal/v1}\n    trafic: {v1: 100}\n", 4, "unknown key 'trafic'"),
    ("aliases:\n  legal:\n    versions: {v1: legal/v1}\n    traffic: {v1: 99.5}\n", 4, "whole percent"),
])
def test_a_broken_file_names_the_line(plain_versions, text, line, words):
    f = plain_versions / "fleet.yaml"
    f.write_text(text)
    with pytest.raises(FleetError) as e:
        read_fleet(f)
    assert f"{f}:{line}:" in str(e.value) and words in str(e.value), str(e.value)


def test_split_is_sticky_and_near_its_weights(plain_versions):
    alias = read_fleet(write_fleet(plain_versions / "fleet.yaml", {"v1": 90, "v2": 10})).aliases["legal"]
    picks = {f"user-{i}": alias.pick(f"user-{i}") for i in range(1000)}
    share = sum(v == "v2" for v in picks.values()) / len(picks)
    assert 0.07 <= share <= 0.13, share
    assert all(alias.pick(u) == v for u, v in picks.items())  # the same caller, the same version
    wider = read_fleet(write_fleet(plain_versions / "fleet.yaml", {"v1": 80, "v2": 20})).aliases["legal"]
    assert all(wider.pick(u) == "v2" for u, v in picks.items() if v == "v2")  # a wider canary keeps its callers


def test_promote_is_gated_and_rolls_back(plain_versions):
    f = write_fleet(plain_versions / "fleet.yaml", {"v1": 100}, require_eval={"metric": "fact_match", "min": 0.85})
    with pytest.raises(FleetError, match=r"fact_match 0\.800 .* below the minimum 0\.850"):
        promote(f, "legal", "v1")  # v1 itself misses the gate: it may not be promoted again either
    with_eval(plain_versions / "legal" / "v2", 0.7)
    with pytest.raises(FleetError, match=r"fact_match 0\.700 .*minimum 0\.850"):
        promote(f, "legal", "v2")
    f = write_fleet(f, {"v1": 100}, require_eval={"metric": "fact_match", "min": 0.5})
    with pytest.raises(FleetError, match=r"legal@v2 scores fact_match 0\.700 .* below legal@v1's 0\.800"):
        promote(f, "legal", "v2")
    with_eval(plain_versions / "legal" / "v2", 0.9, data="other.jsonl")
    with pytest.raises(FleetError, match="same held-out file"):
        canary(f, "legal", "v2", 10)
    with_eval(plain_versions / "legal" / "v2", 0.9)
    canary(f, "legal", "v2", 10)
    assert read_fleet(f).aliases["legal"].traffic == {"v1": 90, "v2": 10}
    rollback(f, "legal")  # ends the canary
    assert read_fleet(f).aliases["legal"].traffic == {"v1": 100}
    promote(f, "legal", "v2")
    a = read_fleet(f).aliases["legal"]
    assert a.traffic == {"v2": 100} and a.history == ("v1",)
    rollback(f, "legal")
    a = read_fleet(f).aliases["legal"]
    assert a.traffic == {"v1": 100} and a.history == ()
    with pytest.raises(FleetError, match="nothing to roll back"):
        rollback(f, "legal")


# ------------------------------------------------------------------------------ served
@pytest.fixture(scope="module")
def fleet_dir(tiny_base, tmp_path_factory):
    """An edge export of the tiny base, and legal/v1, legal/v2 converted for it, each evaluated."""
    from fixtures import make_random_adapter
    from merge.onnx import export_onnx
    from merge.onnx_adapters import convert_adapter

    work = tmp_path_factory.mktemp("fleet")
    export = export_onnx(tiny_base, work / "export", max_lora_rank=8, log=lambda *_: None)
    for v, seed, score in (("v1", 11, 0.8), ("v2", 12, 0.9)):
        convert_adapter(export, make_random_adapter(tiny_base, work / "peft" / v, seed=seed, r=4),
                        out_dir=work / "legal")  # legal/v1, legal/v2: the adapter's directory name
        with_eval(work / "legal" / v, score)
    return work, export


def start_edge(export: Path, fleet_file: Path, work: Path):
    """An edge server following `fleet_file`, polled every 0.2 s: (url, process)."""
    port = free_port()
    log = work / f"server-{port}.log"
    env = dict(os.environ, LORAFLEET_API_KEY="sk-fleet", LORAFLEET_ADMIN_KEY="sk-admin",
               LORAFLEET_CACHE=str(work / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "serve.edge", "--set", f"model={export}", "--set", f"port={port}",
                             "--set", "served_model_name=tiny", "--set", f"fleet_file={fleet_file}",
                             "--set", "fleet_poll_s=0.2"], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc, log, timeout=120)
    except BaseException:
        stop_server(proc, grace_s=10)
        raise
    return url, proc


@pytest.fixture()
def served(fleet_dir, tmp_path):
    """The edge server following `fleet.yaml` (v1 100%)."""
    work, export = fleet_dir
    f = write_fleet(work / "fleet.yaml", {"v1": 100}, require_eval={"metric": "fact_match", "min": 0.5})
    url, proc = start_edge(export, f, tmp_path)
    try:
        yield url, f
    finally:
        stop_server(proc, grace_s=10)


PROMPTS = [[5, 17, 33], [9, 41, 2, 77], [120, 5], [300, 301, 302, 303, 304]]


def ask(url: str, model: str, prompt, user: str | None = None, stream: bool = False) -> tuple[str, str]:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    if user:
        body["user"] = user
    r = httpx.post(url + "/v1/completions", json=body, headers=KEY, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers["x-lorafleet-version"], r.json()["choices"][0]["text"]


def lone_answers(url: str) -> dict[tuple[str, int], str]:
    """Each version's answer to each prompt, pinned (ALIAS@VERSION)."""
    out = {}
    for v in ("v1", "v2"):
        for i, p in enumerate(PROMPTS):
            header, text = ask(url, f"legal@{v}", p)
            assert header == f"legal@{v}"
            out[(f"legal@{v}", i)] = text
    assert out[("legal@v1", 0)] != out[("legal@v2", 0)]  # the versions really differ
    return out


def test_versions_aliases_models_and_metrics(served):
    url, f = served
    lone = lone_answers(url)
    header, text = ask(url, "legal", PROMPTS[0], user="ana")
    assert header == "legal@v1" and text == lone[("legal@v1", 0)]
    cards = {c["id"]: c for c in httpx.get(url + "/v1/models", headers=KEY).json()["data"]}
    assert cards["legal"]["fleet"]["traffic"] == {"v1": 100} and cards["legal"]["fleet"]["current"] == "v1"
    assert cards["legal@v2"]["fleet"] == {"alias": "legal", "version": "v2"}
    assert cards["legal@v2"]["eval"]["adapter_scores"] == {"fact_match": 0.9}
    r = httpx.post(url + "/v1/completions", json={"model": "legal@v7", "prompt": [5]}, headers=KEY)
    assert r.status_code == 404 and "v1, v2" in r.json()["error"]["message"]
    metrics = httpx.get(url + "/metrics").text
    assert 'lorafleet_requests_total{model="legal",route="/v1/completions",status="200",version="v1"} 1.0' in metrics
    assert 'lorafleet_completion_tokens_total{model="legal",version="v1"} 8.0' in metrics
    assert 'lorafleet_model_request_seconds_count{model="legal@v2",version="v2"}' in metrics


def test_split_over_1000_callers(served):
    """90/10 over 1000 distinct users: the canary's share is 10 % ± 3; each user sees one version."""
    url, f = served
    write_fleet(f, {"v1": 90, "v2": 10}, require_eval={"metric": "fact_match", "min": 0.5})
    assert httpx.post(url + "/v1/fleet/reload", headers=ADMIN).status_code == 200

    async def run():
        async with httpx.AsyncClient(base_url=url, headers=KEY, timeout=60) as c:
            sem = asyncio.Semaphore(16)

            async def one(i):
                async with sem:
                    r = await c.post("/v1/completions", json={"model": "legal", "prompt": [5], "max_tokens": 1,
                                                              "user": f"user-{i % 500}"})
                    assert r.status_code == 200, r.text
                    return f"user-{i % 500}", r.headers["x-lorafleet-version"]

            return await asyncio.gather(*(one(i) for i in range(1000)))

    seen: dict[str, set[str]] = {}
    for user, version in asyncio.run(run()):
        seen.setdefault(user, set()).add(version)
    assert all(len(v) == 1 for v in seen.values())  # every user twice, the same version both times
    share = sum("legal@v2" in v for v in seen.values()) / len(seen)
    assert 0.07 <= share <= 0.13, share


async def stream_until(url: str, stop: asyncio.Event, clients: int = 16) -> list[tuple[float, str, int, str]]:
    """`clients` streaming clients asking in turn until `stop`; (start time, version, prompt, text) each."""
    out, errors = [], []

    async def client(c, k):
        i = 0
        while not stop.is_set():
            p = (k + i) % len(PROMPTS)
            t0 = asyncio.get_running_loop().time()
            body = {"model": "legal", "prompt": PROMPTS[p], "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                    "stream": True, "user": f"client-{k}-{i}"}
            try:
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(r.status_code)
                        continue
                    parts = [json.loads(line[6:])["choices"][0]["text"] async for line in r.aiter_lines()
                             if line.startswith("data: {") and json.loads(line[6:])["choices"]]
                    out.append((t0, r.headers["x-lorafleet-version"], p, "".join(parts)))
            except httpx.HTTPError as e:
                errors.append(repr(e))
            i += 1

    async with httpx.AsyncClient(base_url=url, headers=KEY, timeout=60) as c:
        await asyncio.gather(*(client(c, k) for k in range(clients)))
    assert not errors, errors[:5]
    return out


def test_promote_and_rollback_under_16_streaming_clients(served):
    """No request fails, each answer is its version's whole answer, and after the switch every
    request goes to the new version; the same for the rollback."""
    url, f = served
    lone = lone_answers(url)

    async def switch(change, want: str) -> float:
        stop = asyncio.Event()
        streaming = asyncio.create_task(stream_until(url, stop))
        await asyncio.sleep(1.5)
        await asyncio.to_thread(change)
        async with httpx.AsyncClient(base_url=url, headers=ADMIN) as c:
            for _ in range(600):  # the server's own poll applies it (every 0.2 s here)
                if (await c.get("/v1/fleet")).json()["aliases"]["legal"]["traffic"] == {want: 100}:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the server did not apply the edited fleet file within 30 s")
        switched = asyncio.get_running_loop().time()
        await asyncio.sleep(1.5)
        stop.set()
        results = await streaming
        for _, version, p, text in results:
            assert text == lone[(version, p)]  # never a mix of versions
        after = [v for t0, v, _, _ in results if t0 > switched]
        assert after and set(after) == {f"legal@{want}"}
        return len(results)

    n = asyncio.run(switch(lambda: promote(f, "legal", "v2"), "v2"))
    n += asyncio.run(switch(lambda: rollback(f, "legal"), "v1"))
    assert n > 32


def test_a_broken_edit_is_refused_whole_while_serving(served, fleet_dir):
    url, f = served
    work, _ = fleet_dir
    good = f.read_text()
    broken = {
        "unknown version": good.replace("v1: 100", "v3: 100"),
        "weights": good.replace("v1: 100", "v1: 90"),
        "missing source": good.replace("legal/v2", "legal/v9"),
        "syntax": good.replace("traffic:", "traffic: {"),
    }

    async def run():
        stop = asyncio.Event()
        streaming = asyncio.create_task(stream_until(url, stop, clients=4))
        async with httpx.AsyncClient(base_url=url, headers=ADMIN, timeout=60) as c:
            for kind, text in broken.items():
                f.write_text(text)
                r = await c.post("/v1/fleet/reload")
                assert r.status_code == 422 and f"{f}:" in r.json()["error"]["message"], (kind, r.text)
                state = (await c.get("/v1/fleet")).json()
                assert state["aliases"]["legal"]["traffic"] == {"v1": 100} and state["error"]
        f.write_text(good)
        stop.set()
        return await streaming

    results = asyncio.run(run())
    assert results and {v for _, v, _, _ in results} == {"legal@v1"}


def test_a_version_below_the_gate_takes_no_traffic(served):
    """A hand edit that gives traffic to a version missing require_eval is refused, naming the numbers."""
    url, f = served
    write_fleet(f, {"v1": 50, "v2": 50}, require_eval={"metric": "fact_match", "min": 0.85})
    r = httpx.post(url + "/v1/fleet/reload", headers=ADMIN)
    assert r.status_code == 422 and "0.800" in r.json()["error"]["message"] and "0.850" in r.json()["error"]["message"]
    assert ask(url, "legal", PROMPTS[0], user="bo")[0] == "legal@v1"
    # A refused file lists none of its new versions; a version without traffic needs no evaluation.
    v3 = f.parent / "legal" / "v3"
    shutil.copytree(f.parent / "legal" / "v2", v3, dirs_exist_ok=True)
    (v3 / "lorafleet.json").unlink()
    f.write_text(f.read_text().replace("v2: legal/v2", "v2: legal/v2\n      v3: legal/v3").replace("v2: 50", "v3: 50"))
    assert httpx.post(url + "/v1/fleet/reload", headers=ADMIN).status_code == 422
    assert "legal@v3" not in {c["id"] for c in httpx.get(url + "/v1/models", headers=KEY).json()["data"]}
    write_fleet(f, {"v1": 100}, require_eval={"metric": "fact_match", "min": 0.5})
    f.write_text(f.read_text().replace("v2: legal/v2", "v2: legal/v2\n      v3: legal/v3"))
    assert httpx.post(url + "/v1/fleet/reload", headers=ADMIN).status_code == 200, f.read_text()
    assert ask(url, "legal@v3", PROMPTS[0])[0] == "legal@v3"


def test_two_replicas_follow_one_file(fleet_dir, tmp_path):
    """Two servers (replicas) reading one fleet file give every user the same version, and both
    follow an edit to it."""
    work, export = fleet_dir
    f = write_fleet(work / "fleet.yaml", {"v1": 50, "v2": 50}, require_eval={"metric": "fact_match", "min": 0.5})
    replicas = [start_edge(export, f, tmp_path) for _ in range(2)]
    try:
        users = [f"user-{i}" for i in range(40)]
        first, second = ({u: ask(url, "legal", PROMPTS[0], user=u)[0] for u in users} for url, _ in replicas)
        assert first == second and set(first.values()) == {"legal@v1", "legal@v2"}
        promote(f, "legal", "v2")
        for url, _ in replicas:
            for _ in range(150):
                if httpx.get(url + "/v1/fleet", headers=ADMIN).json()["aliases"]["legal"]["traffic"] == {"v2": 100}:
                    break
                time.sleep(0.1)
            assert {ask(url, "legal", PROMPTS[0], user=u)[0] for u in users} == {"legal@v2"}
    finally:
        for _, proc in replicas:
            stop_server(proc, grace_s=10)
