"""Small network helpers shared by the demo, the benchmarks and the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (servers started by lorafleet's tools bind loopback only)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, poll: float = 1.0):
    """Call `check()` every `poll` s until it returns something true (returned); TimeoutError
    naming `what` and the last value after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(poll)
    raise TimeoutError(f"{what} not reached in {timeout:.0f}s (last: {last!r})")


def wait_until_serving(url: str, proc: subprocess.Popen, log: Path | None = None, timeout: float = 600,
                       poll_s: float = 1.0) -> float:
    """Seconds until the OpenAI-compatible server at `url` answers `GET /v1/models`.

    A 401 counts as up (API keys configured; the caller has them). Raises RuntimeError if the
    process exits first and TimeoutError after `timeout`, both with the end of its log.
    """
    import httpx

    def tail() -> str:
        return log.read_text(errors="replace")[-4000:] if log and log.is_file() else ""

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail()}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code in (200, 401):
                return time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s:\n{tail()}")


def stop_server(proc: subprocess.Popen, grace_s: float = 90) -> None:
    """SIGTERM the server (lorafleet's drains its requests and stops Ray), then SIGKILL whatever
    is left of its process group (it must have been started with start_new_session=True)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
