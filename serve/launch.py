"""`lorafleet serve`: start (or join) Ray, run the application, serve until told to stop."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

from lorafleet.config import ServeConfig


def launch(cfg: ServeConfig, log: Callable[[str], None] = print, block: bool = True) -> None:
    os.environ.setdefault("RAY_worker_niceness", "0")  # else the engine starves on a busy box
    import ray
    from ray import serve

    from lorafleet.models import resolve_model
    from serve.deployment import APP_NAME, build_app

    model_path = resolve_model(cfg.model)
    env = {"RAY_worker_niceness": "0", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("LORAFLEET_API_KEY", "LORAFLEET_ADMIN_KEY", "LORAFLEET_CACHE", "AWS_ENDPOINT_URL",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "HF_TOKEN", "HF_HUB_OFFLINE"):
        if k in os.environ:
            env[k] = os.environ[k]
    if not ray.is_initialized():
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": env}, ignore_reinit_error=True)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    t0 = time.time()
    log(f"starting {APP_NAME}: model {cfg.model}, adapters {cfg.adapters or 'none (merged/base mode)'}")
    serve.run(build_app(cfg, model_path), name=APP_NAME, route_prefix="/", blocking=False)
    log(f"ready in {time.time() - t0:.0f}s: http://{cfg.host}:{cfg.port}/v1 (OpenAI API)")
    if not block:
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log("shutting down: finishing in-flight requests")
    serve.shutdown()  # replicas get graceful_shutdown_timeout_s to drain
    ray.shutdown()
