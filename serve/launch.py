"""`lorafleet serve`: start (or join) Ray, run the application, serve until told to stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from lorafleet.config import ServeConfig
from lorafleet.errors import UserError

# Ray's defaults suit a cluster of many nodes watched from a dashboard. A local cluster that
# lorafleet starts for itself runs next to the model, whose threads take every core on a CPU
# node: each background wakeup there is taken from a decode step. These settings cut the CPU
# of Ray's own processes from 17% to 7-8% of a core on an idle server and, under 16 streaming
# clients, from 23% to 12.8% (per-process CPU, a 2-core box). Each is only a default: a value in the
# environment wins. What is given up: Ray's own Prometheus metrics, task history and the
# dashboard's node stats (lorafleet's /metrics stays), and Serve reconciles every 1 s, not 0.1 s.
LOCAL_RAY_DEFAULTS = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1",  # the controller's loop: 4.7% -> 1.4% of a core, idle
    "RAY_enable_metrics_collection": "0",  # Ray's metrics pipeline in every process and the agent
    "RAY_event_stats": "0",  # per-handler timing stats in GCS, raylet and workers
    "RAY_task_events_report_interval_ms": "0",  # task history for the state API: one event per request
    "RAY_enable_worker_prestart": "0",  # no spare Python workers waiting on the model's cores
    "RAY_num_workers_soft_limit": "0",  # and none kept idle once used (Serve's actors are not idle workers)
    # the log monitor lists Ray's log directory 10 times a second below 1000 files; every 2 s here
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "2",
    "REPORTER_UPDATE_INTERVAL_MS": "60000",  # the dashboard agent's node stats: every 60 s, not 5 s
    # Streamed chunks from the replica to the HTTP proxy (and between deployments) over a gRPC
    # stream instead of one Ray object per chunk: Ray's data plane in its throughput-optimized
    # mode. Proxy + replica under 16 streaming clients: 11.6% -> 8.5% of a core.
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    # A Ray started here is one node that nothing outside needs to reach. Ray's own switch for
    # that (ray_constants.ENABLE_RAY_CLUSTER, off by default on macOS and Windows) makes the node's
    # address loopback, and GCS, raylet, agents, Serve's controller and replicas then bind it,
    # instead of every interface. Clients still reach the server on `host` (the proxy or the
    # fused replica binds that itself).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def local_ray_environment(address: str | None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The LOCAL_RAY_DEFAULTS to add when this process will start Ray itself (no cluster address
    in the config or in RAY_ADDRESS); the operator's own values are kept."""
    env = os.environ if environ is None else environ
    if not starts_own_ray(address, env):
        return {}
    return {k: v for k, v in LOCAL_RAY_DEFAULTS.items() if k not in env}


def starts_own_ray(address: str | None, env: dict[str, str]) -> bool:
    """No cluster address in the config or in RAY_ADDRESS: `ray.init` starts a local Ray."""
    return address in (None, "", "local") and not env.get("RAY_ADDRESS")


def replica_listens(cfg: ServeConfig, environ: dict[str, str] | None = None) -> bool:
    """Whether the fused replica takes HTTP connections itself (`http_listener`). `auto` does where
    lorafleet starts Ray for itself: a cluster's clients and probes expect Ray Serve's proxy."""
    if cfg.http_listener != "auto":
        return cfg.http_listener == "replica"
    return cfg.fused and starts_own_ray(cfg.address, os.environ if environ is None else environ)


SUPERVISED_ENV = "LORAFLEET_SERVE_SUPERVISED"  # set in the server that `supervise` runs


def supervise(argv: list[str]) -> int:
    """Run the server (`argv`, this command again) in a session of its own and pass it every
    SIGINT, SIGTERM and SIGHUP this process gets; return its exit status.

    Ctrl-C, systemd's default KillMode, `podman stop` and a pod's SIGTERM signal a whole process
    group. The local Ray that the server starts (GCS, raylet, Serve's actors, the engines) is made
    of its children: in its process group they would die at once, and the server's drain would
    hang on a Ray that is gone. In a session of their own only this process hears the signal,
    and the server, told by it, drains and then stops Ray itself. Should this process die, the
    server gets SIGTERM (Linux's PR_SET_PDEATHSIG) and drains the same way.
    """
    child = subprocess.Popen(argv, env={**os.environ, SUPERVISED_ENV: "1"}, start_new_session=True,
                             preexec_fn=_terminate_with_parent)

    def forward(sig, _frame):
        if child.poll() is None:
            child.send_signal(sig)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    code = child.wait()  # retried across signals (PEP 475)
    return 128 - code if code < 0 else code


def _terminate_with_parent() -> None:
    """In a child before exec: SIGTERM when the parent dies (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def needs_supervisor(cfg: ServeConfig) -> bool:
    """`lorafleet serve` runs itself under `supervise` when it starts its own Ray (a cluster's
    Ray lives elsewhere) and is not already the supervised server."""
    return starts_own_ray(cfg.address, os.environ) and SUPERVISED_ENV not in os.environ


def launch(cfg: ServeConfig, log: Callable[[str], None] = print, block: bool = True) -> None:
    os.environ.setdefault("RAY_worker_niceness", "0")  # else the engine starves on a busy box
    listen = (cfg.host, cfg.port) if replica_listens(cfg) else None
    if listen:
        from serve.listener import bind

        try:  # a taken port fails here, in one line, not after Ray's retries of the replica
            bind(*listen).close()
        except RuntimeError as e:
            raise UserError(str(e)) from None
    check_adapter_sources(cfg.adapters)
    from serve.auth import read_keys

    read_keys("LORAFLEET_API_KEY", cfg.api_keys_file)  # a configured key file that cannot be read stops here
    read_keys("LORAFLEET_ADMIN_KEY", cfg.admin_keys_file)
    os.environ.update(local_ray_environment(cfg.address))  # read by Ray's processes as they start
    import ray
    from ray import serve

    from lorafleet.models import resolve_model
    from serve.deployment import APP_NAME, build_app

    model_path = resolve_model(cfg.model)
    check_engine_settings(cfg, model_path)  # vLLM's parser and checks, before Ray starts anything
    env = {"RAY_worker_niceness": "0", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("LORAFLEET_API_KEY", "LORAFLEET_ADMIN_KEY", "LORAFLEET_CACHE", "LORAFLEET_ENGINE_WORKER_START",
              "LORAFLEET_ENGINE_RESTART", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "HF_TOKEN",
              "HF_HUB_OFFLINE"):
        if k in os.environ:
            env[k] = os.environ[k]
    if not ray.is_initialized():
        # "local": a Ray of its own. Left unset, ray.init attaches to any Ray it finds running on
        # this machine (`ray start`'s, another user's), which is not what an unset address means.
        own = starts_own_ray(cfg.address, os.environ)
        ray.init(address="local" if own else cfg.address, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": env}, ignore_reinit_error=True)
    if listen:  # the replica takes the connections: Ray Serve starts no HTTP proxy
        serve.start(proxy_location="Disabled")
    else:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
    t0 = time.time()
    log(f"starting: model {cfg.model}, adapters {cfg.adapters or 'none (merged/base mode)'}")
    serve.run(build_app(cfg, model_path, listen), name=APP_NAME, route_prefix=None if listen else "/",
              blocking=False)
    log(f"ready in {time.time() - t0:.0f}s: http://{cfg.host}:{cfg.port}/v1 (OpenAI API)")
    if not block:
        return
    stop, now = threading.Event(), threading.Event()

    def on_signal(*_):
        if stop.is_set() and not now.is_set():  # a second Ctrl-C: do not wait for running requests
            log("second signal: stopping now, running requests are cut short")
            now.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    stop.wait()
    try:
        drain(log, cfg.shutdown_grace_s, now)
    except Exception as e:  # the app is already gone or broken: nothing left to wait for
        log(f"could not drain ({e}); shutting down")
    if not (now.is_set() and starts_own_ray(cfg.address, os.environ)):
        serve.shutdown()  # waits for the replicas' own graceful shutdown; a second Ctrl-C does not
    ray.shutdown()


def check_adapter_sources(sources: list[str]) -> None:
    """Stop (UserError) on a local adapter source that is not there: served, it would be an empty
    list of adapters and every request naming one a 404. (A RayService's app, which may start
    before its volume is mounted, lists such a source as empty and rescans.)"""
    from pathlib import Path

    from serve.registry import is_remote

    for src in sources:
        path = Path(src.removeprefix("file://"))
        if not is_remote(src) and not path.is_dir():
            what = "is a file, not a directory" if path.exists() else "does not exist"
            raise UserError(f"adapter source {src} {what}: pass a directory of adapters (each with its "
                            "adapter_config.json), or one adapter's directory, to --adapters")


def check_engine_settings(cfg: ServeConfig, model_path: str) -> None:
    """Parse the engine's settings as the replicas will (vLLM's own parser), so that a flag vLLM
    refuses is one UserError here instead of a replica failing to start inside Ray."""
    import torch

    from serve.deployment import engine_plan
    from serve.engine import engine_args

    engine_args(cfg, model_path, engine_plan(cfg, model_path), on_cpu=not torch.cuda.is_available())


def drain(log: Callable[[str], None], grace_s: float, now: threading.Event | None = None) -> None:
    """Stop taking requests and let the running ones finish before anything is torn down.

    Ray Serve's own shutdown stops the HTTP proxies first, which cuts streams that are still
    being answered; so the ingress refuses new work (503, /ready fails) and is asked how many
    requests remain until none do or the grace period ends.
    """
    from ray import serve

    from serve.deployment import APP_NAME

    handle = serve.get_app_handle(APP_NAME)
    deadline = time.time() + grace_s
    running = handle.drain.remote().result()
    log(f"shutting down: {running} request(s) in flight; new ones get 503 (up to {grace_s:.0f}s to finish; "
        "Ctrl-C again to stop now)")
    now = now or threading.Event()
    while running and time.time() < deadline and not now.wait(1.0):
        running = handle.drain.remote().result()
    if running:
        log(f"{running} request(s) cut short" + ("" if now.is_set() else " (grace period over)"))
