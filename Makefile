# Every target sets up what it needs on a fresh machine; a second run reinstalls nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The stamp names the dependency list it was made from: edit pyproject.toml and the next
# `make` brings the environment up to date.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml scripts/install.sh 2>/dev/null | sha1sum | cut -c1-12)
export RAY_worker_niceness := 0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: venv test test-slow demo bench base reliability recovery quality cluster-demo bench-cluster k8s-check gpu-resolution image-cpu image-edge clean lint
venv: $(STAMP)
$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV) $(PYTHON)
	rm -f $(VENV)/.installed-* && touch $@

base: venv
	$(VENV)/bin/lorafleet prepare-base

test: venv
	$(PY) -m pytest -m "not slow" -q tests

test-slow: venv
	$(PY) -m pytest -m slow -q tests

demo: venv
	$(PY) examples/demo.py

bench: venv
	$(PY) bench/train.py && $(PY) bench/merge.py && $(PY) bench/onnx.py && $(PY) bench/lora_kernel.py && $(PY) bench/serve.py && $(PY) bench/report.py

reliability: venv
	$(PY) bench/reliability.py

# A lone replica's way back after its engine dies, phase by phase, old and new behaviour in one run.
recovery: venv
	$(PY) bench/recovery.py --repeats 2

# Time to learn the 20 legal facts: lorafleet's defaults vs the seed tutorial's recipe.
quality: venv
	$(PY) bench/quality.py

# Three hosts (network namespaces, as root): Ray with token auth, serve across them, kills.
cluster-demo: venv
	$(PY) -m pytest -m slow -q -s tests/test_cluster.py

bench-cluster: venv
	$(PY) bench/cluster.py

k8s-check: venv
	$(PY) -m k8s.check

# The CUDA image's resolved packages (PyPI metadata only), compared with its CUDA base by tests/test_k8s.py.
gpu-resolution: venv
	$(PY) scripts/gpu_resolution.py > k8s/gpu-resolution.json.tmp && mv k8s/gpu-resolution.json.tmp k8s/gpu-resolution.json

lint: venv
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf $(VENV) .cache

image-cpu:
	bash scripts/build-image.sh

image-edge:
	TARGET=serve-edge bash scripts/build-image.sh
