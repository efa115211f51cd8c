"""`lorafleet serve` on a Ray cluster of three hosts (network namespaces, tests/netns_cluster.py):
the ingress on the head, one engine replica on each worker host, adapters from one directory
every host reads, token auth on every node. Minutes of Ray and vLLM start-up: `make test-slow`."""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from bench.netns_cluster import NetnsCluster, available
from lorafleet.net import stop_server, wait_for
from servers import ENGINE_FLAGS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
ROOT = Path(__file__).resolve().parents[1]
MSGS = [{"role": "user", "content": "What is the warranty of the Kestrel K9?"}]
PORT = 8000


def _replicas_on(host) -> list[str]:
    names = []
    for pid in host.pids():
        try:
            names.append(psutil.Process(pid).name())
        except psutil.NoSuchProcess:
            pass
    return sorted(n for n in names if n.startswith("ray::ServeReplica"))


def _ask(client: openai.OpenAI, model: str) -> str:
    try:
        r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=4, temperature=0, timeout=120)
        return "ok" if r.usage.completion_tokens == 4 else "short"
    except openai.APIStatusError as e:
        return f"http {e.status_code}"
    except openai.APIConnectionError as e:
        return f"connection: {type(e).__name__}"


@pytest.fixture(scope="module")
def cluster(tiny_base, tmp_path_factory):
    why = available()
    if why:
        pytest.skip(why)
    from fixtures import make_random_adapter

    work = tmp_path_factory.mktemp("cluster")
    adapters = work / "adapters"  # one directory every host reads (the hosts share this filesystem)
    for i, name in enumerate(("alpha", "beta", "gamma")):
        make_random_adapter(tiny_base, adapters / name, seed=i + 1)
    fleet = work / "fleet.yaml"  # an alias over two versions, split 50/50
    fleet.write_text("aliases:\n  team:\n    versions: {a: adapters/alpha, b: adapters/beta}\n"
                     "    traffic: {a: 50, b: 50}\n")
    with NetnsCluster(work, workers=2) as c:
        c.fleet_file = fleet
        env = c.env(LORAFLEET_API_KEY="sk-user", LORAFLEET_ADMIN_KEY="sk-admin", PYTHONPATH=str(ROOT),
                    LORAFLEET_CACHE=str(work / "cache"))
        argv = [sys.executable, "-m", "serve", "--model", str(tiny_base), "--served-model-name", "tiny",
                "--adapters", str(adapters), "--host", c.head.ip, "--port", str(PORT),
                *c.serve_args(), *(w for s in c.fleet_sets(fleet) for w in ("--set", s)),
                "--set", "autoscaling.min_replicas=2", "--set", "autoscaling.max_replicas=2", *ENGINE_FLAGS]
        proc = c.head.popen(argv, env, work / "serve.log")
        url = f"http://{c.head.ip}:{PORT}"
        try:
            wait_for(lambda: _ready(url) or proc.poll() is not None, 900, "the server ready")
            assert proc.poll() is None, (work / "serve.log").read_text()[-3000:]
            yield c, url, proc
        finally:
            stop_server(proc, grace_s=60)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_client_without_the_cluster_token_is_refused(cluster):
    c, _, _ = cluster
    env = {k: v for k, v in c.env().items() if not k.startswith("RAY_AUTH")}
    r = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{c.address}')"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "token" in (r.stdout + r.stderr).lower()


def test_serves_across_hosts_ingress_on_the_head_engines_on_the_workers(cluster):
    c, url, _ = cluster
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-user", max_retries=0)
    assert {m.id for m in client.models.list().data} == {"tiny", "alpha", "beta", "gamma", "team", "team@a", "team@b"}
    for model in ("tiny", "alpha", "beta", "gamma", "alpha"):
        assert _ask(client, model) == "ok", model
    assert _replicas_on(c.head) == ["ray::ServeReplica:lorafleet:Ingress"]
    for worker in c.hosts[1:]:
        assert _replicas_on(worker) == ["ray::ServeReplica:lorafleet:LLMServer"], worker.name


def test_engines_on_two_hosts_answer_the_fleet_files_split(cluster):
    """`model: team` goes to the version the fleet file gives each user, whichever worker's engine
    answers; a promotion edited into the file reaches the server and moves every user."""
    from lorafleet.fleet import promote, read_fleet

    c, url, _ = cluster
    user_key, admin = {"Authorization": "Bearer sk-user"}, {"Authorization": "Bearer sk-admin"}

    def ask(model, user=None):
        body = {"model": model, "prompt": "hello there", "max_tokens": 6, "temperature": 0,
                **({"user": user} if user else {})}
        r = httpx.post(url + "/v1/completions", json=body, headers=user_key, timeout=120)
        assert r.status_code == 200, r.text
        return r.headers["x-lorafleet-version"], r.json()["choices"][0]["text"]

    alias = read_fleet(c.fleet_file).aliases["team"]
    pinned = {v: ask(f"team@{v}")[1] for v in ("a", "b")}
    users = [f"u{i}" for i in range(16)]
    with cf.ThreadPoolExecutor(8) as pool:  # concurrent: both engine replicas take requests
        got = dict(zip(users, pool.map(lambda u: ask("team", u), users)))
    assert {v for v, _ in got.values()} == {"team@a", "team@b"}
    for user, (version, text) in got.items():
        assert version == f"team@{alias.pick('user:' + user)}" and text == pinned[version.split("@")[1]]
    promote(c.fleet_file, "team", "b")
    wait_for(lambda: httpx.get(url + "/v1/fleet", headers=admin, timeout=10).json()["aliases"]["team"]["traffic"]
             == {"b": 100}, 60, "the promotion applied")
    assert {ask("team", u)[0] for u in users} == {"team@b"}


def _stream(client: openai.OpenAI, model: str) -> str:
    """'ok' (ended with [DONE]), 'error event' (the server ended it with an error chunk), or what failed."""
    try:
        chunks = list(client.chat.completions.create(model=model, messages=MSGS, max_tokens=24, temperature=0,
                                                     stream=True, timeout=120))
        return "ok" if chunks and chunks[-1].choices[0].finish_reason else "cut short"
    except openai.APIError as e:  # an error event in the stream, or a status before it began
        return "error event" if not isinstance(e, openai.APIStatusError) else f"http {e.status_code}"


def _load(client: openai.OpenAI, during) -> dict[str, list[str]]:
    """16 clients, 48 requests (a third streamed) over the three adapters; `during()` after 0.5 s."""
    with cf.ThreadPoolExecutor(16) as pool:
        futures = [(i % 3 == 0, pool.submit(_stream if i % 3 == 0 else _ask, client, ("alpha", "beta", "gamma")[i % 3]))
                   for i in range(48)]
        time.sleep(0.5)
        during()
        out = {"streamed": [], "plain": []}
        for streamed, f in futures:
            out["streamed" if streamed else "plain"].append(f.result(timeout=300))  # a hung request fails here
    return out


def _recovered(client: openai.OpenAI) -> float:
    t0 = time.monotonic()
    wait_for(lambda: all(_ask(client, m) == "ok" for m in ("alpha", "beta", "gamma")), 600,
             "every adapter answered")
    return time.monotonic() - t0


def test_one_replica_killed_loses_no_plain_request(cluster):
    """SIGKILL one engine replica's process (two replicas) under load: requests it had not
    answered go to the other replica (the ingress sends them again, once)."""
    c, url, _ = cluster
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-user", max_retries=0)
    host = c.hosts[1]

    def kill_replica():
        for pid in host.pids():
            try:
                if psutil.Process(pid).name() == "ray::ServeReplica:lorafleet:LLMServer":
                    psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass

    out = _load(client, kill_replica)
    took = _recovered(client)
    print(f"replica kill: plain failed {sum(o != 'ok' for o in out['plain'])}/{len(out['plain'])}, streamed "
          f"{sorted(set(out['streamed']))}; all adapters answering {took:.1f}s after the load")
    assert all(o == "ok" for o in out["plain"]), out["plain"]
    assert set(out["streamed"]) <= {"ok", "error event"}, out["streamed"]
    wait_for(lambda: _replicas_on(host) == ["ray::ServeReplica:lorafleet:LLMServer"], 600, "a new replica on the host")


def test_a_worker_host_dies_and_the_survivor_serves(cluster):
    """SIGKILL every process of one worker host under 16 clients: no request hangs, plain requests
    not answered are sent again to the survivor, streams that had begun end with an error event,
    /v1/models stays, every adapter answers from the surviving host."""
    c, url, _ = cluster
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-user", max_retries=0)
    models = {m.id for m in client.models.list().data}
    killed = []
    out = _load(client, lambda: killed.append(c.kill(c.hosts[2])))
    took = _recovered(client)
    print(f"node kill: plain failed {sum(o != 'ok' for o in out['plain'])}/{len(out['plain'])}, streamed "
          f"{sorted(set(out['streamed']))}; all adapters answering {took:.1f}s after the load")
    assert killed[0] > 0
    assert all(o == "ok" for o in out["plain"]), out["plain"]
    assert set(out["streamed"]) <= {"ok", "error event"}, out["streamed"]
    assert {m.id for m in client.models.list().data} == models


def test_a_local_server_beside_a_running_cluster_starts_its_own_ray(cluster, tiny_base, tmp_path):
    """Unset `address` means a Ray of its own: ray.init alone would attach to the cluster's
    gcs_server it finds among this machine's processes (and fail on its token)."""
    from servers import lorafleet_serve

    with lorafleet_serve(["--model", str(tiny_base), "--served-model-name", "solo"], tmp_path, ROOT) as (url, _, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["solo"]
        assert _ask(client, "solo") == "ok"
