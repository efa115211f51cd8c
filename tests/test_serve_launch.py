"""`lorafleet serve` around the app: flags, Ray settings, the port, the engine watch, the
RayService entry point (no engine needed)."""

from __future__ import annotations

import os
import time

import pytest


class DyingEngine:
    dead = False


def test_api_key_flag_like_vllms(monkeypatch):
    from typer.testing import CliRunner

    import serve.launch
    from lorafleet.cli import app

    seen = {}
    monkeypatch.setattr(serve.launch, "launch", lambda cfg, log: seen.update(cfg=cfg, keys=os.environ["LORAFLEET_API_KEY"]))
    monkeypatch.setenv("LORAFLEET_API_KEY", "sk-env")
    r = CliRunner().invoke(app, ["serve", "--model", "m", "--api-key", "sk-a", "--api-key", "sk-b"])
    assert r.exit_code == 0, r.output
    assert seen["keys"] == "sk-env,sk-a,sk-b" and seen["cfg"].model == "m"


def test_a_dead_engine_ends_the_replica_process():
    # vLLM does not restart its engine: the replica's process ends (exit code 70) so that Ray Serve
    # starts a new one, as vLLM's own server exits. An engine shut down on purpose is no death.
    from serve.deployment import EngineWatch

    engine, exits = DyingEngine(), []
    EngineWatch(engine, poll_s=0.01, exit=exits.append)
    time.sleep(0.1)
    assert exits == []
    engine.dead = True
    deadline = time.time() + 5
    while not exits and time.time() < deadline:
        time.sleep(0.01)
    assert exits == [70]

    engine, exits = DyingEngine(), []
    watch = EngineWatch(engine, poll_s=0.01, exit=exits.append)
    watch.stop()
    engine.dead = True
    watch.thread.join(5)
    assert exits == [] and not watch.thread.is_alive()


def test_a_dead_engine_restarts_in_place_within_a_budget():
    # Fused: a new engine in the same process, at most max_restarts times in window_s; then (a
    # crash loop) the process ends and Ray Serve starts a new replica.
    import asyncio
    import threading

    from serve.deployment import EngineWatch

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    class Restartable(DyingEngine):
        starts = 0

        async def restart_engine(self, start):
            start()
            self.starts += 1
            self.dead = False

    engine, exits = Restartable(), []
    EngineWatch(engine, poll_s=0.01, exit=exits.append, restart=lambda: None, loop=loop, max_restarts=2)
    for n in (1, 2):
        engine.dead = True
        deadline = time.time() + 5
        while engine.starts < n and time.time() < deadline:
            time.sleep(0.01)
        assert engine.starts == n and exits == []
    engine.dead = True  # a third death inside the window: the process ends
    deadline = time.time() + 5
    while not exits and time.time() < deadline:
        time.sleep(0.01)
    assert exits == [70] and engine.starts == 2
    loop.call_soon_threadsafe(loop.stop)


def test_lean_ray_defaults_only_for_a_ray_started_here():
    from serve.launch import LOCAL_RAY_DEFAULTS, local_ray_environment

    assert local_ray_environment(None, {}) == LOCAL_RAY_DEFAULTS
    assert local_ray_environment("ray://head:10001", {}) == {}  # a cluster has its own settings
    assert local_ray_environment(None, {"RAY_ADDRESS": "head:6379"}) == {}
    kept = local_ray_environment(None, {"RAY_enable_metrics_collection": "1"})
    assert "RAY_enable_metrics_collection" not in kept and len(kept) == len(LOCAL_RAY_DEFAULTS) - 1


def test_who_listens_on_the_port():
    from lorafleet.config import ServeConfig
    from serve.launch import replica_listens

    assert replica_listens(ServeConfig(), {})  # lorafleet's own Ray, one replica: the replica listens
    assert not replica_listens(ServeConfig(address="ray://head:10001"), {})  # a cluster keeps Ray's proxy
    assert not replica_listens(ServeConfig(), {"RAY_ADDRESS": "head:6379"})
    assert not replica_listens(ServeConfig(autoscaling={"max_replicas": 2}), {})  # several replicas: routed
    assert not replica_listens(ServeConfig(http_listener="proxy"), {})
    assert replica_listens(ServeConfig(http_listener="replica", address="ray://head:10001"), {})
    with pytest.raises(ValueError, match="http_listener replica needs the fused topology"):
        ServeConfig(http_listener="replica", topology="split")


def test_taken_port_is_one_clear_error_before_ray_starts():
    import socket

    from lorafleet.config import ServeConfig
    from lorafleet.errors import UserError
    from serve.launch import launch

    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        with pytest.raises(UserError, match=rf"cannot listen on 127.0.0.1:{port} .*--port"):
            launch(ServeConfig(port=port), log=lambda m: None)


def test_rayservice_entrypoint_keeps_rays_proxy():
    from lorafleet.errors import UserError
    from serve.entrypoint import build

    with pytest.raises(UserError, match="http_listener replica is for `lorafleet serve`"):
        build({"http_listener": "replica"})


def test_engine_settings_vllm_refuses_are_one_clear_error_before_ray_starts(tiny_base):
    from lorafleet.config import ServeConfig
    from lorafleet.errors import UserError
    from serve.launch import check_engine_settings

    cfg = ServeConfig(model=str(tiny_base), structured_outputs_config={"disable_any_whitespace": True})
    with pytest.raises(UserError, match="disable_any_whitespace is only supported for xgrammar"):
        check_engine_settings(cfg, str(tiny_base))
    with pytest.raises(UserError, match="vLLM refused the engine settings.*--no-such-flag"):
        check_engine_settings(ServeConfig(model=str(tiny_base), engine={"extra_args": ["--no-such-flag"]}),
                              str(tiny_base))
    check_engine_settings(ServeConfig(model=str(tiny_base), tool_call_parser="hermes", enable_auto_tool_choice=True,
                                      engine={"extra_args": ["--enable-prefix-caching"]}), str(tiny_base))


def test_tool_flags_like_vllms(monkeypatch):
    from typer.testing import CliRunner

    import serve.launch
    from lorafleet.cli import app

    seen = {}
    monkeypatch.setattr(serve.launch, "launch", lambda cfg, log: seen.update(cfg=cfg))
    r = CliRunner().invoke(app, ["serve", "--model", "m", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                                 "--reasoning-parser", "qwen3"])
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert (cfg.enable_auto_tool_choice, cfg.tool_call_parser, cfg.reasoning_parser) == (True, "hermes", "qwen3")


def test_a_missing_key_file_stops_the_server_before_ray_starts(tmp_path):
    from lorafleet.config import ServeConfig
    from lorafleet.errors import UserError
    from lorafleet.net import free_port
    from serve.launch import launch

    cfg = ServeConfig(port=free_port(), api_keys_file=str(tmp_path / "keys" / "api-keys"))
    with pytest.raises(UserError, match=r"key file .*api-keys cannot be read"):
        launch(cfg, log=lambda m: None)
    (tmp_path / "admin").write_text("\n")
    cfg = ServeConfig(port=free_port(), admin_keys_file=str(tmp_path / "admin"))
    with pytest.raises(UserError, match="holds no key"):
        launch(cfg, log=lambda m: None)
