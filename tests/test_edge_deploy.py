"""The edge server's deployments without Ray, checked offline: the podman Quadlet unit
(examples/quadlet/) and its config against the serve schema, the image and the Kubernetes edge
overlay. Quadlet's generator is not in Debian 12's podman (4.3), so the unit is read here as
systemd reads it and each key checked against the keys Quadlet (podman 4.6) documents."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "examples" / "quadlet" / "lorafleet-edge.container"
CONFIG = ROOT / "examples" / "quadlet" / "edge.yaml"
# podman-systemd.unit(5), podman 4.6: the [Container] keys.
QUADLET_KEYS = {
    "AddCapability", "AddDevice", "Annotation", "AutoUpdate", "ContainerName", "DropCapability", "Environment",
    "EnvironmentFile", "EnvironmentHost", "Exec", "ExposeHostPort", "Group", "HealthCmd", "HealthInterval",
    "HealthOnFailure", "HealthRetries", "HealthStartPeriod", "HealthStartupCmd", "HealthStartupInterval",
    "HealthStartupRetries", "HealthStartupSuccess", "HealthStartupTimeout", "HealthTimeout", "HostName", "IP", "IP6",
    "Image", "Label", "LogDriver", "Mount", "Network", "NoNewPrivileges", "Notify", "PodmanArgs", "PublishPort",
    "Pull", "ReadOnly", "Rootfs", "RunInit", "SeccompProfile", "SecurityLabelDisable", "SecurityLabelFileType",
    "SecurityLabelLevel", "SecurityLabelType", "Secret", "Sysctl", "Timezone", "Tmpfs", "User", "UserNS", "Volume",
    "WorkingDir"}


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}: keys may repeat, `#`/`;` lines are comments."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"{path.name}:{n}: bad section header"
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None and "=" in line, f"{path.name}:{n}: not KEY=VALUE in a section"
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


def test_quadlet_unit_is_valid_and_matches_its_config():
    from lorafleet.config import ServeConfig

    unit = read_unit(UNIT)
    assert set(unit) == {"Unit", "Container", "Service", "Install"}
    c = unit["Container"]
    unknown = {k for k, _ in c} - QUADLET_KEYS
    assert not unknown, f"not Quadlet [Container] keys: {unknown}"
    keys = dict(c)
    cfg = ServeConfig.model_validate(yaml.safe_load(CONFIG.read_text()))
    mounts = {v.split(":")[1]: v.split(":")[0] for k, v in c if k == "Volume"}
    secrets = {dict(p.split("=") for p in v.split(",")[1:])["target"] for k, v in c if k == "Secret"}
    # The container reads the config the unit mounts, and what that config names is mounted.
    assert keys["Exec"] in mounts
    assert cfg.model in mounts and all(src in mounts for src in cfg.adapters)
    assert {cfg.api_keys_file, cfg.admin_keys_file} <= secrets
    assert keys["PublishPort"].rsplit(":", 1)[1] == str(cfg.port) and cfg.host == "0.0.0.0"
    # Hardened as the Kubernetes edge pod: the image's user, read-only root, no privileges.
    assert keys["User"].split(":")[0] == "1000" and keys["ReadOnly"] == "true"
    assert keys["NoNewPrivileges"] == "true" and keys["DropCapability"] == "ALL"
    assert all(v.endswith(":ro") for k, v in c if k == "Volume")
    # Podman's stop timeout leaves the drain its grace.
    stop = int(keys["PodmanArgs"].split("--stop-timeout=")[1].split()[0])
    assert stop > cfg.shutdown_grace_s


def test_quadlet_runs_the_image_and_config_of_the_edge_overlay():
    """One edge deployment, two hosts: the unit runs the image the Kubernetes overlay names, with
    the same config (the ConfigMap's edge.yaml)."""
    overlay = ROOT / "k8s" / "overlays" / "edge"
    kust = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    image = next(i for i in kust["images"] if i["name"] == "lorafleet-serve-edge")
    assert dict(read_unit(UNIT)["Container"])["Image"] == f"{image['newName']}:{image['newTag']}"
    cm = yaml.safe_load((overlay / "configmap.yaml").read_text())
    assert yaml.safe_load(cm["data"]["edge.yaml"]) == yaml.safe_load(CONFIG.read_text())
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM ${CPU_BASE_IMAGE} AS serve-edge" in dockerfile and "USER 1000:1000" in dockerfile
