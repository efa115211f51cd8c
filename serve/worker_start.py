"""Fork the CPU worker of lorafleet's engine, as vLLM does outside Ray, instead of spawning it.

vLLM's engine core runs in a child process of the replica; on the CPU backend the model runs in
a third process, the executor's worker. In a Ray actor vLLM must spawn the engine core
(vllm.utils.system_utils._maybe_force_spawn: "In a Ray actor and can only be spawned") and
says so by setting VLLM_WORKER_MULTIPROC_METHOD=spawn in the environment, which the engine core
inherits: its worker is spawned as well, a fresh interpreter that imports torch and vLLM again
on every start and every restart after a crash. The engine core itself is no Ray actor; vLLM's
rule does not apply to it, and outside Ray vLLM forks its workers (its default, fork). This
vLLM plugin restores that default in the engine core lorafleet started (identified as
serve.orphan_guard identifies it), so the worker starts with vLLM already imported
(bench/recovery.py measures the time saved on a restart). LORAFLEET_ENGINE_WORKER_START=spawn
keeps the spawned worker.
"""

from __future__ import annotations

import os

from serve.orphan_guard import PARENT_ENV

SETTING = "LORAFLEET_ENGINE_WORKER_START"


def register() -> None:
    """vLLM general-plugin entry point: runs in every vLLM process, acts in lorafleet's engine core."""
    parent = os.environ.get(PARENT_ENV, "")
    if not (parent.isdigit() and os.getppid() == int(parent)):
        return  # not the engine core lorafleet started (a worker, or vLLM's own server)
    if os.environ.get(SETTING, "fork") == "fork":
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
