"""Serving throughput under load: lorafleet vs vLLM's own OpenAI server vs transformers+peft.

One load generator (asyncio, `--concurrency` clients, a fixed list of requests alternating
between two adapters, greedy, `--max-tokens` each, streamed to measure time to first token)
runs the same requests against:
  (a) lorafleet serve (Ray Serve + vLLM), the adapters from a directory
  (b) vLLM's OpenAI server with the same adapters (--lora-modules) and the same engine settings
  (c) bench/peft_server.py: transformers + peft, adapter switched per request, one at a time
Every server gets the same prompt text (/v1/completions, each prompt rendered with its
adapter's template), so all do the same work. Then, on lorafleet: the same load on the base
model alone (the LoRA overhead), and cold-adapter time to first token with 100 registered
adapters and 8 resident.

    python bench/serve.py [--concurrency 8] [--requests 32] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
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
from lorafleet.net import free_port  # noqa: E402

BASE_NAME = "smollm2"
ENGINE = {"dtype": "auto", "max_model_len": 1024, "max_num_seqs": 32, "kv_gb": 1.0}


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                            env=dict(os.environ, RAY_worker_niceness="0", **(env or {})))


def wait(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> float:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        try:
            # 401: up, with API keys configured (the caller has them)
            if httpx.get(f"{url}/v1/models", timeout=5).status_code in (200, 401):
                return time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    subprocess.run(["pkill", "-9", "-f", "VLLM::EngineCore"], check=False)  # an engine orphaned by a killed parent


def requests_for(adapters: dict[str, Path], n: int) -> list[tuple[str, str]]:
    """(model, prompt text) pairs, alternating adapters, rendered with each adapter's template."""
    from transformers import AutoTokenizer

    from lorafleet.models import resolve_model
    from lorafleet.templates import render

    tok = AutoTokenizer.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"))
    per = {}
    for name, path in adapters.items():
        man = json.loads((path / "lorafleet.json").read_text())
        data = man["data"]["train_file"]
        qs = []
        for line in (ROOT / data).read_text().splitlines():
            r = json.loads(line)
            msgs = r["messages"][:-1] if "messages" in r else [
                {"role": "system", "content": r["instruction"]}, {"role": "user", "content": r["input"]}]
            qs.append(render(tok, man["template"]["text"], msgs, add_generation_prompt=True))
        per[name] = qs
    names = list(adapters)
    return [(names[i % len(names)], per[names[i % len(names)]][(i // len(names)) % len(per[names[i % len(names)]])])
            for i in range(n)]


async def load(url: str, reqs: list[tuple[str, str]], concurrency: int, max_tokens: int, stream: bool,
               model_override: str | None = None) -> dict:
    import httpx

    queue = list(reqs)
    ttfts, lats, toks, errors = [], [], [], 0

    async def client(c: httpx.AsyncClient):
        nonlocal errors
        while queue:
            model, prompt = queue.pop(0)
            body = {"model": model_override or model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "stream": stream}
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
            except Exception:  # counted and reported; a benchmark keeps going
                errors += 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as c:
        await asyncio.gather(*[client(c) for _ in range(concurrency)])
    wall = time.perf_counter() - t0

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None

    return {"requests": len(lats), "errors": errors, "tokens": sum(toks), "wall_s": wall,
            "tokens_per_s": sum(toks) / wall, "ttft_p50_s": pct(ttfts, 0.5), "latency_p50_s": pct(lats, 0.5),
            "latency_p99_s": pct(lats, 0.99)}


def ensure_adapters() -> dict[str, Path]:
    out = {}
    for name in ("support", "legal"):
        ad = ROOT / "runs" / "adapters" / name
        if not (ad / "lorafleet.json").is_file():
            subprocess.run([sys.executable, "-m", "train", f"examples/cpu-{name}.yaml"], check=True, cwd=ROOT)
        out[name] = ad
    return out


def lorafleet_cmd(port: int | str, adapter_dir: Path, resident: int = 8) -> list[str]:
    return [sys.executable, "-m", "serve", "--model", "embedded:smollm2-135m-instruct", "--served-model-name",
            BASE_NAME, "--adapters", str(adapter_dir), "--port", str(port),
            "--set", f"engine.dtype={ENGINE['dtype']}", "--set", f"engine.max_model_len={ENGINE['max_model_len']}",
            "--set", f"engine.max_num_seqs={ENGINE['max_num_seqs']}",
            "--set", f"engine.cpu_kvcache_space_gb={ENGINE['kv_gb']}", "--set", "engine.max_lora_rank=16",
            "--set", f"engine.max_loras={min(resident, 8)}", "--set", f"max_resident_adapters={resident}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--peft-requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip", action="append", default=[], help="skip a target: vllm, peft, cold")
    args = ap.parse_args()
    from lorafleet.models import resolve_model
    from serve.engine import pick_dtype

    base = resolve_model("embedded:smollm2-135m-instruct")
    adapters = ensure_adapters()
    reqs = requests_for(adapters, args.requests)
    work = ROOT / "runs" / "bench-serve"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "adapters").mkdir()
    for name, p in adapters.items():
        (work / "adapters" / name).symlink_to(p)
    dtype = pick_dtype(ENGINE["dtype"])
    results: dict[str, dict] = {}

    def measure(label, cmd, env=None, n_reqs=reqs, stream=True, model_override=None, keep=False):
        port = free_port()
        cmd = [c.replace("{PORT}", str(port)) for c in cmd]
        log = work / f"{label.split()[0]}.log"
        proc = start(cmd, log, env)
        url = f"http://127.0.0.1:{port}"
        try:
            ready = wait(url, proc, log)
            asyncio.run(load(url, n_reqs[:2], 2, 8, stream))  # warm-up (adapters loaded, kernels ready)
            r = asyncio.run(load(url, n_reqs, args.concurrency, args.max_tokens, stream, model_override))
            r["startup_s"] = ready
            print(f"{label}: {r['tokens_per_s']:.1f} tokens/s, p50 {r['latency_p50_s']:.2f}s, errors {r['errors']}")
            return (r, proc, url) if keep else r
        finally:
            if not keep:
                stop(proc)

    # (a) lorafleet, mixed adapters; then the base alone on the same replica; then cold adapters
    r, proc, url = measure("lorafleet", lorafleet_cmd("{PORT}", work / "adapters"), keep=True)
    try:
        results["lorafleet"] = r
        results["lorafleet, base only"] = asyncio.run(load(url, reqs, args.concurrency, args.max_tokens, True,
                                                           model_override=BASE_NAME))
    finally:
        stop(proc)
    results["lorafleet"]["startup_s"] = r["startup_s"]
    cold = None
    if "cold" not in args.skip:
        many = work / "many"
        many.mkdir()
        for i in range(100):
            (many / f"ad{i:03d}").symlink_to(adapters["support" if i % 2 else "legal"])
        port = free_port()
        proc = start(lorafleet_cmd(port, many, resident=8), work / "cold.log")
        url = f"http://127.0.0.1:{port}"
        try:
            wait(url, proc, work / "cold.log")
            prompt = reqs[0][1]
            cold_t, warm_t = [], []
            for i in range(12):
                one = [(f"ad{i:03d}", prompt)]
                cold_t.append(asyncio.run(load(url, one, 1, 4, True))["ttft_p50_s"])
                warm_t.append(asyncio.run(load(url, one, 1, 4, True))["ttft_p50_s"])
            cold = {"registered": 100, "resident_max": 8, "cold_ttft_p50_s": statistics.median(cold_t),
                    "warm_ttft_p50_s": statistics.median(warm_t)}
            print(f"cold adapter TTFT p50 {cold['cold_ttft_p50_s']:.3f}s vs warm {cold['warm_ttft_p50_s']:.3f}s")
        finally:
            stop(proc)
    # (b) vLLM's own server, same engine settings and adapters
    if "vllm" not in args.skip:
        results["vLLM server"] = measure("vllm", [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base, "--served-model-name",
            BASE_NAME, "--host", "127.0.0.1", "--port", "{PORT}", "--dtype", dtype, "--max-model-len",
            str(ENGINE["max_model_len"]), "--max-num-seqs", str(ENGINE["max_num_seqs"]), "--kv-cache-memory-bytes",
            str(int(ENGINE["kv_gb"] * 2**30)), "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
            "--lora-modules", *[f"{n}={p}" for n, p in adapters.items()], "--disable-log-stats"])
    # (c) transformers + peft, one request at a time
    if "peft" not in args.skip:
        results["transformers+peft"] = measure("peft", [
            sys.executable, "bench/peft_server.py", "--base", base, "--base-name", BASE_NAME, "--port", "{PORT}",
            *[a for n, p in adapters.items() for a in ("--adapter", f"{n}={p}")]],
            n_reqs=reqs[: args.peft_requests], stream=False)
    a = results["lorafleet"]["tokens_per_s"]
    ratios = {"lorafleet_vs_vllm": a / results["vLLM server"]["tokens_per_s"] if "vLLM server" in results else None,
              "lorafleet_vs_peft": a / results["transformers+peft"]["tokens_per_s"]
              if "transformers+peft" in results else None,
              "lora_overhead_mixed_over_base": a / results["lorafleet, base only"]["tokens_per_s"]}
    rows = [{"server": k, **{c: v.get(c) for c in ("requests", "errors", "tokens_per_s", "ttft_p50_s",
                                                    "latency_p50_s", "latency_p99_s")}} for k, v in results.items()]
    md = table(rows, ["server", "requests", "errors", "tokens_per_s", "ttft_p50_s", "latency_p50_s", "latency_p99_s"],
               f"serve: {args.concurrency} clients, {args.max_tokens} tokens, 2 adapters mixed, dtype {dtype}")
    md += "\n\n" + " · ".join(f"{k}: {v:.2f}×" for k, v in ratios.items() if v is not None)
    if cold:
        md += (f"\n\ncold adapter (100 registered, 8 resident): time to first token p50 "
               f"{cold['cold_ttft_p50_s']:.3f}s vs {cold['warm_ttft_p50_s']:.3f}s once resident")
    print(md.split("\n\n", 1)[-1])
    save("serve", {"results": results, "ratios": ratios, "cold_adapter": cold, "markdown": md,
                   "settings": {**ENGINE, "dtype": dtype, "concurrency": args.concurrency, "requests": args.requests,
                                "max_tokens": args.max_tokens}})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    names = list(results)
    ax[0].bar(names, [results[n]["tokens_per_s"] for n in names], color="#2b7bba")
    ax[0].set_title("generated tokens/s")
    ax[1].bar(names, [results[n]["latency_p50_s"] for n in names], color="#f29e4c")
    ax[1].set_title("latency p50 (s)")
    for x in ax:
        x.tick_params(axis="x", labelrotation=20, labelsize=8)
        x.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "serve.png")


if __name__ == "__main__":
    main()
