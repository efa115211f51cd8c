"""The fused replica's own HTTP listener (`http_listener: replica`).

Behind Ray Serve's HTTP proxy every streamed chunk takes one more process hop (replica -> proxy
-> client) and the proxy process wakes for each one. With one replica there is nothing to route,
so the replica can take the connections itself, as vLLM's own server does: uvicorn on the
replica's event loop, the same FastAPI app. Ray Serve still starts, health-checks and restarts
the replica; only the proxy is left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # Signals belong to the Ray worker process (it runs uvicorn on the main thread when user
        # code is not on a thread of its own): leave its handlers alone.
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a RuntimeError that says which and what to do."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise RuntimeError(f"cannot listen on {host}:{port} ({e.strerror or e}): another server may hold the "
                           f"port; pick a free one with --port (or `port:` in the config)") from e


class ReplicaListener:
    """uvicorn serving `app` on host:port from the running event loop."""

    def __init__(self, server: _Server, task: asyncio.Task):
        self.server, self.task = server, task

    @classmethod
    async def start(cls, app, host: str, port: int, startup_timeout_s: float = 60) -> "ReplicaListener":
        loop_time = asyncio.get_running_loop().time
        deadline = loop_time() + startup_timeout_s
        while True:
            try:
                sock = bind(host, port)
                break
            except RuntimeError:
                # a replica replacing a failed one may start before the old process has let go
                if loop_time() > deadline:
                    raise
                await asyncio.sleep(0.5)
        server = _Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30))
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        listener = cls(server, task)
        while not server.started:
            listener.check()
            if loop_time() > deadline:
                listener.stop()
                raise RuntimeError(f"the HTTP listener on {host}:{port} did not start in {startup_timeout_s:.0f}s")
            await asyncio.sleep(0.05)
        return listener

    def check(self) -> None:
        """Raise if the listener has stopped (Ray Serve's health check then replaces the replica)."""
        if self.task.done():
            exc = None if self.task.cancelled() else self.task.exception()
            raise RuntimeError(f"the replica's HTTP listener stopped: {exc!r}") from exc

    def stop(self) -> None:
        self.server.should_exit = True
