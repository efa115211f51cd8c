"""Small network helpers shared by the demo, the benchmarks and the tests."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (servers started by lorafleet's tools bind loopback only)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
