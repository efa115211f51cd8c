"""The serve-cpu container image (built by `make image-cpu`), started with podman on 127.0.0.1:
health, then an answer through the openai client with an adapter. Slow: `make test-slow`."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx
import openai
import pytest

from lorafleet.net import free_port

IMAGE = os.environ.get("LORAFLEET_IMAGE", "localhost/lorafleet-serve-cpu:0.1.0")
pytestmark = pytest.mark.slow


def _have_image() -> str | None:
    if not shutil.which("podman"):
        return "podman is not installed (apt-get install podman runc)"
    if subprocess.run(["podman", "image", "exists", IMAGE]).returncode != 0:
        return f"image {IMAGE} not built (make image-cpu)"
    return None


def wait_healthy(url: str, name: str, env: dict, t0: float, timeout: float) -> None:
    """Until the container `name` answers GET /health with 200; fails with its log after `timeout` s."""
    while time.time() - t0 < timeout:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True, env=env)
    pytest.fail(f"container not healthy after {timeout:.0f} s:\n{(logs.stdout + logs.stderr)[-3000:]}")


def test_serve_cpu_container_answers_with_an_adapter(tiny_base, tiny_adapters, tmp_path, root):
    why = _have_image()
    if why:
        pytest.skip(why)
    models, adapters = tmp_path / "base", tmp_path / "adapters"
    shutil.copytree(tiny_base, models)
    shutil.copytree(tiny_adapters, adapters)
    for d in (models, adapters):  # the image runs as UID 1000
        subprocess.run(["chmod", "-R", "a+rX", str(d)], check=True)
    port = free_port()
    name = f"lorafleet-test-{port}"
    env = dict(os.environ, CONTAINERS_CONF=str(root / ".cache" / "image" / "containers.conf"))
    cmd = ["podman", "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:8000", "--shm-size=1g",
           "-v", f"{models}:/models/base:ro", "-v", f"{adapters}:/adapters:ro", "-e", "LORAFLEET_API_KEY=sk-img",
           IMAGE, "--model", "/models/base", "--served-model-name", "tiny", "--adapters", "/adapters",
           "--host", "0.0.0.0", "--port", "8000", "--set", "engine.dtype=float32",
           "--set", "engine.max_model_len=256", "--set", "engine.cpu_kvcache_space_gb=0.5"]
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, name, env, t0, 420)
        ready_s = time.time() - t0
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-img", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tiny", "alpha", "beta"}
        r = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                           extra_body={"ignore_eos": True})
        assert r.choices[0].message.content and r.usage.completion_tokens > 0
        print(f"container healthy in {ready_s:.0f}s")
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, env=env)


EDGE_IMAGE = os.environ.get("LORAFLEET_EDGE_IMAGE", "localhost/lorafleet-serve-edge:0.1.0")


def test_serve_edge_container_answers_read_only_as_uid_1000(tiny_base, tiny_adapters, tmp_path, root):
    """The serve-edge image (make image-edge): no torch in it, runs as UID 1000 with a read-only root
    filesystem and /tmp a tmpfs, answers through the openai client with an adapter, healthy by its
    HEALTHCHECK."""
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (apt-get install podman runc)")
    if subprocess.run(["podman", "image", "exists", EDGE_IMAGE]).returncode != 0:
        pytest.skip(f"image {EDGE_IMAGE} not built (make image-edge)")
    from merge.onnx import export_onnx
    from merge.onnx_adapters import convert_adapter

    export = export_onnx(tiny_base, tmp_path / "model", max_lora_rank=16, log=lambda *_: None)
    adapters = tmp_path / "adapters"
    convert_adapter(export, tiny_adapters / "alpha", out_dir=adapters)
    subprocess.run(["chmod", "-R", "a+rX", str(tmp_path)], check=True)
    env = dict(os.environ, CONTAINERS_CONF=str(root / ".cache" / "image" / "containers.conf"))
    no_torch = subprocess.run(["podman", "run", "--rm", "--entrypoint", "python", EDGE_IMAGE, "-c",
                               "import importlib.util as u; print([m for m in ('torch', 'vllm', 'ray', 'peft') "
                               "if u.find_spec(m)])"], capture_output=True, text=True, env=env)
    assert no_torch.stdout.strip() == "[]", no_torch.stderr
    port = free_port()
    name = f"lorafleet-edge-test-{port}"
    cmd = ["podman", "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:8000", "--read-only",
           "--tmpfs", "/tmp", "-v", f"{export}:/model:ro", "-v", f"{adapters}:/adapters:ro",
           "-e", "LORAFLEET_API_KEY=sk-img", EDGE_IMAGE, "--set", "model=/model", "--set", "served_model_name=tiny",
           "--set", "host=0.0.0.0", "--set", "port=8000", "--set", "adapters=[/adapters]"]
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, name, env, t0, 120)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-img", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tiny", "alpha"}
        r = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                           extra_body={"ignore_eos": True})
        assert r.choices[0].message.content and r.usage.completion_tokens == 8
        user = subprocess.run(["podman", "exec", name, "id", "-u"], capture_output=True, text=True, env=env)
        assert user.stdout.strip() == "1000"
        health = subprocess.run(["podman", "healthcheck", "run", name], capture_output=True, text=True, env=env)
        assert health.returncode == 0, health.stdout + health.stderr
        print(f"edge container healthy in {time.time() - t0:.0f}s")
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, env=env)
