"""Ray Serve application, in one of two shapes (`topology` in the serve config).

split (several replicas):

    client ──HTTP──▶ Ingress (FastAPI: auth, limits, registry, templates)
                        │  handle.options(multiplexed_model_id=<adapter>)
                        ▼
                     LLMServer replicas (vLLM AsyncLLM + resident adapters), autoscaled

The ingress names the adapter as the request's multiplexed model id, so Ray Serve routes it
to a replica that already holds that adapter when there is one (no reload, no swap).
Requests for different adapters on one replica are batched together by vLLM.

fused (one replica, the default when max_replicas is 1): the same FastAPI app and the engine
in one replica. With nothing to route, the ingress hop only cost CPU: every streamed chunk
crossed one more process boundary. Where `lorafleet serve` runs its own Ray, the fused replica
also takes the HTTP connections itself (serve/listener.py), so Ray Serve's proxy is left out too:

    client ──HTTP──▶ LLMServer replica (FastAPI + vLLM AsyncLLM)
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from ray import serve

from lorafleet.config import ServeConfig
from serve.engine import ModelServer, VllmEngine, check_sampling

log = logging.getLogger("lorafleet.serve")
APP_NAME = "lorafleet"
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def read_keys(env: str, path: str | None) -> list[str]:
    keys = [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    if path:
        p = Path(path)
        if p.is_file():
            keys += [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return keys


def engine_plan(cfg: ServeConfig, model_path: str) -> dict[str, Any]:
    """Resolve what the config leaves open: LoRA on/off, max rank and adapters per batch."""
    from serve.registry import AdapterRegistry

    reg = AdapterRegistry(cfg.adapters, cache_dir=Path("/tmp"), allow_pickle=True)
    reg.scan()
    enable_lora = cfg.engine.enable_lora if cfg.engine.enable_lora is not None else bool(cfg.adapters)
    # At least 16 (vLLM's own default), so that adapters loaded later through the admin API are
    # not refused because the ones present at start were smaller. A fleet of rank-8 adapters
    # decodes faster with engine.max_lora_rank: 8 (vLLM pads every adapter to the maximum).
    rank = cfg.engine.max_lora_rank or next((r for r in VLLM_LORA_RANKS if r >= max(reg.max_rank(), 16)), 512)
    max_loras = cfg.engine.max_loras or max(1, min(8, len(reg.adapters) or 1, cfg.max_resident_adapters))
    return {"enable_lora": enable_lora, "max_lora_rank": rank, "max_loras": max_loras,
            "max_cpu_loras": cfg.engine.max_cpu_loras or cfg.max_resident_adapters}


def build_frontend(cfg: ServeConfig, model_path: str, backend: Any, max_model_len: int, max_lora_rank: int):
    from transformers import AutoTokenizer

    from lorafleet.models import base_fingerprint, cache_root, module_shapes
    from serve.app import Frontend
    from serve.registry import AdapterRegistry

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.engine.trust_remote_code)
    tpl = tok.chat_template or ""
    fp = base_fingerprint(model_path)["fingerprint"] if Path(model_path).is_dir() else None
    check_sampling({"max_tokens": 1})  # imports vLLM's SamplingParams now, not on the first request
    registry = AdapterRegistry(cfg.adapters, cache_dir=cache_root() / "adapters", base_shapes=module_shapes(model_path),
                               base_fingerprint=fp, max_lora_rank=max_lora_rank, allow_pickle=cfg.allow_pickle,
                               max_adapter_bytes=cfg.limits.max_adapter_bytes,
                               base_name=cfg.served_model_name or cfg.model)
    registry.scan()
    for name, why in registry.rejected.items():
        log.warning("adapter %s is not served: %s", name, why)
    return Frontend(served_name=cfg.served_model_name or cfg.model, tokenizer=tok, base_template=tpl,
                    registry=registry, backend=backend, max_model_len=max_model_len, limits=cfg.limits,
                    api_keys=read_keys("LORAFLEET_API_KEY", cfg.api_keys_file),
                    admin_keys=read_keys("LORAFLEET_ADMIN_KEY", cfg.admin_keys_file), root_model=cfg.model)


class LocalBackend:
    """The engine in this process (tests, benchmarks, a single-process server)."""

    def __init__(self, server: ModelServer):
        self.server = server

    def generate(self, call):
        return self.server.generate(call)

    async def unload(self, name):
        await self.server.unload(name)

    async def health(self):
        await self.server.engine.check_health()


class RayBackend:
    """Engine replicas behind a Ray Serve deployment handle."""

    def __init__(self, handle):
        self.handle = handle

    async def generate(self, call):
        name = call["adapter"]["name"] if call.get("adapter") else ""
        gen = self.handle.options(stream=True, multiplexed_model_id=name).generate.remote(call)
        try:
            async for ev in gen:
                yield ev
        finally:
            gen.cancel()  # the client went away or the stream ended: free the engine slot

    async def unload(self, name):
        await self.handle.unload.remote(name)

    async def health(self):
        await self.handle.health.remote()


def _log_to_stderr() -> None:
    """In a replica, lorafleet's own messages (adapter loads, evictions, the engine plan) go to
    stderr, which Ray forwards to the driver's log, next to Ray Serve's and vLLM's."""
    lf = logging.getLogger("lorafleet")
    if not lf.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s -- %(message)s"))
        lf.addHandler(h)
        lf.setLevel(logging.INFO)


# What a replica builds (the engine's watch; in the fused one the FastAPI factory's server and
# front end), for the deployment class's own methods (health check, drain, teardown), which have
# no other way to reach it. One replica per process.
_REPLICA: dict[str, Any] = {}


class EngineWatch:
    """Ends this replica's process when its vLLM engine dies, as vLLM's own server does.

    vLLM does not restart a dead engine process, so until the replica is replaced every request
    fails. Left to the health check, Ray Serve replaces it after three failed checks 5 s apart
    (about 15 s more of errors); a replica whose process has ended is replaced at once.
    """

    def __init__(self, engine: Any, poll_s: float = 0.5, exit: Callable[[int], None] = os._exit):
        self.engine, self.poll_s, self._exit = engine, poll_s, exit
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="lorafleet-engine-watch", daemon=True)
        self.thread.start()
        # vLLM's own exit handlers mark the engine dead: an exiting process is not a dying engine
        atexit.register(self.stop)

    def _watch(self) -> None:
        while not self.stopping.wait(self.poll_s):
            if self.engine.dead and not self.stopping.is_set():
                log.error("the vLLM engine process has died: ending this replica so that Ray Serve starts a new one")
                for h in logging.getLogger("lorafleet").handlers:
                    h.flush()
                sys.stderr.flush()
                self._exit(70)
                return

    def stop(self) -> None:
        """Before the engine is shut down on purpose."""
        self.stopping.set()


def _make_server(cfg_json: str, model_path: str, plan: dict[str, Any]) -> ModelServer:
    _log_to_stderr()
    c = ServeConfig.model_validate_json(cfg_json)
    engine = VllmEngine(model_path, c.engine, plan["enable_lora"], plan["max_lora_rank"], plan["max_loras"],
                        plan["max_cpu_loras"], c.served_model_name or c.model)
    _REPLICA["engine_watch"] = EngineWatch(engine)
    return ModelServer(engine, c.max_resident_adapters)


def build_app(cfg: ServeConfig, model_path: str, listen: tuple[str, int] | None = None):
    """The Ray Serve application for `serve.run`. `listen` (host, port): the fused replica takes
    HTTP connections itself there (serve/listener.py) instead of behind Ray Serve's proxy; the
    config allows it only with the fused topology (ServeConfig's validator)."""
    plan = engine_plan(cfg, model_path)
    cfg_json = cfg.model_dump_json()
    max_resident = cfg.max_resident_adapters
    actor_options = {"num_cpus": cfg.resources.num_cpus, "num_gpus": cfg.resources.num_gpus,
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
        def __init__(self):
            self.server = _make_server(cfg_json, model_path, plan)

        @serve.multiplexed(max_num_models_per_replica=max_resident)
        async def _route_slot(self, model_id: str):
            # Tells Ray Serve which adapters this replica holds, so it routes their requests here.
            return model_id

        async def generate(self, call: dict[str, Any]):
            name = serve.get_multiplexed_model_id()
            if name:
                await self._route_slot(name)
            async for ev in self.server.generate(call):
                yield ev

        async def unload(self, name: str) -> bool:
            return await self.server.unload(name)

        async def health(self) -> dict[str, Any]:
            await self.server.engine.check_health()
            return self.server.stats()

        async def max_model_len(self) -> int:
            return self.server.engine.max_model_len

        async def check_health(self):
            await self.server.engine.check_health()

        def __del__(self):
            _shutdown(self.server)

    def ingress_builder():
        from serve.app import build_app as build_http

        handle = serve.get_deployment_handle("LLMServer", app_name=APP_NAME)
        c = ServeConfig.model_validate_json(cfg_json)
        fe = build_frontend(c, model_path, RayBackend(handle), max_model_len=0,
                            max_lora_rank=plan["max_lora_rank"])
        _REPLICA["frontend"] = fe
        app = build_http(fe)

        @app.on_event("startup")
        async def _learn_context():
            # the context length is the engine's to decide (model config, max_model_len)
            fe.max_model_len = await handle.max_model_len.remote()

        return app

    @serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=1000, graceful_shutdown_timeout_s=120)
    @serve.ingress(ingress_builder)
    class Ingress:
        def __init__(self, llm_server):
            self.llm_server = llm_server  # bound so the engine deployment is part of this app

        async def drain(self) -> int:
            return _REPLICA["frontend"].drain()

    return Ingress.bind(LLMServer.bind())


def _fused_app(cfg_json: str, model_path: str, plan: dict[str, Any], actor_options: dict, health: dict,
               listen: tuple[str, int] | None):
    def fused_builder():
        from serve.app import build_app as build_http

        server = _make_server(cfg_json, model_path, plan)
        fe = build_frontend(ServeConfig.model_validate_json(cfg_json), model_path, LocalBackend(server),
                            max_model_len=server.engine.max_model_len, max_lora_rank=plan["max_lora_rank"])
        _REPLICA.update(server=server, frontend=fe)
        return build_http(fe)

    options = dict(name="LLMServer", num_replicas=1, ray_actor_options=actor_options, max_ongoing_requests=1000,
                   graceful_shutdown_wait_loop_s=2, graceful_shutdown_timeout_s=120, **health)

    class FusedServer:
        async def check_health(self):
            if "listener" in _REPLICA:
                _REPLICA["listener"].check()
            if "server" in _REPLICA:
                await _REPLICA["server"].engine.check_health()

        async def drain(self) -> int:
            return _REPLICA["frontend"].drain()

        def __del__(self):
            if "listener" in _REPLICA:
                _REPLICA["listener"].stop()
            if "server" in _REPLICA:
                _shutdown(_REPLICA["server"])

    if listen is None:
        return serve.deployment(**options)(serve.ingress(fused_builder)(FusedServer)).bind()

    class ListeningFusedServer(FusedServer):
        async def __init__(self):
            from serve.listener import ReplicaListener

            # on the replica's event loop: the engine's output handler and uvicorn share it
            _REPLICA["listener"] = await ReplicaListener.start(fused_builder(), *listen)

    return serve.deployment(**options)(ListeningFusedServer).bind()


def _shutdown(server: ModelServer) -> None:
    watch = _REPLICA.pop("engine_watch", None)
    if watch:
        watch.stop()
    try:
        server.engine.shutdown()
    except Exception:  # best effort at teardown
        pass
