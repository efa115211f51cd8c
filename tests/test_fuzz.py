"""Schemathesis against the front's own OpenAPI schema (models, admin, probes): generated
requests never get a 5xx. The replica is a stand-in (tests/test_serve_front.py), so hundreds of
requests take seconds; the OpenAI routes themselves are vLLM's (tests/test_openai_compat.py).
"""

from __future__ import annotations

import shutil

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from lorafleet.config import LimitsSection  # noqa: E402
from serve.registry import AdapterRegistry  # noqa: E402
from serve.routes import Frontend, build_app  # noqa: E402


def _app():
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    import tempfile

    from fixtures import build_tiny_llama, make_random_adapter
    from test_serve_front import FakeReplica

    tmp = Path(tempfile.mkdtemp(prefix="lorafleet-fuzz-"))
    base = build_tiny_llama(tmp / "base", root)
    make_random_adapter(base, tmp / "adapters" / "alpha", seed=1)
    reg = AdapterRegistry([str(tmp / "adapters")], tmp / "cache", max_lora_rank=16)
    reg.scan()
    fe = Frontend(served_name="tiny", registry=reg, backend=FakeReplica(), max_model_len=128,
                  limits=LimitsSection(max_body_bytes=32 * 1024))
    app = build_app(fe)
    app.state.tmp = tmp
    return app


APP = _app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    if case.path in ("/v1/load_lora_adapter",):
        pytest.skip("loads adapters from generated paths: covered by test_serve_front")
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}"


def teardown_module():
    shutil.rmtree(APP.state.tmp, ignore_errors=True)
