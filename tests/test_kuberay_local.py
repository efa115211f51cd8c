"""The rendered RayService brought up as KubeRay brings it up (tests/kuberay_local.py), on this
machine: Ray head and worker from the manifest's own rayStartParams and env, token auth on, the
manifest's serveConfigV2 submitted through the dashboard's Serve REST API. Minutes of Ray and
vLLM start-up: `make test-slow`."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from kuberay_local import LocalRayService, copy_model, local_serve_config
from k8s import check as kc
from lorafleet.net import free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
MSGS = [{"role": "user", "content": "What is the warranty of the Kestrel K9?"}]


def test_rayservice_comes_up_waits_for_its_model_and_serves_later_adapters(tiny_base, tmp_path):
    from fixtures import make_random_adapter

    rs = next(d for d in kc.render(kc.ROOT / "k8s" / "overlays" / "cpu-edge") if d["kind"] == "RayService")
    models, adapters, keys = tmp_path / "models", tmp_path / "adapters", tmp_path / "keys"
    for d in (models, adapters, keys):
        d.mkdir()
    (keys / "api-keys").write_text("sk-user\n")
    (keys / "admin-keys").write_text("sk-admin\n")
    make_random_adapter(tiny_base, adapters / "alpha", seed=1, r=8)
    port = free_port()
    config = local_serve_config(rs, {"/models": str(models), "/adapters": str(adapters),
                                     "/etc/lorafleet/keys": str(keys)}, port,
                                engine={"dtype": "float32", "max_model_len": 256, "cpu_kvcache_space_gb": 0.5})
    svc = LocalRayService(rs, tmp_path)
    assert svc.token, "the manifest's authOptions turn token auth on"
    svc.start()
    try:
        # a client without the cluster's token is refused; the operator's (KubeRay's header) is not
        assert httpx.get(f"{svc.dashboard}/api/serve/applications/", headers=svc.headers(None)).status_code in (401, 403)
        assert httpx.get(f"{svc.dashboard}/api/serve/applications/", headers=svc.headers("wrong")).status_code in (401, 403)
        r = svc.submit(config)
        assert r.status_code == 200, r.text
        time.sleep(20)  # the model is not on the volume yet: the app waits, it does not fail
        assert svc.app_status() in ("NOT_STARTED", "DEPLOYING"), svc.app_status()
        copy_model(tiny_base, models / "base")
        wait_for(lambda: svc.app_status() == "RUNNING", 900, "the app RUNNING")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-user", max_retries=0)
        wait_for(lambda: _answers(client, "base"), 300, "an answer from the base")
        assert client.chat.completions.create(model="alpha", messages=MSGS, max_tokens=4).choices
        # an adapter copied in later, at a rank above any present at start, is served
        make_random_adapter(tiny_base, adapters / "wide", seed=2, r=32)
        r = client.chat.completions.create(model="wide", messages=MSGS, max_tokens=4)
        assert r.model == "wide" and r.usage.completion_tokens == 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        svc.stop()


def _answers(client, model):
    try:
        return client.chat.completions.create(model=model, messages=MSGS, max_tokens=2).choices
    except (openai.APIConnectionError, openai.APIStatusError):
        return None
