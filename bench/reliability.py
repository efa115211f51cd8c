"""`make reliability`: the real stack under load, adapter churn and an engine crash.

1. load + churn: `--clients` concurrent clients for `--seconds`, requests mixed over the base
   model and two adapters, while a churn task loads and unloads a third adapter through the
   admin API. Pass: zero 5xx, every response complete and well-formed, server RSS steady.
2. fault: under the same load, SIGKILL the vLLM engine process of the replica. Pass: in-flight
   requests end with an error (none hangs past its timeout), the replica is replaced, and the
   service answers again; the recovery time is reported.

Everything runs on 127.0.0.1 and stops by itself. Prints a summary table, writes
bench/results/reliability.json, exits 1 if a check fails.

    python bench/reliability.py [--clients 16] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import save, table  # noqa: E402
from bench.serve import BASE_NAME, fresh_workdir, lorafleet_cmd, start, stop  # noqa: E402
from lorafleet.net import free_port, wait_until_serving  # noqa: E402

ADMIN = "sk-admin-reliability"
KEY = "sk-user-reliability"


def tree_rss_mb(pid: int) -> float:
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


async def one(c, url: str, model: str, stream: bool, timeout: float) -> tuple[int, bool]:
    """(status, complete and well-formed)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me about the K9 drone."}],
            "max_tokens": 16, "temperature": 0, "stream": stream}
    h = {"Authorization": f"Bearer {KEY}"}
    if not stream:
        r = await c.post(f"{url}/v1/chat/completions", json=body, headers=h, timeout=timeout)
        if r.status_code != 200:
            return r.status_code, False
        j = r.json()
        ok = j["object"] == "chat.completion" and j["choices"][0]["finish_reason"] in ("stop", "length") and \
            j["usage"]["completion_tokens"] > 0
        return 200, ok
    async with c.stream("POST", f"{url}/v1/chat/completions", json=body, headers=h, timeout=timeout) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, False
        done, finish, error = False, None, False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                ev = json.loads(line[6:])
                if "error" in ev:
                    error = True
                elif ev.get("choices") and ev["choices"][0].get("finish_reason"):
                    finish = ev["choices"][0]["finish_reason"]
        return (500 if error else 200), done and finish is not None and not error


async def drive(url: str, clients: int, seconds: float, models: list[str], stats: dict, stop_evt: asyncio.Event,
                timeout: float = 120) -> None:
    import httpx

    async def client(i: int):
        async with httpx.AsyncClient() as c:
            k = 0
            while not stop_evt.is_set():
                model = models[(i + k) % len(models)]
                k += 1
                t0 = time.perf_counter()
                try:
                    status, ok = await one(c, url, model, stream=(k % 2 == 0), timeout=timeout)
                except httpx.TimeoutException:
                    status, ok = -1, False  # a hang: the worst outcome
                except httpx.HTTPError:
                    status, ok = -2, False
                stats["latencies"].append(time.perf_counter() - t0)
                stats["status"][status] = stats["status"].get(status, 0) + 1
                stats["events"].append((time.time(), status))
                if status == 200 and not ok:
                    stats["malformed"] += 1
                if status == 200:
                    stats["last_ok"] = time.time()

    async def stopper():
        await asyncio.sleep(seconds)
        stop_evt.set()

    await asyncio.gather(stopper(), *[client(i) for i in range(clients)])


async def churn(url: str, path: Path, stop_evt: asyncio.Event, stats: dict) -> None:
    import httpx

    h = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(timeout=60) as c:
        while not stop_evt.is_set():
            r = await c.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "churn", "lora_path": str(path)},
                             headers=h)
            stats["churn"].append(r.status_code)
            await asyncio.sleep(1.0)
            r = await c.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "churn"}, headers=h)
            stats["churn"].append(r.status_code)
            await asyncio.sleep(1.0)


def p99(xs):
    xs = sorted(xs)
    return xs[int(0.99 * (len(xs) - 1))] if xs else None


def new_stats():
    return {"status": {}, "latencies": [], "malformed": 0, "churn": [], "last_ok": 0.0, "events": []}


def recovery_seconds(events: list[tuple[float, int]], t_kill: float) -> float | None:
    """From the kill to the first success after the first failure that followed it."""
    after = sorted(e for e in events if e[0] >= t_kill)
    first_fail = next((t for t, st in after if st != 200), None)
    if first_fail is None:
        return 0.0  # nothing failed
    return next((t - t_kill for t, st in after if t > first_fail and st == 200), None)


def fault_timeline(events: list[tuple[float, int]], t_kill: float, recovery: float | None) -> str:
    """When, in seconds after the kill, clients got error responses and refused connections."""
    end = t_kill + (recovery if recovery is not None else float("inf"))
    spans: dict[str, tuple[float, float]] = {}
    for t, st in events:
        if t_kill <= t <= end and st != 200:
            kind = "5xx" if st >= 500 else "refused" if st == -2 else "hung" if st == -1 else str(st)
            a, b = spans.get(kind, (t, t))
            spans[kind] = (min(a, t), max(b, t))
    return ", ".join(f"{k} at {a - t_kill:.1f}-{b - t_kill:.1f} s" for k, (a, b) in sorted(spans.items(),
                                                                                    key=lambda kv: kv[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--fault-seconds", type=float, default=150)
    args = ap.parse_args()
    work, adapters = fresh_workdir("reliability")
    churn_src = work / "adapters" / "_churn"
    shutil.copytree(adapters["support"], churn_src)  # inside the root: loadable through the admin API
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"LORAFLEET_API_KEY": KEY, "LORAFLEET_ADMIN_KEY": ADMIN}
    proc = start(lorafleet_cmd(port, work / "adapters"), work / "server.log", env)
    models = [BASE_NAME, "support", "legal"]
    rows, failures = [], []
    try:
        wait_until_serving(url, proc, work / "server.log")
        # 1. load + churn
        s1 = new_stats()
        rss_before = tree_rss_mb(proc.pid)

        async def phase1():
            evt = asyncio.Event()
            await asyncio.gather(drive(url, args.clients, args.seconds, models, s1, evt), churn(url, churn_src, evt, s1))
        asyncio.run(phase1())
        rss_after = tree_rss_mb(proc.pid)
        n = sum(s1["status"].values())
        fivexx = sum(v for k, v in s1["status"].items() if k >= 500 or k < 0)
        rows.append({"run": "load + adapter churn", "requests": n, "failures": fivexx + s1["malformed"],
                     "p99 s": p99(s1["latencies"]), "recovery s": None,
                     "note": f"RSS {rss_before:.0f}→{rss_after:.0f} MB, churn ok "
                             f"{sum(1 for c in s1['churn'] if c == 200)}/{len(s1['churn'])}"})
        if fivexx or s1["malformed"]:
            failures.append(f"load: {fivexx} 5xx/hangs, {s1['malformed']} malformed ({s1['status']})")
        if rss_after > rss_before * 1.5 + 200:
            failures.append(f"load: server RSS grew from {rss_before:.0f} to {rss_after:.0f} MB")
        # 2. kill the engine mid-load
        s2 = new_stats()

        async def phase2():
            evt = asyncio.Event()
            task = asyncio.create_task(drive(url, args.clients // 2, args.fault_seconds, models, s2, evt, timeout=90))
            await asyncio.sleep(8)
            victims = [p for p in psutil.process_iter(["name", "cmdline"])
                       if "EngineCore" in " ".join(p.info["cmdline"] or []) or "EngineCore" in (p.info["name"] or "")]
            t_kill = time.time()
            for v in victims:
                v.send_signal(signal.SIGKILL)
            s2["killed"] = len(victims)
            s2["t_kill"] = t_kill
            s2["last_ok"] = 0.0
            await task
        asyncio.run(phase2())
        recovery = recovery_seconds(s2["events"], s2["t_kill"])
        hangs = s2["status"].get(-1, 0)
        rows.append({"run": "engine killed mid-load", "requests": sum(s2["status"].values()),
                     "failures": sum(v for k, v in s2["status"].items() if k != 200), "p99 s": p99(s2["latencies"]),
                     "recovery s": recovery,
                     "note": f"killed {s2['killed']} engine process(es); statuses {s2['status']}; "
                             f"{fault_timeline(s2['events'], s2['t_kill'], recovery)}"})
        if hangs:
            failures.append(f"fault: {hangs} requests hung past their timeout")
        if recovery is None:
            failures.append("fault: the service did not answer again after the engine was killed")
        if not s2["killed"]:
            failures.append("fault: no engine process found to kill")
    finally:
        stop(proc)
    md = table(rows, ["run", "requests", "failures", "p99 s", "recovery s", "note"], "reliability")
    save("reliability", {"rows": rows, "failures": failures, "markdown": md,
                         "settings": {"clients": args.clients, "seconds": args.seconds}})
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
