"""Adapter-affinity routing across hosts, and a node dying, on a real three-host Ray cluster.

    sudo .venv/bin/python bench/cluster.py [--rounds 2] [--requests 120]

Hosts are network namespaces (bench/netns_cluster.py): a head (the ingress) and two workers (an
engine replica each, `max_resident_adapters` 2, so the cluster holds 4 of the 6 adapters asked
for). One run, one cluster, `lorafleet serve --set address=...` restarted for each window:
- affinity (Ray Serve model multiplexing: an adapter's requests go to a replica that holds it)
  and random (the router ignores the adapter), in alternating windows, the same seeded request
  sequence each time: adapter loads per 100 requests and generated tokens/s;
- a node kill: 16 clients, one worker host SIGKILLed, failed requests and the time until every
  adapter answers from the survivor.
Writes bench/results/cluster.json and cluster.png.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench.common import ROOT, bars, save, table  # noqa: E402
from bench.netns_cluster import NetnsCluster, available  # noqa: E402
from lorafleet.net import stop_server, wait_for, wait_until_serving  # noqa: E402

ADAPTERS = [f"domain{i}" for i in range(6)]
PORT = 8000
MSGS = [{"role": "user", "content": "Summarise the notice period rules for a Kestrel K9 contract."}]


def serve(c: NetnsCluster, base: Path, adapters: Path, routing: str, log: Path):
    env = c.env(PYTHONPATH=str(ROOT), LORAFLEET_CACHE=str(log.parent / "cache"))
    argv = [sys.executable, "-m", "serve", "--model", str(base), "--served-model-name", "tiny",
            "--adapters", str(adapters), "--host", c.head.ip, "--port", str(PORT),
            *c.serve_args(), "--set", f"adapter_routing={routing}",
            "--set", "autoscaling.min_replicas=2", "--set", "autoscaling.max_replicas=2",
            "--set", "max_resident_adapters=2", "--set", "engine.max_loras=2", "--set", "engine.dtype=float32",
            "--set", "engine.max_model_len=256", "--set", "engine.cpu_kvcache_space_gb=0.5",
            "--set", "engine.max_lora_rank=16"]
    proc = c.head.popen(argv, env, log)
    wait_until_serving(f"http://{c.head.ip}:{PORT}", proc, log, timeout=900)
    return proc


def loads_total(url: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^lorafleet_adapter_loads_total\{[^}]*\} ([0-9.e+]+)$", text, re.M))


def window(url: str, sequence: list[str], clients: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

    def one(model: str) -> int:
        r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=16, temperature=0,
                                           extra_body={"ignore_eos": True}, timeout=300)
        return r.usage.completion_tokens

    before, t0 = loads_total(url), time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, sequence))
    wall = time.perf_counter() - t0
    loads = loads_total(url) - before
    return {"requests": len(sequence), "loads": loads, "loads_per_100": 100 * loads / len(sequence),
            "tokens_per_s": tokens / wall, "wall_s": wall}


def node_kill(c: NetnsCluster, url: str) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

    def ask(model: str) -> bool:
        try:
            client.chat.completions.create(model=model, messages=MSGS, max_tokens=16, temperature=0, timeout=300)
            return True
        except openai.APIError:
            return False

    t_kill = None
    with cf.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask, ADAPTERS[i % 4]) for i in range(64)]
        time.sleep(1.0)
        t_kill = time.monotonic()
        c.kill(c.hosts[2])
        ok = [f.result() for f in futures]
    wait_for(lambda: all(ask(m) for m in ADAPTERS[:4]), 600, "every adapter answered by the survivor", poll=0.2)
    return {"requests": len(ok), "failed": ok.count(False), "all_adapters_answering_s": time.monotonic() - t_kill}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--work", default="/tmp/lorafleet-bench-cluster")
    args = ap.parse_args()
    why = available()
    if why:
        sys.exit(f"bench/cluster.py needs network namespaces: {why}")
    import shutil

    from fixtures import build_tiny_llama, make_random_adapter

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    base = build_tiny_llama(work / "base", ROOT, hidden=256)
    for i, name in enumerate(ADAPTERS):
        make_random_adapter(base, work / "adapters" / name, seed=i + 1, r=16,
                            targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    rng = random.Random(0)
    # Skewed like real traffic (a few busy domains, a long tail), the same sequence every window.
    sequence = rng.choices(ADAPTERS, weights=[8, 6, 4, 2, 1, 1], k=args.requests)
    results: dict[str, list[dict]] = {"affinity": [], "random": []}
    with NetnsCluster(work / "cluster", workers=2) as c:
        url = f"http://{c.head.ip}:{PORT}"
        for rnd in range(args.rounds):
            for routing in (("affinity", "random") if rnd % 2 == 0 else ("random", "affinity")):
                proc = serve(c, base, work / "adapters", routing, work / f"serve-{routing}-{rnd}.log")
                try:
                    window(url, ADAPTERS[:2], 2)  # warm-up: compile paths, not counted
                    results[routing].append(window(url, sequence, args.clients))
                finally:
                    stop_server(proc, grace_s=60)
                print(routing, rnd, results[routing][-1], flush=True)
        proc = serve(c, base, work / "adapters", "affinity", work / "serve-kill.log")
        try:
            kill = node_kill(c, url)
        finally:
            stop_server(proc, grace_s=30)
    rows = []
    for routing, ws in results.items():
        rows.append({"routing": routing, "windows": len(ws),
                     "loads / 100 requests": statistics.median(w["loads_per_100"] for w in ws),
                     "tokens/s": statistics.median(w["tokens_per_s"] for w in ws)})
    ratio = rows[0]["tokens/s"] / rows[1]["tokens/s"]
    md = table(rows, ["routing", "windows", "loads / 100 requests", "tokens/s"],
               f"3 hosts, 2 engine replicas x 2 resident adapters, 6 adapters, {args.requests} requests, "
               f"{args.clients} clients (medians)")
    print(f"affinity / random tokens/s: {ratio:.2f}x; node kill: {kill['failed']}/{kill['requests']} failed, "
          f"every adapter answering {kill['all_adapters_answering_s']:.1f}s after the kill")
    save("cluster", {"windows": results, "summary": rows, "affinity_over_random_tokens_per_s": ratio,
                     "node_kill": kill, "table": md, "requests": args.requests, "clients": args.clients})
    bars("cluster", [r["routing"] for r in rows],
         {"adapter loads / 100 requests": [r["loads / 100 requests"] for r in rows],
          "tokens/s": [r["tokens/s"] for r in rows]},
         "adapter-affinity vs random routing, 3 hosts", {"tokens/s": "generated tokens/s"})


if __name__ == "__main__":
    main()
