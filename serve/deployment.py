"""Ray Serve application, in one of two shapes (`topology` in the serve config).

split (several replicas):

    client ──HTTP──▶ Ingress (serve/routes.py: keys, limits, registry, /v1/models, admin)
                        │  handle.options(multiplexed_model_id=<adapter>).handle(ReplicaRequest)
                        ▼
                     LLMServer replicas (serve/openai_serving.py: vLLM's serving classes over
                     AsyncLLM, resident adapters), autoscaled

The ingress names the adapter as the request's multiplexed model id, so Ray Serve routes it
to a replica that already holds that adapter when there is one (no reload, no swap).
Requests for different adapters on one replica are batched together by vLLM.

fused (one replica, the default when max_replicas is 1): the front and the engine in one
replica. With nothing to route, the ingress hop only cost CPU: every streamed chunk crossed one
more process boundary. Where `lorafleet serve` runs its own Ray, the fused replica also takes
the HTTP connections itself (serve/listener.py), so Ray Serve's proxy is left out too:

    client ──HTTP──▶ LLMServer replica (front + vLLM's serving over AsyncLLM)
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ray import serve

from lorafleet.config import ServeConfig

log = logging.getLogger("lorafleet.serve")
APP_NAME = "lorafleet"
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def bind_replica_grpc_to_node_ip() -> None:
    """Ray Serve 2.60 binds each replica's inter-deployment gRPC server to every interface
    (`"[::]:0"`, ray/serve/_private/replica.py `_on_initialized`), while Ray core binds its own
    servers to the node's IP (ray-project/ray#59852), the address other nodes use to reach the
    replica. Bind that one there too: on a local Ray (whose node address is loopback, see
    serve/launch.py) nothing of the replica is then reachable from outside. Idempotent; the
    replica module is Ray's, so this wraps only that one call and leaves others as they are."""
    from ray.serve._private import replica

    add_port = getattr(replica, "add_port_to_grpc_server", None)
    if add_port is None or getattr(add_port, "binds_node_ip", False):
        return  # another Ray Serve (nothing to wrap), or wrapped already

    def add_port_at_node_ip(server, address):
        if address == "[::]:0":
            import ray

            ip = ray.util.get_node_ip_address()
            address = f"[{ip}]:0" if ":" in ip else f"{ip}:0"
        return add_port(server, address)

    add_port_at_node_ip.binds_node_ip = True
    replica.add_port_to_grpc_server = add_port_at_node_ip


bind_replica_grpc_to_node_ip()  # runs in every replica process: Ray imports this module to build it


def engine_plan(cfg: ServeConfig, model_path: str) -> dict[str, Any]:
    """Resolve what the config leaves open: LoRA on/off, max rank and adapters per batch.

    Set `engine.max_lora_rank` (and `max_loras`) in a deployment whose adapters arrive later: unset,
    the rank is the largest found in the sources at start, at least 16 (vLLM's default), so a
    local `lorafleet serve` takes the adapters it is given.
    """
    enable_lora = cfg.engine.enable_lora if cfg.engine.enable_lora is not None else bool(cfg.adapters)
    rank = cfg.engine.max_lora_rank
    if rank is None:
        from serve.registry import AdapterRegistry

        reg = AdapterRegistry(cfg.adapters, cache_dir=Path("/tmp"), allow_pickle=True)
        reg.scan(gate=False)
        rank = next((r for r in VLLM_LORA_RANKS if r >= max(reg.max_rank(), 16)), 512)
    max_loras = cfg.engine.max_loras or max(1, min(8, cfg.max_resident_adapters))
    return {"enable_lora": enable_lora, "max_lora_rank": rank, "max_loras": max_loras,
            "max_cpu_loras": cfg.engine.max_cpu_loras or cfg.max_resident_adapters}


def build_frontend(cfg: ServeConfig, model_path: str, backend: Any, max_model_len: int, max_lora_rank: int):
    """The front (serve/routes.py) for this deployment: registry, keys, limits."""
    from lorafleet.models import base_fingerprint, cache_root, module_shapes
    from serve.auth import read_keys
    from serve.fleet import start_router
    from serve.registry import AdapterRegistry, log_adapters
    from serve.routes import Frontend

    fp = base_fingerprint(model_path)["fingerprint"] if Path(model_path).is_dir() else None
    targets = lora_target_modules(cfg.engine.extra_args)
    registry = AdapterRegistry(cfg.adapters, cache_dir=cache_root() / "adapters",
                               base_shapes=lambda: module_shapes(model_path), base_fingerprint=fp,
                               max_lora_rank=max_lora_rank, allow_pickle=cfg.allow_pickle,
                               max_adapter_bytes=cfg.limits.max_adapter_bytes,
                               base_name=cfg.served_model_name or cfg.model, require_eval=cfg.registry.require_eval,
                               lora_target_modules=targets,
                               packed_modules=packed_modules_mapping(model_path) if targets is not None else None)
    registry.scan()
    fleet = start_router(cfg.fleet_file, registry, cfg.registry.require_eval, cfg.fleet_poll_s)
    log_adapters(registry, model_path)
    return Frontend(served_name=cfg.served_model_name or cfg.model, registry=registry, backend=backend,
                    max_model_len=max_model_len, limits=cfg.limits,
                    api_keys=read_keys("LORAFLEET_API_KEY", cfg.api_keys_file),
                    admin_keys=read_keys("LORAFLEET_ADMIN_KEY", cfg.admin_keys_file), root_model=cfg.model,
                    fleet=fleet)


def lora_target_modules(extra_args: list[str]) -> list[str] | None:
    """vLLM's --lora-target-modules in `engine.extra_args` (None: every LoRA module), as vLLM's
    own server parser reads it (so `--lora_target_modules`, `--lora-target-modules=a` alike)."""
    if not any("target" in a for a in extra_args):
        return None
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve", exit_on_error=False))
    return parser.parse_args(list(extra_args)).lora_target_modules


def packed_modules_mapping(model_path: str) -> dict[str, list[str]]:
    """The vLLM model class's packed_modules_mapping ({"qkv_proj": ["q_proj", ...]}) for this
    base's architecture; {} when vLLM has no class for it or the config cannot be read."""
    try:
        from transformers import AutoConfig
        from vllm.model_executor.models.registry import ModelRegistry

        arch = (AutoConfig.from_pretrained(model_path).architectures or [""])[0]
        cls = ModelRegistry._try_load_model_cls(arch)
    except Exception:
        return {}
    return dict(getattr(cls, "packed_modules_mapping", None) or {})


class LocalBackend:
    """The replica in this process (fused topology, tests). `replica` may be given later: Ray
    Serve builds the front's app and the replica's engine in either order, and routes no request
    before both exist."""

    def __init__(self, replica: Any = None):
        self.replica = replica

    def handle(self, req):
        return (self.replica or _REPLICA["replica"]).handle(req)

    def replica_gone(self, e: BaseException) -> bool:
        return False  # the replica is this process

    async def serve_asgi(self, req, receive, send, on_start):
        return await (self.replica or _REPLICA["replica"]).serve_asgi(req, receive, send, on_start)

    async def unload(self, name):
        await (self.replica or _REPLICA["replica"]).unload(name)

    async def health(self):
        await (self.replica or _REPLICA["replica"]).check_ready()


class RayBackend:
    """Engine replicas behind a Ray Serve deployment handle. With `affinity` the adapter's name is
    the request's multiplexed model id, so Ray Serve routes it to a replica that holds that
    adapter; without, the router ignores the adapter."""

    def __init__(self, deployment, affinity: bool = True):
        self.deployment, self.affinity = deployment, affinity

    async def handle(self, req):
        name = req.adapter.name if req.adapter is not None and self.affinity else ""
        gen = self.deployment.options(stream=True, multiplexed_model_id=name).handle.remote(req)
        try:
            async for ev in gen:
                yield ev
        finally:
            gen.cancel()  # the client went away or the answer ended: free the engine slot

    def replica_gone(self, e: BaseException) -> bool:
        """Ray's word that the replica's actor died or cannot be reached (its node is gone)."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        return isinstance(e, (RayActorError, ActorUnavailableError))

    async def unload(self, name):
        await self.deployment.unload.remote(name)

    async def health(self):
        await self.deployment.check_health.remote()


def _log_to_stderr() -> None:
    """In a replica, lorafleet's own messages (adapter loads, evictions, the engine plan) go to
    stderr, which Ray forwards to the driver's log, next to Ray Serve's and vLLM's."""
    lf = logging.getLogger("lorafleet")
    if not lf.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s -- %(message)s"))
        lf.addHandler(h)
        lf.setLevel(logging.INFO)


# LORAFLEET_ENGINE_RESTART=replica: a fused replica whose engine dies ends, and Ray Serve starts
# a new one, instead of starting a new engine in place (bench/recovery.py compares the two).
RESTART_SETTING = "LORAFLEET_ENGINE_RESTART"
RESTART_TIMEOUT_S = 600  # a new engine not up by then: the replica ends (Ray Serve starts another)

# What a replica builds (its OpenAIReplica and the engine's watch; in the fused one also the
# front and its listener), for the deployment class's own methods (health check, drain,
# teardown), which have no other way to reach it. One replica per process.
_REPLICA: dict[str, Any] = {}


class EngineWatch:
    """Acts when this replica's vLLM engine dies (vLLM does not restart a dead engine process).

    With `restart` (the fused topology: one replica, nothing else to send requests to), a new
    engine is started in this process, up to `max_restarts` times in `window_s`: the replica's
    process, its imports and its listener stay, so it answers again sooner than a new replica
    would (bench/recovery.py). Otherwise, or past that budget (a crash loop), the process ends,
    as vLLM's own server does, and Ray Serve starts a new replica; left to the health check it
    would replace it only after three failed checks 5 s apart (about 15 s more of errors).
    """

    def __init__(self, replica: Any, poll_s: float = 0.5, exit: Callable[[int], None] = os._exit,
                 restart: Callable[[], Any] | None = None, loop: asyncio.AbstractEventLoop | None = None,
                 max_restarts: int = 3, window_s: float = 600.0):
        self.replica, self.poll_s, self._exit = replica, poll_s, exit
        self.restart, self.loop = restart, loop
        self.max_restarts, self.window_s = max_restarts, window_s
        self.restarts: list[float] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="lorafleet-engine-watch", daemon=True)
        self.thread.start()
        # vLLM's own exit handlers mark the engine dead: an exiting process is not a dying engine
        atexit.register(self.stop)

    def _watch(self) -> None:
        while not self.stopping.wait(self.poll_s):
            if self.replica.dead and not self.stopping.is_set():
                if self._restart_in_place():
                    continue
                log.error("the vLLM engine process has died: ending this replica so that Ray Serve starts a new one")
                for h in logging.getLogger("lorafleet").handlers:
                    h.flush()
                sys.stderr.flush()
                self._exit(70)
                return

    def _restart_in_place(self) -> bool:
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < self.window_s]
        if self.restart is None or self.loop is None or len(self.restarts) >= self.max_restarts:
            return False
        self.restarts.append(now)
        log.error("the vLLM engine process has died: starting a new one in this replica (%d of at most %d in %.0f s)",
                  len(self.restarts), self.max_restarts, self.window_s)
        try:
            asyncio.run_coroutine_threadsafe(self.replica.restart_engine(self.restart), self.loop).result(
                timeout=RESTART_TIMEOUT_S)
        except Exception as e:  # a new engine that cannot start (or hangs): a new replica may
            log.error("the new engine did not start (%s)", e)
            return False
        log.info("a new engine answers in this replica")
        return True

    def stop(self) -> None:
        """Before the engine is shut down on purpose."""
        self.stopping.set()


async def _make_replica(cfg_json: str, model_path: str, plan: dict[str, Any], restart_in_place: bool = False):
    """This process's engine and vLLM's OpenAI serving over it (serve/openai_serving.py).
    `restart_in_place`: a dead engine is replaced in this process (EngineWatch)."""
    import torch

    from lorafleet.models import cache_root
    from serve.engine import engine_args, start_engine
    from serve.openai_serving import OpenAIReplica

    _log_to_stderr()
    c = ServeConfig.model_validate_json(cfg_json)
    args = engine_args(c, model_path, plan, on_cpu=not torch.cuda.is_available())
    engine = start_engine(args, c.engine.cpu_reserved_cores)
    replica = await OpenAIReplica.create(engine, args, cache_root() / "replicas" / str(os.getpid()),
                                         c.max_resident_adapters)
    restart_in_place = restart_in_place and os.environ.get(RESTART_SETTING, "in_place") == "in_place"
    _REPLICA["engine_watch"] = EngineWatch(
        replica, restart=(lambda: start_engine(args, c.engine.cpu_reserved_cores)) if restart_in_place else None,
        loop=asyncio.get_running_loop())
    _REPLICA["replica"] = replica
    if "frontend" in _REPLICA:  # fused: the front's app may have been built first
        _REPLICA["frontend"].max_model_len = replica.max_model_len
    return replica


def build_app(cfg: ServeConfig, model_path: str, listen: tuple[str, int] | None = None):
    """The Ray Serve application for `serve.run`. `listen` (host, port): the fused replica takes
    HTTP connections itself there (serve/listener.py) instead of behind Ray Serve's proxy; the
    config allows it only with the fused topology (ServeConfig's validator)."""
    plan = engine_plan(cfg, model_path)
    cfg_json = cfg.model_dump_json()
    max_resident = cfg.max_resident_adapters
    actor_options = {"num_cpus": cfg.resources.num_cpus, "num_gpus": cfg.resources.num_gpus,
                     "resources": dict(cfg.resources.resources),
                     "runtime_env": {"env_vars": {"RAY_worker_niceness": "0", "TOKENIZERS_PARALLELISM": "false"}}}
    # Ray Serve replaces a replica whose check fails: a dead engine process fails it.
    health = dict(health_check_period_s=5, health_check_timeout_s=30)
    if cfg.fused:
        return _fused_app(cfg_json, model_path, plan, actor_options, health, listen)

    @serve.deployment(
        name="LLMServer",
        autoscaling_config={
            "min_replicas": cfg.autoscaling.min_replicas, "max_replicas": cfg.autoscaling.max_replicas,
            "initial_replicas": cfg.autoscaling.initial_replicas or max(1, cfg.autoscaling.min_replicas),
            "target_ongoing_requests": cfg.autoscaling.target_ongoing_requests,
            "upscale_delay_s": cfg.autoscaling.upscale_delay_s,
            "downscale_delay_s": cfg.autoscaling.downscale_delay_s,
        },
        ray_actor_options=actor_options,
        max_ongoing_requests=cfg.engine.max_num_seqs * 2,
        graceful_shutdown_wait_loop_s=2, graceful_shutdown_timeout_s=120, **health,
    )
    class LLMServer:
        async def __init__(self):
            self.replica = await _make_replica(cfg_json, model_path, plan)

        @serve.multiplexed(max_num_models_per_replica=max_resident)
        async def _route_slot(self, model_id: str):
            # Tells Ray Serve which adapters this replica holds, so it routes their requests here.
            return model_id

        async def handle(self, req):
            """A ReplicaRequest from the ingress; yields Start, bytes, End (serve/contract.py)."""
            name = serve.get_multiplexed_model_id()
            if name:
                await self._route_slot(name)
            async for ev in self.replica.handle(req):
                yield ev

        async def unload(self, name: str) -> bool:
            return await self.replica.unload(name)

        async def max_model_len(self) -> int:
            return self.replica.max_model_len

        async def stats(self) -> dict[str, Any]:
            return self.replica.stats()

        async def check_health(self):
            await self.replica.check_health()

        def __del__(self):
            _shutdown(self.replica)

    @serve.deployment(name="Ingress", num_replicas=1,
                      ray_actor_options={"num_cpus": 0, "resources": dict(cfg.resources.ingress_resources)},
                      max_ongoing_requests=1000, graceful_shutdown_timeout_s=120)
    @serve.ingress(lambda: _split_front(cfg_json, model_path, plan))
    class Ingress:
        def __init__(self, llm_server):
            self.llm_server = llm_server  # bound so the engine deployment is part of this app

        async def drain(self) -> int:
            return _drain()

    return Ingress.bind(LLMServer.bind())


def _split_front(cfg_json: str, model_path: str, plan: dict[str, Any]):
    """The ingress's app: the front, over the engine deployment's replicas."""
    from serve.routes import build_app as build_http

    handle = serve.get_deployment_handle("LLMServer", app_name=APP_NAME)
    cfg = ServeConfig.model_validate_json(cfg_json)
    fe = build_frontend(cfg, model_path, RayBackend(handle, affinity=cfg.adapter_routing == "affinity"), max_model_len=0,
                        max_lora_rank=plan["max_lora_rank"])
    _REPLICA["frontend"] = fe
    app = build_http(fe)

    @app.on_event("startup")
    async def _learn_context():
        # the context length is the engine's to decide (model config, max_model_len)
        fe.max_model_len = await handle.max_model_len.remote()

    return app


def _fused_front(cfg_json: str, model_path: str, plan: dict[str, Any]):
    """The fused replica's front app, over the replica in this process. Module-level, like every
    function that touches _REPLICA: Ray pickles the deployment classes below by value, and a
    function pickled by value would see a copy of this module's globals."""
    from serve.routes import build_app as build_http

    replica = _REPLICA.get("replica")
    fe = build_frontend(ServeConfig.model_validate_json(cfg_json), model_path, LocalBackend(),
                        max_model_len=replica.max_model_len if replica else 0, max_lora_rank=plan["max_lora_rank"])
    _REPLICA["frontend"] = fe
    return build_http(fe)


async def _fused_start(cfg_json: str, model_path: str, plan: dict[str, Any], listen: tuple[str, int] | None) -> None:
    await _make_replica(cfg_json, model_path, plan, restart_in_place=True)
    if listen is not None:
        from serve.listener import ReplicaListener

        # on the replica's event loop: the engine's output handler and uvicorn share it
        _REPLICA["listener"] = await ReplicaListener.start(_fused_front(cfg_json, model_path, plan), *listen)


async def _fused_health() -> None:
    if "listener" in _REPLICA:
        _REPLICA["listener"].check()
    if "replica" in _REPLICA:
        await _REPLICA["replica"].check_health()


def _drain() -> int:
    return _REPLICA["frontend"].drain()


def _fused_stop() -> None:
    if "listener" in _REPLICA:
        _REPLICA["listener"].stop()
    if "replica" in _REPLICA:
        _shutdown(_REPLICA["replica"])


def _fused_app(cfg_json: str, model_path: str, plan: dict[str, Any], actor_options: dict, health: dict,
               listen: tuple[str, int] | None):
    options = dict(name="LLMServer", num_replicas=1, ray_actor_options=actor_options, max_ongoing_requests=1000,
                   graceful_shutdown_wait_loop_s=2, graceful_shutdown_timeout_s=120, **health)

    class FusedServer:
        async def __init__(self):
            await _fused_start(cfg_json, model_path, plan, listen)

        async def check_health(self):
            await _fused_health()

        async def drain(self) -> int:
            return _drain()

        def __del__(self):
            _fused_stop()

    if listen is None:
        return serve.deployment(**options)(
            serve.ingress(lambda: _fused_front(cfg_json, model_path, plan))(FusedServer)).bind()
    return serve.deployment(**options)(FusedServer).bind()


def _shutdown(replica: Any) -> None:
    watch = _REPLICA.pop("engine_watch", None)
    if watch:
        watch.stop()
    try:
        replica.shutdown()
    except Exception:  # best effort at teardown
        pass
