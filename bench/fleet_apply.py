"""How long a fleet file edit takes to reach every replica, and whether requests notice.

Two edge servers (two replicas; the front is the same code as the vLLM server's) follow one fleet
file with the default `fleet_poll_s`. `lorafleet fleet promote`/`rollback` edit it in turns
while a client keeps asking the alias; the time from the edit to each replica's /v1/fleet
showing the new traffic is measured, and every answer's status is counted. On Kubernetes the
kubelet's ConfigMap refresh (about a minute by default) comes before this.

    python bench/fleet_apply.py [--edits 6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, save, table  # noqa: E402
from bench.edge import WORK, demo_adapters, onnx_export  # noqa: E402
from lorafleet.net import free_port, stop_server, wait_until_serving  # noqa: E402


def main() -> None:
    import httpx

    from lorafleet.fleet import promote, rollback

    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=6)
    a = ap.parse_args()
    export = onnx_export("fp32", demo_adapters())
    fleet_dir = WORK / "fleet"
    shutil.rmtree(fleet_dir, ignore_errors=True)
    for v in ("v1", "v2"):  # two versions of one adapter: here the same converted adapter twice
        shutil.copytree(export / "adapters" / "support", fleet_dir / "support" / v)
    f = fleet_dir / "fleet.yaml"
    f.write_text("aliases:\n  support:\n    versions: {v1: support/v1, v2: support/v2}\n    traffic: {v1: 100}\n")
    env = {**os.environ, "LORAFLEET_API_KEY": "", "LORAFLEET_ADMIN_KEY": "sk-admin"}
    servers = []
    for _ in range(2):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "serve.edge", "--set", f"model={export}", "--set",
                                 f"port={port}", "--set", f"fleet_file={f}"], cwd=ROOT, env=env,
                                stdout=(WORK / f"fleet-{port}.log").open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        servers.append((f"http://127.0.0.1:{port}", proc))
    statuses: dict[int, int] = {}
    stop = threading.Event()

    def ask():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                for url, _ in servers:
                    r = c.post(url + "/v1/completions", json={"model": "support", "prompt": "Hi", "max_tokens": 4,
                                                              "user": f"u{time.monotonic_ns() % 1000}"})
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    rows = []
    try:
        for url, proc in servers:
            wait_until_serving(url, proc, timeout=120)
        threading.Thread(target=ask, daemon=True).start()
        admin = {"Authorization": "Bearer sk-admin"}
        for i in range(a.edits):
            change, want = ((lambda: promote(f, "support", "v2"), {"v2": 100}) if i % 2 == 0
                            else (lambda: rollback(f, "support"), {"v1": 100}))
            t0 = time.monotonic()
            change()
            for n, (url, _) in enumerate(servers):
                while httpx.get(url + "/v1/fleet", headers=admin).json()["aliases"]["support"]["traffic"] != want:
                    time.sleep(0.02)
                rows.append({"edit": i + 1, "replica": n + 1, "applied_after_s": round(time.monotonic() - t0, 2)})
            time.sleep(0.5)
    finally:
        stop.set()
        for _, proc in servers:
            stop_server(proc, grace_s=10)
    last = max(r["applied_after_s"] for r in rows)
    summary = {"replicas": 2, "fleet_poll_s": 2.0, "edits": a.edits, "requests": sum(statuses.values()),
               "statuses": statuses, "median_applied_after_s": statistics.median(r["applied_after_s"] for r in rows),
               "max_applied_after_s": last}
    md = table([summary], list(summary), "fleet file edit to every replica (two edge servers)")
    save("fleet_apply", {"command": "python bench/fleet_apply.py", "rows": rows, "summary": summary, "markdown": md})


if __name__ == "__main__":
    main()
