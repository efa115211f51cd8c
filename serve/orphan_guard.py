"""Ends a vLLM engine process whose lorafleet parent is gone.

vLLM's engine core runs in a child process of the replica that holds `AsyncLLM`. When the replica
exits normally it shuts the engine down; when it is SIGKILLed (the OOM killer, `ray stop --force`,
a node agent) nothing does, and the orphan keeps its cores, memory and KV cache while Ray starts a
new replica next to it. This vLLM plugin runs in every vLLM process. In the one lorafleet's
engine started directly (its parent's pid is in LORAFLEET_ENGINE_PARENT, set by `serve.engine.start_engine`) a
daemon thread checks the parent once a second; once the parent is gone it stops the process the
way vLLM's own shutdown does (SIGTERM: the engine's workers follow through vLLM's death pipes),
and hard after a grace period. Other processes (vLLM's own servers, the workers) are left alone.
"""

from __future__ import annotations

import os
import signal
import threading
import time

PARENT_ENV = "LORAFLEET_ENGINE_PARENT"


def register() -> None:
    """vLLM general-plugin entry point."""
    parent = os.environ.get(PARENT_ENV, "")
    if parent.isdigit() and os.getppid() == int(parent):
        threading.Thread(target=watch, args=(int(parent),), name="lorafleet-parent-watch", daemon=True).start()


def watch(parent: int, period_s: float = 1.0, grace_s: float = 15.0) -> None:
    while os.getppid() == parent:  # a dead parent's children are re-parented: the pid changes
        time.sleep(period_s)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os._exit(1)
