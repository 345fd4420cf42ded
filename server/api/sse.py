"""Server-Sent Events framing (text/event-stream): one `data:` line of compact JSON per event, a blank line after.

JSON never holds a raw newline (json.dumps escapes them), so one `data:` line always suffices."""

import json
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

MEDIA_TYPE = "text/event-stream"
# Proxies (nginx) buffer responses unless told not to; a buffered stream is no stream.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"  # OpenAI's end-of-stream marker


def sse_event(data: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()


def parse_sse(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each event in a complete stream: the inverse of sse_event, for tests and clients."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[len("event:"):].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:"):].removeprefix(" "))
        if data:
            events.append((name, "\n".join(data)))
    return events


class EventStreamResponse(StreamingResponse):
    """An SSE response that always runs `on_close` when it ends, however it ends: finished, the client gone
    (Starlette cancels the body), or never started. That is where a request still running gets aborted."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(content, media_type=MEDIA_TYPE, headers={**HEADERS, **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
