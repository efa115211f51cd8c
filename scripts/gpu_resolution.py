"""What pip installs for the CUDA serve image: a resolver report of the `gpu` extra (pip install
--dry-run --report) for the image's Python and platform, reduced to package versions.

    python scripts/gpu_resolution.py > k8s/gpu-resolution.json      (make gpu-resolution)

tests/test_k8s.py compares the CUDA major of what it resolves (torch's nvidia-* wheels) with the
Dockerfile's CUDA base image, so a vLLM upgrade that moves to another CUDA cannot go unnoticed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_PYTHON = "3.12"  # python3 of the CUDA base (Ubuntu 24.04)


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["optional-dependencies"]["gpu"]
    platforms = [f"manylinux_2_{v}_x86_64" for v in range(5, 40)] + ["manylinux2014_x86_64", "linux_x86_64"]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
               str(report), "--python-version", IMAGE_PYTHON, "--only-binary=:all:",
               *[a for p in platforms for a in ("--platform", p)], *reqs]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        installed = json.loads(report.read_text())["install"]
    packages = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installed}
    print(json.dumps({"python": IMAGE_PYTHON, "requirements": reqs, "packages": dict(sorted(packages.items()))},
                     indent=1))


if __name__ == "__main__":
    main()
