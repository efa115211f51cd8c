"""A KubeRay-faithful local run: the rendered RayService brought up as KubeRay would, with local
processes instead of pods.

From the rendered manifest it takes what the operator takes: each group's `rayStartParams`
completed as KubeRay completes them (ray-operator/controllers/ray/common/pod.go:
setMissingRayStartParams, generateRayStartCommand: num-cpus and memory from the container's
limits, `block`, the agent port), the containers' env plus what KubeRay injects for
`authOptions: {mode: token}` (RAY_AUTH_MODE, RAY_AUTH_TOKEN), and `serveConfigV2`, submitted as
JSON with PUT /api/serve/applications/ to the head's dashboard with KubeRay's auth header. What
only a machine differs in is rewritten, and said: paths of the volumes, ports (free ones) and
hosts (127.0.0.1: nothing listens beyond loopback), and the engine settings of the tiny model.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

from k8s.check import ray_start_words
from lorafleet.net import free_port

KUBERAY_AGENT_PORT = 52365  # utils.DefaultDashboardAgentListenPort


def _quantity(q: str) -> int:
    """A Kubernetes quantity (4, 16Gi, 500m) as an integer (cores rounded down, bytes)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    q = str(q)
    if q.endswith("m"):
        return int(q[:-1]) // 1000
    for u, f in units.items():
        if q.endswith(u):
            return int(float(q[: -len(u)]) * f)
    return int(float(q))


def ray_start_params(group: dict[str, Any], head: bool) -> dict[str, str]:
    """rayStartParams as KubeRay completes them for this group's Ray container."""
    params = {k: str(v) for k, v in (group.get("rayStartParams") or {}).items()}
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    if "num-cpus" not in params and "cpu" in limits:
        params["num-cpus"] = str(_quantity(limits["cpu"]))
    if "memory" not in params and "memory" in limits:
        params["memory"] = str(_quantity(limits["memory"]))
    if head:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("dashboard-agent-listen-port", str(KUBERAY_AGENT_PORT))
    params["block"] = "true"
    return params


def container_env(group: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in group["template"]["spec"]["containers"][0].get("env", [])
            if "value" in e}


class LocalRayService:
    """Head and one worker of a rendered RayService as local `ray start` processes."""

    def __init__(self, rayservice: dict[str, Any], work: Path):
        self.rs, self.work = rayservice, work
        rc = rayservice["spec"]["rayClusterConfig"]
        self.token = secrets.token_hex(16) if rc.get("authOptions", {}).get("mode") == "token" else None
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.procs: list[subprocess.Popen] = []
        self.head_params = ray_start_params(rc["headGroupSpec"], head=True)
        self.worker_params = ray_start_params(rc["workerGroupSpecs"][0], head=False)
        self.head_env, self.worker_env = container_env(rc["headGroupSpec"]), container_env(rc["workerGroupSpecs"][0])

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(extra)
        env["RAY_worker_niceness"] = "0"
        if self.token:  # what KubeRay's SetContainerTokenAuthEnvVars gives every Ray container
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        return env

    def _argv(self, params: dict[str, str], head: bool) -> list[str]:
        p = dict(params)
        p.pop("block")  # `ray start` returns once the node is up; the processes stay
        if head:
            p.update({"port": str(self.gcs_port), "dashboard-port": str(self.dashboard_port),
                      "dashboard-host": "127.0.0.1", "node-ip-address": "127.0.0.1"})
        else:
            p.update({"address": f"127.0.0.1:{self.gcs_port}", "node-ip-address": "127.0.0.1"})
        p["dashboard-agent-listen-port"] = str(free_port())
        ray = str(Path(sys.executable).parent / "ray")
        # the words bash gives `ray start` from KubeRay's command line (quoted values unquoted)
        return [ray, "start", *(["--head"] if head else []), *ray_start_words(p)]

    def start(self) -> None:
        for head, params, env in ((True, self.head_params, self.head_env), (False, self.worker_params, self.worker_env)):
            out = subprocess.run(self._argv(params, head), env=self.env(env), capture_output=True, text=True,
                                 timeout=180)
            if out.returncode != 0:
                raise RuntimeError(f"ray start failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def headers(self, token: str | None = "default") -> dict[str, str]:
        token = self.token if token == "default" else token
        return {"x-ray-authorization": f"Bearer {token}"} if token else {}  # KubeRay's dashboard client

    def submit(self, serve_config: dict[str, Any]) -> httpx.Response:
        """PUT serveConfigV2 (as JSON) to the dashboard, as the operator does."""
        return httpx.put(f"{self.dashboard}/api/serve/applications/", json=serve_config, headers=self.headers(),
                         timeout=120)

    def app_status(self) -> str:
        r = httpx.get(f"{self.dashboard}/api/serve/applications/", headers=self.headers(), timeout=30)
        apps = r.json().get("applications", {}) if r.status_code == 200 else {}
        return apps.get("lorafleet", {}).get("status", "NOT_STARTED")

    def stop(self) -> None:
        ray = str(Path(sys.executable).parent / "ray")
        subprocess.run([ray, "stop", "--force"], env=self.env({}), capture_output=True, timeout=120)


def local_serve_config(rayservice: dict[str, Any], paths: dict[str, str], port: int,
                       engine: dict[str, Any]) -> dict[str, Any]:
    """The RayService's serveConfigV2 with this machine's paths, port and tiny-model engine."""
    sc = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    sc["http_options"].update(host="127.0.0.1", port=port)
    sc["proxy_location"] = "HeadOnly"  # pods have an address each; here every node shares 127.0.0.1
    app = sc["applications"][0]
    text = json.dumps(app["args"])
    for container_path, local in paths.items():
        text = text.replace(container_path, local)
    app["args"] = json.loads(text)
    app["args"]["engine"].update(engine)
    app["args"]["autoscaling"].update(min_replicas=1, max_replicas=1)
    app["args"]["topology"] = "split"  # as in the cluster: an ingress on the head, engines on workers
    app["args"]["resources"]["num_cpus"] = 1
    repo = str(Path(__file__).resolve().parents[1])
    app.setdefault("runtime_env", {}).setdefault("env_vars", {})["PYTHONPATH"] = repo
    return sc


def copy_model(src: Path, dest: Path) -> None:
    """Appears all at once, as the model-loader Job writes it."""
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.copytree(src, tmp)
    tmp.rename(dest)
