"""Pure ASGI middleware, outermost first:

- Accounting: counts requests in flight (what a drain waits for) and, when each ends, `requests_total{route, status}`.
- Gate: refuses before any route runs: while draining (503), without a valid key (401), with a body over the limit
  (413: at once from Content-Length, or as soon as a chunked body grows past it). On success it leaves the caller's
  Principal in the request state.

Pure ASGI rather than BaseHTTPMiddleware, which would buffer streaming responses and hide client disconnects."""

import re

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.auth import principal_of
from server.api.errors import ApiError, error_response, unavailable
from server.api.state import ServerState

PUBLIC_PATHS = ("/health", "/ready", "/metrics")  # no key needed, and still answered while draining
UPLOAD_PREFIX = "/v1/adapters"
PRINCIPAL_KEY = "principal"


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once a body passes its limit. A Starlette HTTPException, so FastAPI's body reading lets
    it through as it is (anything else there becomes a generic 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over this server's limit of {limit} bytes")


class AccountingMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState, routes: list[tuple[re.Pattern, str]]) -> None:
        """`routes`: (path regex, template) of every route, for the `route` label."""
        self.app, self.state, self.routes = app, state, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # if the app raises before starting a response, the server answers 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.state.num_in_flight += 1
        try:
            await self.app(scope, receive, send_noting_status)
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
            return await error_response(path, ApiError(413, "request_too_large", error.detail))(scope, receive, send)
        await self.app(scope, _limited(receive, limit), send)


def _limited(receive: Receive, limit: int) -> Receive:
    received = 0

    async def receive_within_limit() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
        return message

    return receive_within_limit


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

