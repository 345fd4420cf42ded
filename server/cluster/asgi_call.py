"""One HTTP request run through an ASGI app in this process, its response streamed back as it is sent: the replica
side of the ingress's forwarding (no second HTTP hop inside a replica)."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


async def call_asgi(app, request: ForwardedRequest) -> AsyncIterator[tuple[int, list[tuple[bytes, bytes]]] | bytes]:
    """Yields (status, headers) once, then each body chunk as the app sends it."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
             "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
             "query_string": request.query_string, "headers": request.headers, "client": ("ray-serve-ingress", 0),
             "server": ("replica", 0), "root_path": ""}
    sent: asyncio.Queue = asyncio.Queue()
    body_sent = False
    disconnected = asyncio.Event()

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()  # the app polls for a disconnect while it streams: none until we are cancelled
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await sent.put(message)

    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                yield message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
        await task
    finally:
        disconnected.set()  # the client went away (or we are done): the app sees a disconnect and stops
        if not task.done():
            await asyncio.wait_for(task, timeout=10)
