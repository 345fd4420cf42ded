"""uvicorn's HTTP/1.1 protocol (h11), plus a bound on the time a client takes to send a request's headers.

uvicorn bounds the size of the headers (h11: 16 KiB) and an idle keep-alive connection (5 s after a response), but not
the time the headers take: a client that connects and sends nothing, or half a request line, holds its connection (a
file descriptor, a slot in a proxy's pool) for as long as it likes. Here the headers must be complete within
`header_timeout_s` of the connection opening, or of the first byte of the next request on a kept-alive connection.
A client that started a request and is slower gets a JSON 408; one that sent nothing at all is closed without an
answer (a browser's pre-opened connection would report a 408 it never asked for).

The body's own bound (`--body-timeout`) is the ASGI middleware's: by then there is a request to answer."""

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from lora_server.api.errors import INVALID_REQUEST, ApiError, error_body

logger = logging.getLogger(__name__)


def _timeout_response(timeout_s: float) -> bytes:
    # No path yet, so our error shape (not OpenAI's); the type the body's 408 gets too: the client's to fix.
    error = ApiError(408, INVALID_REQUEST, f"the request's headers did not arrive within {timeout_s:g} s "
                                           f"(this server's --header-timeout)")
    body = json.dumps(error_body("", error))
    return (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n{body}").encode()


class HeaderTimeoutProtocol(H11Protocol):
    header_timeout_s: float = 10.0  # set by `with_header_timeout`
    _header_timer: asyncio.TimerHandle | None = None  # armed while the connection waits for a request's headers

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request's headers are in (or it was refused as malformed)
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        started, _ = self.conn.trailing_data  # bytes of a request h11 holds, waiting for the rest of its headers
        if started:
            logger.info("client %s sent no complete request headers within %g s: 408, connection closed",
                        self.client, self.header_timeout_s)
            self.transport.write(_timeout_response(self.header_timeout_s))
        self.transport.close()


def with_header_timeout(timeout_s: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to give uvicorn (`uvicorn.Config(http=...)`), which builds one per connection itself."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": timeout_s})
