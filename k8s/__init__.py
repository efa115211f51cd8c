"""Offline checks of the Kubernetes manifests (k8s/check.py): a dev tool, not shipped in the images."""
