"""Serving throughput under load: lorafleet vs vLLM's own OpenAI server vs transformers+peft.

One load generator (asyncio, N concurrent clients for each N in `--concurrency`, a fixed list
of requests alternating between two adapters, greedy, exactly `--max-tokens` each via vLLM's
`ignore_eos` so that every server does the same work, streamed to measure time to first
token) runs the same requests against:
  (a) lorafleet serve (Ray Serve + vLLM), the adapters from a directory
  (b) vLLM's OpenAI server with the same adapters (--lora-modules) and the same engine settings
  (c) bench/peft_server.py: transformers + peft, adapter switched per request, one at a time
Every server gets the same prompt text (/v1/completions, each prompt rendered with its
adapter's template), so all do the same work. Then, on lorafleet: the same load on the base
model alone (the LoRA overhead), and cold-adapter time to first token with 100 registered
adapters and 8 resident.

Both vLLM-based servers get the same engine settings (dtype, context, KV cache, max_loras, cores
reserved from the model's threads, the libraries lorafleet preloads: Intel OpenMP, tcmalloc where
installed, as vLLM's CPU guide asks) and the same LoRA kernel (lorafleet's vLLM plugin is loaded by
every vLLM process of this environment; bench/lora_kernel.py compares it with vLLM's stock ops).

This machine's speed drifts by 10-20% over minutes, more than the differences measured, so
lorafleet and vLLM's server are both started once and take turns, window by window: the one not
being measured is frozen (SIGSTOP on every process of its session, Ray's and vLLM's; it takes no
CPU), thawed 3 s before its next window. Each client count gets `--rounds` windows per server,
in alternating order; every figure is the median over its windows, and the ratios are medians of
the ratios of neighbouring windows (each pair is in the JSON).

With `--model-cores 0`, both vLLM servers run the model on CPU 0 alone (VLLM_CPU_OMP_THREADS_BIND)
and every other thread of theirs (Ray's processes, the API servers, vLLM's engine loop) and the load
generator on the other CPUs: what is left of the gap when serving does not share the model's cores,
as on a GPU node. It needs several CPUs left over: vLLM's engine loop keeps one busy while requests
run, and on a 2-CPU machine the one left is not enough for Ray's processes too (lorafleet's time to
first token at 4 clients: 7 s vs vLLM's server 1 s).

    python bench/serve.py [--concurrency 1,4,16] [--requests-per-client 4] [--rounds 3] [--max-tokens 64]
                          [--model-cores 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, RESULTS, save, table  # noqa: E402
from lorafleet.net import free_port, stop_server, wait_until_serving  # noqa: E402

BASE_NAME = "smollm2"
ENGINE = {"dtype": "auto", "max_model_len": 1024, "max_num_seqs": 32, "kv_gb": 1.0}


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                            env=dict(os.environ, RAY_worker_niceness="0", **same_cpu_cores(), **(env or {})))


def same_cpu_cores() -> dict[str, str]:
    """Both vLLM servers get the cores lorafleet's engine would use on this machine."""
    from serve.engine import cpu_reserved_cores

    reserved = os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", cpu_reserved_cores(None))
    return {} if reserved is None else {"VLLM_CPU_NUM_OF_RESERVED_CPU": str(reserved)}


def stop(proc: subprocess.Popen) -> None:
    left = session_processes(proc)
    stop_server(proc, grace_s=60)
    for p in left:  # whatever of the server's session outlived it (none is expected): not the next run's problem
        with contextlib.suppress(Exception):
            p.kill()


def session_processes(proc: subprocess.Popen) -> list:
    """Every process of the server's session: for lorafleet, Ray's (GCS, raylet, workers) and vLLM's."""
    import psutil

    sid = proc.pid  # started with start_new_session: the server leads its session, even after it exits
    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(Exception):
            if os.getsid(p.pid) == sid:
                out.append(p)
    return out


def signal_session(proc: subprocess.Popen, sig: int) -> None:
    for p in session_processes(proc):
        with contextlib.suppress(Exception):
            p.send_signal(sig)


def freeze(proc: subprocess.Popen) -> None:
    signal_session(proc, signal.SIGSTOP)


def thaw(proc: subprocess.Popen) -> None:
    signal_session(proc, signal.SIGCONT)


ALL_CPUS = frozenset(os.sched_getaffinity(0))


def keep_off_model_cores(proc: subprocess.Popen, model_cores: set[int]) -> int:
    """Move every thread of the server's session that vLLM did not bind to the model's cores onto the
    other CPUs (threads inherit the mask, so later ones follow); returns the threads left on the model's."""
    rest = set(ALL_CPUS - model_cores)
    on_model = 0
    for p in session_processes(proc):
        with contextlib.suppress(Exception):
            for tid in (int(t) for t in os.listdir(f"/proc/{p.pid}/task")):
                with contextlib.suppress(OSError):
                    if os.sched_getaffinity(tid) <= model_cores:
                        on_model += 1  # bound there by vLLM: its model worker's threads
                    else:
                        os.sched_setaffinity(tid, rest)
    return on_model


@contextlib.contextmanager
def thawed(proc: subprocess.Popen, settle_s: float = 3.0):
    """Run a window on a frozen server: thaw it, let its timers catch up, freeze it again after."""
    thaw(proc)
    time.sleep(settle_s)
    try:
        yield
    finally:
        freeze(proc)


def requests_for(adapters: dict[str, Path], n: int) -> list[tuple[str, str]]:
    """(model, prompt text) pairs, alternating adapters, rendered with each adapter's template."""
    from transformers import AutoTokenizer

    from lorafleet.models import resolve_model
    from lorafleet.quality import questions
    from lorafleet.templates import render

    tok = AutoTokenizer.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"))
    per = {}
    for name, path in adapters.items():
        man = json.loads((path / "lorafleet.json").read_text())
        per[name] = [render(tok, man["template"]["text"], msgs, add_generation_prompt=True)
                     for msgs, _ in questions(ROOT / man["data"]["train_file"])]
    names = list(adapters)
    return [(names[i % len(names)], per[names[i % len(names)]][(i // len(names)) % len(per[names[i % len(names)]])])
            for i in range(n)]


async def load(url: str, reqs: list[tuple[str, str]], concurrency: int, max_tokens: int, stream: bool,
               model_override: str | None = None) -> dict:
    import httpx

    queue = list(reqs)
    ttfts, lats, toks, errors = [], [], [], 0
    error_kinds: dict[str, int] = {}

    async def client(c: httpx.AsyncClient):
        nonlocal errors
        while queue:
            model, prompt = queue.pop(0)
            body = {"model": model_override or model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "stream": stream, "ignore_eos": True}
            t0 = time.perf_counter()
            try:
                if stream:
                    first, n = None, 0
                    async with c.stream("POST", f"{url}/v1/completions", json={
                            **body, "stream_options": {"include_usage": True}}) as r:
                        r.raise_for_status()
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            ev = json.loads(line[6:])
                            if ev.get("choices") and ev["choices"][0].get("text") and first is None:
                                first = time.perf_counter() - t0
                            if ev.get("usage"):
                                n = ev["usage"]["completion_tokens"]
                    ttfts.append(first if first is not None else time.perf_counter() - t0)
                else:
                    r = await c.post(f"{url}/v1/completions", json=body)
                    r.raise_for_status()
                    n = r.json()["usage"]["completion_tokens"]
                    ttfts.append(time.perf_counter() - t0)
                lats.append(time.perf_counter() - t0)
                toks.append(n)
            except Exception as e:  # counted and reported; a benchmark keeps going
                errors += 1
                kind = f"{type(e).__name__}: {e}"[:160]
                error_kinds[kind] = error_kinds.get(kind, 0) + 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as c:
        await asyncio.gather(*[client(c) for _ in range(concurrency)])
    wall = time.perf_counter() - t0

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None

    return {"requests": len(lats), "errors": errors, "tokens": sum(toks), "wall_s": wall,
            "tokens_per_s": sum(toks) / wall, "ttft_p50_s": pct(ttfts, 0.5), "latency_p50_s": pct(lats, 0.5),
            "latency_p99_s": pct(lats, 0.99), "error_kinds": error_kinds}


def ensure_adapters() -> dict[str, Path]:
    out = {}
    for name in ("support", "legal"):
        ad = ROOT / "runs" / "adapters" / name
        if not (ad / "lorafleet.json").is_file():
            subprocess.run([sys.executable, "-m", "train", f"examples/cpu-{name}.yaml"], check=True, cwd=ROOT)
        out[name] = ad
    return out


def fresh_workdir(name: str) -> tuple[Path, dict[str, Path]]:
    """runs/NAME, emptied, with adapters/ linking the demo adapters (trained if missing): the
    adapter source a benchmark's server is given. Returns (the directory, name -> adapter)."""
    adapters = ensure_adapters()
    work = ROOT / "runs" / name
    shutil.rmtree(work, ignore_errors=True)
    (work / "adapters").mkdir(parents=True)
    for n, p in adapters.items():
        (work / "adapters" / n).symlink_to(p)
    return work, adapters


def lorafleet_cmd(port: int | str, adapter_dir: Path, resident: int = 8, max_loras: int = 2) -> list[str]:
    return [sys.executable, "-m", "serve", "--model", "embedded:smollm2-135m-instruct", "--served-model-name",
            BASE_NAME, "--adapters", str(adapter_dir), "--port", str(port),
            "--set", f"engine.dtype={ENGINE['dtype']}", "--set", f"engine.max_model_len={ENGINE['max_model_len']}",
            "--set", f"engine.max_num_seqs={ENGINE['max_num_seqs']}",
            "--set", f"engine.cpu_kvcache_space_gb={ENGINE['kv_gb']}", "--set", "engine.max_lora_rank=16",
            "--set", f"engine.max_loras={max_loras}", "--set", f"max_resident_adapters={resident}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--peft-requests-per-client", type=int, default=1,
                    help="the peft server answers one request at a time: fewer requests suffice")
    ap.add_argument("--min-requests", type=int, default=8,
                    help="at least this many requests per level: one client's 4 requests are too few to time")
    ap.add_argument("--rounds", type=int, default=3,
                    help="windows per server and client count, lorafleet and vLLM's server in turns; medians reported")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip", action="append", default=[], help="skip a target: lorafleet, vllm, peft, cold")
    ap.add_argument("--keep-previous", action="store_true",
                    help="add the last bench/results/serve.json's results for targets and client counts not "
                         "measured in this run (same settings): e.g. one more --concurrency level")
    ap.add_argument("--name", default="serve", help="results file name (bench/results/NAME.json, NAME.png)")
    ap.add_argument("--model-cores", default=None,
                    help="CPU ids (e.g. 0) for the vLLM servers' model threads; everything else of theirs and the "
                         "load generator on the other CPUs (the peft server is not confined)")
    args = ap.parse_args()
    model_cores = set(map(int, args.model_cores.split(","))) if args.model_cores else set()
    if model_cores and not model_cores < ALL_CPUS:
        ap.error(f"--model-cores {args.model_cores}: must be some, not all, of this process's CPUs {sorted(ALL_CPUS)}")
    from lorafleet.models import resolve_model
    from serve.engine import cpu_library_preload, pick_dtype

    levels = [int(c) for c in args.concurrency.split(",")]
    top = max(levels)
    base = resolve_model("embedded:smollm2-135m-instruct")
    adapters = ensure_adapters()
    work = ROOT / "runs" / "bench-serve"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "adapters").mkdir()
    for name, p in adapters.items():
        (work / "adapters" / name).symlink_to(p)
    dtype = pick_dtype(ENGINE["dtype"])
    preload = cpu_library_preload(os.environ.get("LD_PRELOAD", ""))  # what lorafleet's engine gets, for vLLM's too
    rounds: dict[str, dict[int, list[dict]]] = {}  # server -> concurrency -> one result per round
    startups: dict[str, list[float]] = {}

    def record(key, c, r):
        rounds.setdefault(key, {}).setdefault(c, []).append(r)
        print(f"{key} @ {c} clients: {r['tokens_per_s']:.1f} tokens/s, TTFT p50 {r['ttft_p50_s']:.2f}s, "
              f"p99 {r['latency_p99_s']:.2f}s, errors {r['errors']}"
              + (f" {r['error_kinds']}" if r["errors"] else ""), flush=True)

    def up(label, cmd, stream=True, env=None):
        """Start a server, wait until it answers, warm it up (adapters loaded, kernels ready)."""
        port = free_port()
        cmd = [c.replace("{PORT}", str(port)) for c in cmd]
        log = work / f"{label.split()[0]}.log"
        confine = bool(model_cores) and label != "transformers+peft"
        if confine:
            env = {**(env or {}), "VLLM_CPU_OMP_THREADS_BIND": args.model_cores}
        proc = start(cmd, log, env)
        url = f"http://127.0.0.1:{port}"
        try:
            startups.setdefault(label, []).append(wait_until_serving(url, proc, log))
            if confine:
                print(f"{label}: {keep_off_model_cores(proc, model_cores)} threads on CPUs {sorted(model_cores)}, "
                      f"the rest elsewhere", flush=True)
            asyncio.run(load(url, requests_for(adapters, 2), 2, 8, stream))
        except BaseException:
            stop(proc)
            raise
        return proc, url

    def window(key, c, per_client, url, model_override=None, stream=True):
        reqs = requests_for(adapters, max(args.min_requests, c * per_client))
        record(key, c, asyncio.run(load(url, reqs, c, args.max_tokens, stream, model_override=model_override)))

    # (a) lorafleet and (b) vLLM's own server, both up, taking turns window by window: the one
    # not measured is frozen (SIGSTOP on its whole session: Ray's processes, vLLM's engine), so
    # it takes no CPU, and the machine's drift is shared by each pair of neighbouring windows.
    servers = {}
    try:
        if "lorafleet" not in args.skip:
            servers["lorafleet"] = up("lorafleet", lorafleet_cmd("{PORT}", work / "adapters"))
            freeze(servers["lorafleet"][0])
        if "vllm" not in args.skip:
            servers["vLLM server"] = up("vLLM server", [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base, "--served-model-name",
                BASE_NAME, "--host", "127.0.0.1", "--port", "{PORT}", "--dtype", dtype, "--max-model-len",
                str(ENGINE["max_model_len"]), "--max-num-seqs", str(ENGINE["max_num_seqs"]),
                "--kv-cache-memory-bytes", str(int(ENGINE["kv_gb"] * 2**30)), "--enable-lora", "--max-lora-rank",
                "16", "--max-loras", "2", "--lora-modules", *[f"{n}={p}" for n, p in adapters.items()],
                "--disable-log-stats"], env={"LD_PRELOAD": preload})
            freeze(servers["vLLM server"][0])
        if model_cores:  # the load generator too; servers started later (peft) get every CPU back
            os.sched_setaffinity(0, ALL_CPUS - model_cores)
        for c in levels:
            for i in range(args.rounds):
                for label in (list(servers) if i % 2 == 0 else list(servers)[::-1]):
                    proc, url = servers[label]
                    with thawed(proc):
                        if model_cores:  # threads started since (Ray's, vLLM's) join the rest
                            keep_off_model_cores(proc, model_cores)
                        window(label, c, args.requests_per_client, url)
                        if label == "lorafleet" and c == top:  # the same load on the base alone: LoRA overhead
                            window(f"{label}, base only", c, args.requests_per_client, url, model_override=BASE_NAME)
    finally:
        for proc, _ in servers.values():
            thaw(proc)
        for proc, _ in servers.values():
            stop(proc)
    if model_cores:
        os.sched_setaffinity(0, ALL_CPUS)
    if "peft" not in args.skip:  # far from the others: one round tells
        proc, url = up("transformers+peft", [
            sys.executable, "bench/peft_server.py", "--base", base, "--base-name", BASE_NAME, "--port", "{PORT}",
            *[a for n, p in adapters.items() for a in ("--adapter", f"{n}={p}")]], stream=False)
        try:
            for c in levels:  # it answers whole responses: time to first token = latency
                window("transformers+peft", c, args.peft_requests_per_client, url, stream=False)
        finally:
            stop(proc)
    sweep = {label: {c: median_round(rs) for c, rs in by_c.items()} for label, by_c in rounds.items()}
    startup = {label: statistics.median(v) for label, v in startups.items()}
    cold = None if "cold" in args.skip else cold_adapters(work, adapters)
    if args.keep_previous and (RESULTS / f"{args.name}.json").is_file():
        prev = json.loads((RESULTS / f"{args.name}.json").read_text())
        for label, by_c in prev.get("sweep", {}).items():  # what this run measured wins
            for c, v in by_c.items():
                sweep.setdefault(label, {}).setdefault(int(c), v)
            startup.setdefault(label, prev.get("startup_s", {}).get(label))
        cold = cold or prev.get("cold_adapter")
        levels = sorted({c for by_c in sweep.values() for c in by_c})
        top = max(levels)

    def tps(label, c=top):
        return sweep.get(label, {}).get(c, {}).get("tokens_per_s")

    def paired(a, b, c=top):
        """Median of the ratios of neighbouring windows (a's and b's n-th turn at c clients); the ratio of
        the medians when the two were not measured in turns (peft; --keep-previous)."""
        ra, rb = rounds.get(a, {}).get(c, []), rounds.get(b, {}).get(c, [])
        if ra and len(ra) == len(rb):
            return statistics.median(x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(ra, rb)), \
                [round(x["tokens_per_s"] / y["tokens_per_s"], 3) for x, y in zip(ra, rb)]
        x, y = tps(a, c), tps(b, c)
        return (x / y if x and y else None), []

    ratios = {"lorafleet_vs_vllm": paired("lorafleet", "vLLM server")[0],
              "lorafleet_vs_peft": paired("lorafleet", "transformers+peft")[0],
              "lora_overhead_mixed_over_base": paired("lorafleet", "lorafleet, base only")[0]}
    per_level = {}
    for c in levels:
        vs_vllm, pairs = paired("lorafleet", "vLLM server", c)
        per_level[c] = {"lorafleet_vs_vllm": vs_vllm, "lorafleet_vs_vllm_by_pair": pairs,
                        "lorafleet_vs_peft": paired("lorafleet", "transformers+peft", c)[0]}
    cols = ["server", "clients", "requests", "errors", "tokens_per_s", "by_round", "ttft_p50_s", "latency_p50_s",
            "latency_p99_s"]
    rows = [{"server": k, "clients": c, **{m: v.get(m) for m in cols[2:]},
             "by_round": " / ".join(f"{x:.1f}" for x in v.get("tokens_per_s_by_round", []))}
            for k, by_c in sweep.items() for c, v in by_c.items()]
    md = table(rows, cols,
               f"serve: {args.max_tokens} tokens per request (ignore_eos), 2 adapters mixed, dtype {dtype}")
    md += f"\n\nat {top} clients: " + " · ".join(f"{k}: {v:.2f}×" for k, v in ratios.items() if v is not None)
    md += "\n\nlorafleet / vLLM server by clients (median of paired windows; each pair): " + " · ".join(
        f"{c}: {r['lorafleet_vs_vllm']:.2f}× ({' / '.join(f'{x:.2f}' for x in r['lorafleet_vs_vllm_by_pair'])})"
        for c, r in per_level.items() if r["lorafleet_vs_vllm"])
    if cold:
        md += (f"\n\ncold adapter (100 registered, 8 resident): time to first token p50 "
               f"{cold['cold_ttft_p50_s']:.3f}s vs {cold['warm_ttft_p50_s']:.3f}s once resident")
    print(md)
    env = " ".join(f"{k}={os.environ[k]}" for k in ("VLLM_CPU_NUM_OF_RESERVED_CPU", "LORAFLEET_LORA_KERNEL")
                   if k in os.environ)
    settings = {**ENGINE, "dtype": dtype, **same_cpu_cores(),
                "lora_kernel": os.environ.get("LORAFLEET_LORA_KERNEL", "grouped"), "concurrency": levels,
                "ld_preload": preload,
                "requests_per_client": args.requests_per_client, "min_requests": args.min_requests,
                "rounds": args.rounds, "max_tokens": args.max_tokens, "model_cores": args.model_cores}
    save(args.name, {"command": " ".join(filter(None, [env, "python bench/serve.py", *sys.argv[1:]])),
                     "sweep": {k: {str(c): v for c, v in by_c.items()} for k, by_c in sweep.items()},
                     "startup_s": startup, "ratios": ratios, "ratios_by_clients": per_level, "cold_adapter": cold,
                     "markdown": md, "settings": settings})
    plot(sweep, levels, args.name)


def median_round(results: list[dict]) -> dict:
    """One level's figures over the rounds: medians, and each round's tokens/s."""
    keys = ("tokens_per_s", "ttft_p50_s", "latency_p50_s", "latency_p99_s")
    out = {k: statistics.median(vs) if (vs := [r[k] for r in results if r[k] is not None]) else None for k in keys}
    return {**out, "requests": results[0]["requests"], "errors": sum(r["errors"] for r in results),
            "tokens": sum(r["tokens"] for r in results), "rounds": len(results),
            "tokens_per_s_by_round": [round(r["tokens_per_s"], 2) for r in results],
            "error_kinds": [r.get("error_kinds") for r in results if r.get("errors")]}


def cold_adapters(work: Path, adapters: dict[str, Path]) -> dict:
    """Time to first token for an adapter not yet resident: 100 registered, 8 resident at most."""
    many = work / "many"
    many.mkdir()
    for i in range(100):
        (many / f"ad{i:03d}").symlink_to(adapters["support" if i % 2 else "legal"])
    port = free_port()
    proc = start(lorafleet_cmd(port, many, resident=8, max_loras=8), work / "cold.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc, work / "cold.log")
        prompt = requests_for(adapters, 1)[0][1]
        cold_t, warm_t = [], []
        for i in range(12):
            one = [(f"ad{i:03d}", prompt)]
            cold_t.append(asyncio.run(load(url, one, 1, 4, True))["ttft_p50_s"])
            warm_t.append(asyncio.run(load(url, one, 1, 4, True))["ttft_p50_s"])
        cold = {"registered": 100, "resident_max": 8, "cold_ttft_p50_s": statistics.median(cold_t),
                "warm_ttft_p50_s": statistics.median(warm_t)}
        print(f"cold adapter TTFT p50 {cold['cold_ttft_p50_s']:.3f}s vs warm {cold['warm_ttft_p50_s']:.3f}s")
        return cold
    finally:
        stop(proc)


def plot(sweep: dict[str, dict[int, dict]], levels: list[int], name: str = "serve") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for label, by_c in sweep.items():
        if len(by_c) < 2:
            continue
        cs = sorted(by_c)
        ax[0].plot(cs, [by_c[c]["tokens_per_s"] for c in cs], marker="o", label=label)
        ax[1].plot(cs, [by_c[c]["ttft_p50_s"] for c in cs], marker="o", label=label)
    ax[0].set_title("generated tokens/s (higher is better)")
    ax[1].set_title("time to first token p50, s (lower is better)")
    for x in ax:
        x.set_xscale("log", base=2)
        x.set_xticks(levels, [str(c) for c in levels])
        x.set_xlabel("concurrent clients")
        x.grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
