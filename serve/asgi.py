"""Run one HTTP request through an ASGI app in this process and hand its answer out as events.

The replica answers with vLLM's own FastAPI routes; a request reaches it as data (from the front
in this process, or over a Ray Serve handle), not as a socket. `call_app` plays the server's
part: it gives the app the body, collects what the app sends, and yields a `Start` (status and
headers) and then the body in chunks. Chunks that pile up while the consumer is busy go out as
one, so a slow hop (replica -> ingress over Ray) costs one message per batch, not per token;
the first chunk is never held back. Closing the iterator tells the app the client left
(`http.disconnect`), which is how vLLM's routes abort the request in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from typing import Any, AsyncIterator, Callable

from serve.contract import ReplicaRequest, Start

_DONE = object()


def asgi_scope(req: ReplicaRequest) -> dict[str, Any]:
    """The ASGI HTTP scope of `req`, as a server would give it to an app."""
    path, _, query = req.path.partition("?")
    headers = [(k, v) for k, v in req.headers if k.lower() not in (b"content-length", b"content-type")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(req.body)).encode())]
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": req.method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
            "query_string": query.encode(), "headers": headers, "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0), "state": {}}


def body_then(body: bytes, rest: Callable) -> Callable:
    """An ASGI `receive` that gives the (already read) request body once, then what `rest`
    gives: the client's own receive, or a disconnect when the answer's reader goes away."""
    given = False

    async def receive():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await rest()

    return receive


async def call_app(app: Callable, req: ReplicaRequest,
                   context: contextvars.Context | None = None) -> AsyncIterator[Start | bytes]:
    """Yield Start, then body chunks (bytes) of `app`'s answer to `req`. The app runs in its own
    task, in `context` when given (how per-request state reaches code the app calls)."""
    queue: asyncio.Queue = asyncio.Queue()
    left = asyncio.Event()

    async def disconnect():
        await left.wait()
        return {"type": "http.disconnect"}

    receive = body_then(req.body, disconnect)

    async def send(message):
        queue.put_nowait(message)

    async def run():
        try:
            await app(asgi_scope(req), receive, send)
        finally:
            queue.put_nowait(_DONE)

    task = asyncio.get_running_loop().create_task(run(), context=context)
    finished = False
    try:
        while not finished:
            messages = [await queue.get()]
            while not queue.empty():
                messages.append(queue.get_nowait())
            chunk = b""
            for m in messages:
                if m is _DONE:
                    finished = True
                elif m["type"] == "http.response.start":
                    yield Start(m["status"], [(bytes(k), bytes(v)) for k, v in m.get("headers", [])])
                elif m["type"] == "http.response.body":
                    chunk += m.get("body", b"")
                    finished = finished or not m.get("more_body", False)
            if chunk:
                yield chunk
        await task  # the app's own errors surface here (its exception handlers answered before)
    finally:
        left.set()
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task
