"""Where the time goes when one replica's engine dies, and how long until it answers again.

One `lorafleet serve` (fused topology: one replica; the embedded base and the demo adapters) per
variant. Once it answers, its vLLM EngineCore process is SIGKILLed and a client asks every
0.25 s until it answers again. The phases of the way back come from the processes (psutil: when
each new process shows up under its title) and vLLM's own log lines (one-second timestamps):

    detect + new replica   the kill -> a new replica actor's process (none when the engine
                           restarts in place)
    to the engine core     -> vLLM logs "Initializing a V1 LLM engine": a new replica's imports,
                           app and engine arguments, then the spawned EngineCore's own imports
    model runner start     -> "Starting to load model" (the CPU worker, a process of its own)
    weights                -> "Loading weights took"
    warm-up                -> "init engine (profile, create kv cache, warmup model)"
    to the first answer    -> the client's first 200

Variants, in one run (order reversed on every other repeat): the replica ends and Ray Serve starts
a new one, or a new engine starts in the same replica (serve/deployment.py EngineWatch, the
fused topology's default); the engine core's CPU worker is spawned (a fresh interpreter: what
vLLM does inside a Ray actor) or forked with vLLM already imported (serve/worker_start.py,
vLLM's default outside Ray). The first variant is lorafleet before both changes.

    python bench/recovery.py [--repeats 1]
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import bars, save, table  # noqa: E402
from bench.serve import BASE_NAME, fresh_workdir, lorafleet_cmd, session_processes, start, stop  # noqa: E402
from lorafleet.net import free_port, wait_until_serving  # noqa: E402

KEY = "sk-recovery"
VARIANTS = {  # what changes how the engine comes back (serve/worker_start.py, serve/deployment.py EngineWatch)
    "new replica, spawned worker": {"LORAFLEET_ENGINE_RESTART": "replica", "LORAFLEET_ENGINE_WORKER_START": "spawn"},
    "new replica, forked worker": {"LORAFLEET_ENGINE_RESTART": "replica", "LORAFLEET_ENGINE_WORKER_START": "fork"},
    "new engine in place, forked worker": {"LORAFLEET_ENGINE_RESTART": "in_place",
                                           "LORAFLEET_ENGINE_WORKER_START": "fork"},
}
BEFORE, AFTER = "new replica, spawned worker", "new engine in place, forked worker"
PHASES = ["detect + new replica", "to the engine core", "model runner start", "weights", "warm-up",
          "to the first answer"]
LOG_EVENTS = {"engine_init": "Initializing a V1 LLM engine", "load_start": "Starting to load model",
              "weights": "Loading weights took", "warmup": "init engine (profile, create kv cache, warmup model)"}
STAMP = re.compile(r"INFO (\d\d-\d\d \d\d:\d\d:\d\d) ")


class ProcessWatch(threading.Thread):
    """First time each new process of the server's session shows up with a title containing a key."""

    def __init__(self, proc, keys: list[str], known: set[int]):
        super().__init__(daemon=True)
        self.proc, self.keys, self.known = proc, keys, set(known)
        self.seen: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and len(self.seen) < len(self.keys):
            for p in session_processes(self.proc):
                if p.pid in self.known:
                    continue
                try:
                    title = " ".join(p.cmdline()) or p.name()
                except psutil.Error:
                    continue
                for k in self.keys:
                    if k in title and k not in self.seen:
                        self.seen[k] = time.time()
                        self.known.add(p.pid)
            time.sleep(0.1)


def log_times(log: Path, after: float) -> dict[str, float]:
    """The first time (epoch s) after `after` each of LOG_EVENTS appears in the server log."""
    year = datetime.now().year
    out: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = STAMP.search(line)
        if not m:
            continue
        t = datetime.strptime(f"{year}-{m.group(1)}", "%Y-%m-%d %H:%M:%S").timestamp()
        if t < int(after):
            continue
        for key, text in LOG_EVENTS.items():
            if key not in out and text in line:
                out[key] = t
    return out


def ask(url: str) -> int:
    try:
        return httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                          json={"model": "support", "max_tokens": 4, "temperature": 0,
                                "messages": [{"role": "user", "content": "Hi"}]}).status_code
    except httpx.HTTPError:
        return -1


def one(variant: str, work: Path, adapters: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / f"server-{variant}-{int(time.time())}.log"
    proc = start(lorafleet_cmd(port, adapters), log, {"LORAFLEET_API_KEY": KEY, **VARIANTS[variant]})
    try:
        startup = wait_until_serving(url, proc, log, timeout=600)
        assert ask(url) == 200
        victims = [p for p in session_processes(proc) if "EngineCore" in (" ".join(p.cmdline()) or p.name())]
        watch = ProcessWatch(proc, ["ServeReplica"], {p.pid for p in session_processes(proc)})
        watch.start()
        t_kill = time.time()
        for v in victims:
            v.send_signal(signal.SIGKILL)
        time.sleep(0.5)
        while ask(url) != 200:
            if time.time() - t_kill > 300:
                raise TimeoutError(f"{variant}: no answer 300 s after the kill; see {log}")
            time.sleep(0.25)
        t_ok = time.time()
        watch.done.set()
        events = log_times(log, t_kill)
    finally:
        stop(proc)
    marks = [t_kill, watch.seen.get("ServeReplica"), events.get("engine_init"),
             events.get("load_start"), events.get("weights"), events.get("warmup"), t_ok]
    phases = {}
    last = t_kill
    for name, t in zip(PHASES, marks[1:]):
        phases[name] = round(t - last, 1) if t is not None else None
        last = t if t is not None else last
    return {"variant": variant, "startup_s": round(startup, 1), "recovery_s": round(t_ok - t_kill, 1),
            "phases": phases}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1, help="variant pairs, alternating order")
    a = ap.parse_args()
    work, _ = fresh_workdir("recovery")
    order = []
    for i in range(a.repeats):
        order += list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1]
    runs = []
    for v in order:
        r = one(v, work, work / "adapters")
        print(f"{v}: back in {r['recovery_s']} s after the kill; {r['phases']}")
        runs.append(r)
    rows = []
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        row = {"variant": v, "runs": len(rs), "recovery s": statistics.median(r["recovery_s"] for r in rs),
               "startup s": statistics.median(r["startup_s"] for r in rs)}
        for ph in PHASES:
            vals = [r["phases"][ph] for r in rs if r["phases"][ph] is not None]
            row[ph] = statistics.median(vals) if vals else None
        rows.append(row)
    by = {r["variant"]: r for r in rows}
    ratio = round(by[AFTER]["recovery s"] / by[BEFORE]["recovery s"], 3)
    md = table(rows, ["variant", "runs", "recovery s", "startup s", *PHASES],
               f"one replica, engine SIGKILLed: seconds until it answers again ({AFTER} / {BEFORE}: {ratio})")
    save("recovery", {"runs": runs, "rows": rows, "ratio_after_over_before": ratio, "markdown": md, "base": BASE_NAME})
    bars("recovery", [v.replace(", ", ",\n") for v in VARIANTS], {"recovery s": [r["recovery s"] for r in rows]},
         "engine killed: seconds until the replica answers again", {"recovery s": "seconds"})


if __name__ == "__main__":
    main()
