"""A Ray cluster of real hosts on one machine: Linux network namespaces, each with its own
address on a bridge made for the purpose, a Ray node in each (`ray start`, its CPU share and a
custom resource naming the host), token auth on every node.

Namespaces isolate the network, not process ids or files: the hosts share this machine's
filesystem (a shared directory is what every host reads adapters from), and "killing a host"
is SIGKILL to every process `ip netns pids` lists for it. Needs root (`ip netns`); `available()`
says why not where the kernel or the user cannot.

Addresses: 10.231.7.0/24, the bridge (this machine's side) .254, hosts .1 (head), .2, .3 ...
Nothing here sends traffic anywhere but these addresses.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.231.7"
BRIDGE = "lfbr0"
GCS_PORT = 6379
DASHBOARD_PORT = 8265
RAY = str(Path(sys.executable).parent / "ray")
# What every node's Ray processes get besides the cluster's token (RAY_AUTH_TOKEN), as KubeRay's
# token auth gives every pod RAY_AUTH_MODE and the token (k8s/check.py compares the RayService).
NODE_ENV = {"RAY_AUTH_MODE": "token", "RAY_worker_niceness": "0", "TOKENIZERS_PARALLELISM": "false"}


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def available() -> str | None:
    """None when network namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"lfprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` refused: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@dataclass
class Host:
    name: str  # "head", "w1", ...
    ip: str

    @property
    def ns(self) -> str:
        return f"lf-{self.name}"

    @property
    def resource(self) -> str:
        return f"host-{self.name}"

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def run(self, argv: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], env=env, capture_output=True, text=True, **kw)

    def popen(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], env=env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)


class NetnsCluster:
    """`with NetnsCluster(work, workers=2) as c:` a head and N worker hosts, Ray up on each."""

    def __init__(self, work: Path, workers: int = 2, cpus: int = 1, token: str | None = None):
        self.work = work
        self.hosts = [Host("head", f"{SUBNET}.1")] + [Host(f"w{i}", f"{SUBNET}.{i + 1}") for i in range(1, workers + 1)]
        self.cpus = cpus
        self.token = token or secrets.token_hex(16)

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    def placement_sets(self) -> list[str]:
        """The `lorafleet serve --set` values that place the app on this cluster: its address, the
        split topology, the ingress on the head (its resource), engines where the CPUs are (the head
        has none). tests/test_cluster.py and bench/cluster.py serve with them; k8s/check.py
        holds the RayService to them."""
        return [f"address={self.address}", "topology=split", f"resources.num_cpus={self.cpus}",
                f'resources.ingress_resources={{"{self.head.resource}": 0.001}}']

    def fleet_sets(self, fleet_file: str | Path) -> list[str]:
        """The `--set` values that make every replica follow one fleet file (lorafleet/fleet.py),
        which every host reads (they share this machine's files, as Ray pods share a ConfigMap)."""
        return [f"fleet_file={fleet_file}", "fleet_poll_s=1"]

    def serve_args(self) -> list[str]:
        return [w for s in self.placement_sets() for w in ("--set", s)]

    def env(self, **extra: str) -> dict[str, str]:
        """What every Ray process of the cluster gets (as KubeRay's token auth gives every pod)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(**NODE_ENV, RAY_AUTH_TOKEN=self.token, **extra)
        return env

    # ------------------------------------------------------------------ network
    def create_network(self) -> None:
        self.destroy_network()
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for h in self.hosts:
            subprocess.run(["ip", "netns", "add", h.ns], check=True, capture_output=True)
            veth = f"lfv-{h.name}"
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
            _ip("link", "set", veth, "master", BRIDGE, "up")
            _ip("addr", "add", f"{h.ip}/24", "dev", "eth0", ns=h.ns)
            _ip("link", "set", "eth0", "up", ns=h.ns)
            _ip("link", "set", "lo", "up", ns=h.ns)

    def destroy_network(self) -> None:
        for h in self.hosts:
            self.kill(h)
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)
            _ip("link", "del", f"lfv-{h.name}", check=False)
        _ip("link", "del", BRIDGE, check=False)

    # ------------------------------------------------------------------ Ray
    def start_argv(self, h: Host) -> list[str]:
        """The `ray start` command of a host (k8s/check.py compares the RayService's with these)."""
        argv = [RAY, "start", f"--node-ip-address={h.ip}", f"--num-cpus={0 if h is self.head else self.cpus}",
                f'--resources={{"{h.resource}": 1}}', "--disable-usage-stats"]
        if h is self.head:
            argv += ["--head", f"--port={GCS_PORT}", f"--dashboard-host={h.ip}",
                     f"--dashboard-port={DASHBOARD_PORT}"]
        else:
            argv += [f"--address={self.address}"]
        return argv

    def start_ray(self) -> None:
        for h in self.hosts:
            r = h.run(self.start_argv(h), self.env(), timeout=180)
            if r.returncode != 0:
                raise RuntimeError(f"ray start on {h.name} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")

    def kill(self, host: Host) -> int:
        """SIGKILL every process of a host (a node that dies); returns how many."""
        pids = host.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def __enter__(self) -> NetnsCluster:
        self.create_network()
        try:
            self.start_ray()
        except BaseException:
            self.destroy_network()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.destroy_network()
