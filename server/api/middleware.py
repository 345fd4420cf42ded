"""Pure ASGI middleware, outermost first:

- Accounting: counts requests in flight (what a drain waits for) and, when each ends, `requests_total{route, status}`.
  A request waiting on its client for more of its body is not in flight: a half-sent body cannot hold a drain. Its
  body must arrive within --body-timeout (else a 408), and once a drain ends it is cut short (a 503).
- Gate: refuses before any route runs: while draining (503), without a valid key (401), with a body over the limit
  (413: at once from Content-Length, or as soon as a chunked body grows past it). On success it leaves the caller's
  Principal in the request state.

Pure ASGI rather than BaseHTTPMiddleware, which would buffer streaming responses and hide client disconnects."""

import asyncio
import re
import time
from collections.abc import Callable

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lora_server.api.auth import principal_of
from lora_server.api.errors import ApiError, error_response, unavailable
from lora_server.api.state import ServerState

PUBLIC_PATHS = ("/health", "/ready", "/metrics")  # no key needed, and still answered while draining
UPLOAD_PREFIX = "/v1/adapters"
UPLOAD_PUT_PATH = re.compile(r"/v1/adapters/[^/]+")  # PUT /v1/adapters/{adapter_id}; POST uploads to UPLOAD_PREFIX
PRINCIPAL_KEY = "principal"


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once a body passes its limit. A Starlette HTTPException, so FastAPI's body reading lets
    it through as it is (anything else there becomes a generic 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over this server's limit of {limit} bytes")


class BodyTimeout(StarletteHTTPException):
    """Raised from `receive` when a body has not all arrived within --body-timeout of the request's headers."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout_s:g} s (this server's --body-timeout)")


class BodyCut(StarletteHTTPException):
    """Raised from `receive` when a drain ends while a body is still arriving."""

    def __init__(self) -> None:
        super().__init__(503, "the server is shutting down, and this request's body had not all arrived")


class ClientBody:
    """A request's `receive`, bounded while its body arrives: by a deadline, and by the end of a drain. While it waits
    on the client, the request does not count as in flight. After the body, `receive` is passed through unbounded
    (what is left to receive is the client's disconnect, which a streaming response waits for)."""

    def __init__(self, receive: Receive, state: ServerState, scope: Scope) -> None:
        self._receive, self._state = receive, state
        self._deadline = time.monotonic() + state.config.body_timeout_s
        self.is_complete = not _has_body(scope)
        self.was_cut = False  # timed out or cut by a drain: the rest of the body may still be on its way

    async def receive(self) -> Message:
        if self.is_complete:
            return await self._receive()
        self._state.num_in_flight -= 1
        try:
            message = await self._next_message()
        finally:
            self._state.num_in_flight += 1
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.is_complete = True
        return message

    async def _next_message(self) -> Message:
        message = asyncio.ensure_future(self._receive())
        cut = asyncio.ensure_future(self._state.bodies_cut.wait())
        try:
            await asyncio.wait((message, cut), timeout=max(0.0, self._deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            message.cancel()  # no-ops once done; cancelling uvicorn's receive loses nothing (the body stays buffered)
            cut.cancel()
        if message.done() and not message.cancelled():
            return message.result()
        self.was_cut = True
        if cut.done() and not cut.cancelled():
            raise BodyCut
        raise BodyTimeout(self._state.config.body_timeout_s)


class AccountingMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState, routes: list[tuple[re.Pattern, str]]) -> None:
        """`routes`: (path regex, template) of every route, for the `route` label."""
        self.app, self.state, self.routes = app, state, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # if the app raises before starting a response, the server answers 500
        body = ClientBody(receive, self.state, scope)

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if body.was_cut:  # the only way to stop reading the rest of its body (RFC 9110, 408)
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        self.state.num_in_flight += 1
        try:
            await self.app(scope, body.receive, send_noting_status)
        finally:
            self.state.num_in_flight -= 1
            self.state.metrics.requests.labels(self._route_label(scope["path"]), str(status)).inc()

    def _route_label(self, path: str) -> str:
        """The route's template (`/v1/adapters/{adapter_id}`), so ids never become label values; also for requests
        refused before routing (401, 413, 503). A path no route has is "unmatched"."""
        return next((template for pattern, template in self.routes if pattern.match(path)), "unmatched")


class GateMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        path, config = scope["path"], self.state.config
        try:
            if self.state.draining:
                error = unavailable("the server is shutting down and takes no new requests")
                error.headers["Connection"] = "close"
                raise error
            scope.setdefault("state", {})[PRINCIPAL_KEY] = principal_of(Request(scope), self.state.keys)
            limit = config.max_upload_body_bytes if path.startswith(UPLOAD_PREFIX) else config.max_body_bytes
            length = _content_length(scope)
            if length is not None and length > limit:
                raise BodyTooLarge(limit)
        except ApiError as error:
            return await error_response(path, error)(scope, receive, send)
        except BodyTooLarge as error:
            self._count_if_upload(scope)
            return await error_response(path, ApiError(413, "request_too_large", error.detail))(scope, receive, send)
        await self.app(scope, _limited(receive, limit, lambda: self._count_if_upload(scope)), send)

    def _count_if_upload(self, scope: Scope) -> None:
        """A body refused here never reaches the upload route, which counts the other results: count it as theirs."""
        method, path = scope["method"], scope["path"]
        if (method == "POST" and path == UPLOAD_PREFIX) or (method == "PUT" and UPLOAD_PUT_PATH.fullmatch(path)):
            self.state.metrics.uploads.labels("too_large").inc()


def _limited(receive: Receive, limit: int, on_too_large: Callable[[], None]) -> Receive:
    received = 0

    async def receive_within_limit() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                on_too_large()
                raise BodyTooLarge(limit)
        return message

    return receive_within_limit


def _has_body(scope: Scope) -> bool:
    """Whether the request's headers announce a body (HTTP/1.1: a Content-Length over 0, or Transfer-Encoding)."""
    length = _content_length(scope)
    return bool(length) or any(name == b"transfer-encoding" for name, _ in scope["headers"])


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

