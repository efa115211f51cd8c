"""Adapters from an S3-compatible bucket (moto's server on 127.0.0.1) through fsspec/s3fs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from lorafleet.net import free_port

from serve.errors import OpenAIError
from serve.registry import AdapterRegistry


@pytest.fixture(scope="module")
def s3(tiny_adapters):
    pytest.importorskip("s3fs")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": url}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        for _ in range(50):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.1)
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": url})
        fs.mkdir("adapters")
        for name in ("alpha", "beta"):
            for f in (tiny_adapters / name).iterdir():
                fs.put(str(f), f"adapters/team/{name}/{f.name}")
        yield fs
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait()


def test_s3_source_lists_downloads_and_gates(s3, tiny_base, tmp_path):
    from lorafleet.models import module_shapes

    reg = AdapterRegistry(["s3://adapters/team"], tmp_path / "cache", base_shapes=module_shapes(str(tiny_base)),
                          max_lora_rank=16)
    assert set(reg.scan()) == {"alpha", "beta"}
    a = reg.prepare(reg.get("beta"))
    assert a.local_path.is_dir() and (a.local_path / "adapter_model.safetensors").is_file()
    assert a.info.rank == 16
    assert reg.prepare(reg.get("beta")).local_path == a.local_path  # downloaded once
    # a bucket object that is not an adapter's safetensors: refused clearly
    s3.pipe("adapters/team/gamma/adapter_config.json", b'{"peft_type": "LORA", "r": 8}')
    s3.pipe("adapters/team/gamma/adapter_model.safetensors", b"garbage")
    reg.scan()
    with pytest.raises(OpenAIError) as e:
        reg.prepare(reg.get("gamma"))
    assert e.value.status == 422 and "corrupt" in e.value.message
    # a rank the engine was not started for
    small = AdapterRegistry(["s3://adapters/team"], tmp_path / "cache2", max_lora_rank=8)
    small.scan()
    with pytest.raises(OpenAIError, match="rank 16"):
        small.prepare(small.get("beta"))


REPLICA = """
import asyncio, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from serve.adapters import AdapterCache
from serve.contract import AdapterRef
from test_serve_adapters import FakeEngine
cache = AdapterCache(FakeEngine(), sys.argv[2], max_resident=2)
ref = AdapterRef("alpha", sys.argv[3], "v1", uri="s3://adapters/team/alpha")
lora, loaded, _ = asyncio.run(cache.acquire(ref))
print("RESULT" + json.dumps({"loaded": loaded, "path": lora.lora_path}))
"""


def test_a_replica_fetches_an_s3_adapter_itself(s3, tmp_path, root):
    """An engine replica on another node has no access to the front's cache: given the adapter's
    S3 source, the replica's process fetches the files into its own directory and loads them."""
    import json
    from pathlib import Path

    own = tmp_path / "replica-own-cache"
    front_path = tmp_path / "front-cache-on-another-node" / "alpha"  # never created here
    out = subprocess.run([sys.executable, "-c", REPLICA, str(root), str(own), str(front_path)],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ))
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, out.stderr[-2000:]
    result = json.loads(line[0][6:])
    assert result["loaded"] and result["path"].startswith(str(own))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in Path(result["path"]).iterdir()}
    assert not front_path.exists()
