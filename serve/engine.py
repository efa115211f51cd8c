"""Starting vLLM's engine for one replica, with vLLM's own argument parser.

`engine_args(cfg, model_path, plan)` turns the serve config into the command line vLLM's
OpenAI server takes and parses it with vLLM's parser, so every engine and serving option means
what it means to `vllm serve` (defaults and checks included); `start_engine` builds `AsyncLLM`
from it, with the CPU backend's process settings. Nothing here speaks HTTP.
"""

from __future__ import annotations

import json
import logging
import os
from argparse import Namespace
from typing import Any

log = logging.getLogger("lorafleet.serve")


def pick_dtype(requested: str) -> str:
    """bf16 where the hardware computes it natively; float32 on CPUs without (AVX2-only)."""
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def cpu_library_preload(current: str = "") -> str:
    """LD_PRELOAD with what vLLM's CPU backend asks for added: tcmalloc and Intel OpenMP, when present."""
    import glob
    import site

    found = []
    for pattern in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/*/libtcmalloc.so.4"):
        found += glob.glob(pattern)[:1]
    for sp in site.getsitepackages():
        found += glob.glob(os.path.join(sp, "..", "..", "libiomp5.so"))[:1]
    extra = [f for f in found if f not in current]
    return ":".join([*extra, current] if current else extra)


def preload_cpu_libraries() -> None:
    """Preload them in the engine's processes: LD_PRELOAD only affects processes started after
    it is set."""
    preload = cpu_library_preload(os.environ.get("LD_PRELOAD", ""))
    if preload:
        os.environ["LD_PRELOAD"] = preload


def cpu_reserved_cores(configured: int | None) -> int | None:
    """Cores vLLM's CPU backend keeps free of compute threads; None leaves vLLM's rule (one).

    On a 2-core machine vLLM's rule leaves the model one core: serving 16 clients with both
    cores gave 1.27× the tokens/s with two adapters (58.5 vs 46.1) and 1.3× on the base, and
    the same at 1 and 4 clients (bench/serve.py with VLLM_CPU_NUM_OF_RESERVED_CPU=0 and 1).
    """
    if configured is not None:
        return configured
    if "VLLM_CPU_NUM_OF_RESERVED_CPU" in os.environ:
        return None  # the operator's own setting
    return 0 if len(os.sched_getaffinity(0)) <= 4 else None


def drop_ray_thread_default() -> bool:
    """Unset OMP_NUM_THREADS when Ray, not the operator, put it there; True if it did.

    Ray gives every worker OMP_NUM_THREADS = its CPUs unless the variable was already set, and
    vLLM takes any OMP_NUM_THREADS as the operator's: its engine-core process then keeps that
    many torch threads in its scheduling loop instead of its serving rule's one, spinning against
    the model's threads (on 2 cores, 16 clients: 55.7 tok/s with Ray's default, 79.4 without, in
    one pair of runs). The process's initial environment (/proc/self/environ) holds what the
    operator and the runtime_env gave it, and not Ray's default, which is set later from Python.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        return False
    try:
        initial = open("/proc/self/environ", "rb").read().split(b"\0")
    except OSError:
        return False
    if any(v.startswith(b"OMP_NUM_THREADS=") for v in initial):
        return False
    del os.environ["OMP_NUM_THREADS"]
    return True


def engine_args(cfg: Any, model_path: str, plan: dict[str, Any], on_cpu: bool) -> Namespace:
    """vLLM's parsed server arguments for this deployment (a `vllm serve` command line).

    `cfg` is a ServeConfig; `plan` is deployment.engine_plan's LoRA sizing. `engine.extra_args`
    are appended last, so an operator can set any other flag of vLLM's server. Raises UserError
    naming the flag when vLLM's parser or its checks refuse the combination.
    """
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from lorafleet.errors import UserError

    e = cfg.engine
    argv = ["--model", model_path, "--served-model-name", cfg.served_model_name or cfg.model,
            "--dtype", pick_dtype(e.dtype), "--max-num-seqs", str(e.max_num_seqs),
            "--tensor-parallel-size", str(e.tensor_parallel_size), "--disable-log-stats"]
    if e.max_model_len:
        argv += ["--max-model-len", str(e.max_model_len)]
    if e.enforce_eager:
        argv.append("--enforce-eager")
    if e.trust_remote_code:
        argv.append("--trust-remote-code")
    if on_cpu:
        # On the CPU backend gpu_memory_utilization means "fraction of the NUMA node's RAM",
        # which fails on a shared box; a fixed KV-cache size is what operators expect.
        argv += ["--kv-cache-memory-bytes", str(int(e.cpu_kvcache_space_gb * 2**30))]
    else:
        argv += ["--gpu-memory-utilization", str(e.gpu_memory_utilization)]
    if plan["enable_lora"]:
        argv += ["--enable-lora", "--max-lora-rank", str(plan["max_lora_rank"]), "--max-loras",
                 str(plan["max_loras"]), "--max-cpu-loras", str(max(plan["max_cpu_loras"], plan["max_loras"]))]
    parser = tool_parser(cfg, model_path)
    if cfg.enable_auto_tool_choice if cfg.enable_auto_tool_choice is not None else parser is not None:
        argv.append("--enable-auto-tool-choice")
    if parser:
        argv += ["--tool-call-parser", parser]
    argv += ["--tool-strict-level", cfg.tool_strict_level]
    if cfg.reasoning_parser:
        argv += ["--reasoning-parser", cfg.reasoning_parser]
    if cfg.structured_outputs_config:
        argv += ["--structured-outputs-config", json.dumps(cfg.structured_outputs_config)]
    if cfg.trust_request_chat_template:
        argv.append("--trust-request-chat-template")
    argv += list(e.extra_args)
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve", exit_on_error=False))
    try:
        args = parser.parse_args(argv)
        validate_parsed_serve_args(args)
    except (SystemExit, Exception) as err:  # argparse exits; vLLM's checks raise TypeError/ValueError
        raise UserError(f"vLLM refused the engine settings {' '.join(argv[2:])}: {err}") from None
    return args


def tool_parser(cfg: Any, model_path: str) -> str | None:
    """The --tool-call-parser for this deployment: the config's, or with `auto` the one the base's
    chat template calls for (serve/tools.py), None when it calls for none that lorafleet knows."""
    if cfg.tool_call_parser != "auto":
        return cfg.tool_call_parser
    from pathlib import Path

    from lorafleet.models import cached_snapshot
    from serve.tools import infer_tool_parser, served_chat_template

    local = model_path if Path(model_path).is_dir() else cached_snapshot(model_path)
    return infer_tool_parser(served_chat_template(local))


def start_engine(args: Namespace, cpu_reserved: int | None):
    """vLLM's AsyncLLM for `args` (from `engine_args`), started in this process.

    Sets what the engine's processes read from the environment as they start: on CPUs the
    preloaded libraries and the reserved cores, everywhere the engine's thread count (see
    drop_ray_thread_default), and this process's pid for the orphan guard.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    import torch

    from serve.orphan_guard import PARENT_ENV

    if drop_ray_thread_default():  # GPU workers too: vLLM sets their serving threads by the same rule
        log.info("OMP_NUM_THREADS from Ray's worker default unset: vLLM picks the engine's threads")
    if not torch.cuda.is_available():
        preload_cpu_libraries()
        reserved = cpu_reserved_cores(cpu_reserved)
        if reserved is not None:
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved)
    log.info("engine: %s, dtype %s, %s; tools: %s", args.model, args.dtype,
             f"LoRA on (max_lora_rank {args.max_lora_rank}, max_loras {args.max_loras})" if args.enable_lora
             else "LoRA off (a base or merged model alone)",
             f"parser {args.tool_call_parser}, auto tool choice {'on' if args.enable_auto_tool_choice else 'off'}"
             if args.tool_call_parser else "no tool parser (requests with tools get vLLM's 400)")
    os.environ[PARENT_ENV] = str(os.getpid())  # the engine process ends if this one is killed
    return AsyncLLM.from_engine_args(AsyncEngineArgs.from_cli_args(args))
