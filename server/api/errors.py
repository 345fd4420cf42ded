"""Every error the API returns is JSON. Our routes answer `{"error": {"type", "message"}}`; the OpenAI routes answer
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so that OpenAI clients raise their usual errors.

One exception type, ApiError, carries status, type and message. The engine's and the store's typed errors map onto it
in one table (`api_error_from`), so a route never picks a status code for them itself."""

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lora_server.adapters_store import AdapterError, AdapterNotFound, AdapterUnusable
from lora_server.adapters_store.store_errors import AdapterTooLarge
from lora_server.engine.merging.control import MergeRefused
from lora_server.engine.request import EngineStoppedError, QueueFullError, RequestError
from lora_server.engine.sampler import SamplingError

# The routes whose clients expect OpenAI's error shape: OpenAI's own, and vLLM's (whose clients parse the same shape)
OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter",
                "/v1/unload_lora_adapter", "/tokenize", "/detokenize", "/version")
OPENAI_PATH_PREFIXES = ("/v1/models/",)

# error types, by status
INVALID_REQUEST = "invalid_request_error"  # 400
AUTHENTICATION = "authentication_error"  # 401
PERMISSION = "permission_error"  # 403
NOT_FOUND = "not_found_error"  # 404
CONFLICT = "conflict_error"  # 409
TOO_LARGE = "request_too_large"  # 413
RATE_LIMIT = "rate_limit_error"  # 429
SERVER = "server_error"  # 500
UNAVAILABLE = "service_unavailable"  # 503

_TYPE_OF_STATUS = {400: INVALID_REQUEST, 401: AUTHENTICATION, 403: PERMISSION, 404: NOT_FOUND, 405: INVALID_REQUEST,
                   409: CONFLICT, 413: TOO_LARGE, 429: RATE_LIMIT, 503: UNAVAILABLE}


class ApiError(Exception):
    def __init__(self, status: int, type: str, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type, message
        self.code, self.param = code, param
        self.headers = headers or {}


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, INVALID_REQUEST, message, param=param, code=code)


def not_found(message: str) -> ApiError:
    return ApiError(404, NOT_FOUND, message, code="not_found")


def unavailable(message: str) -> ApiError:
    return ApiError(503, UNAVAILABLE, message, headers={"Retry-After": "1"})


def api_error_from(exc: BaseException, retry_after_s: int = 1) -> ApiError | None:
    """The API error for an engine or store error; None for anything else (a bug: a 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, AdapterNotFound):
        # Unknown, deleted, or another tenant's: the same 404, so a caller learns nothing about other tenants.
        return not_found(str(exc))
    if isinstance(exc, AdapterUnusable):
        # 409, not 500: the version exists but failed its checksum and is quarantined; retrying cannot help, and the
        # caller's fix is to upload it again (PUT). The store has already logged the damage for the operator.
        return ApiError(409, CONFLICT, str(exc), code="adapter_unusable")
    if isinstance(exc, MergeRefused):
        # 409: the request is well formed but conflicts with the server's state (its merge policy, what is merged).
        return ApiError(409, CONFLICT, str(exc), code="merge_refused")
    if isinstance(exc, AdapterTooLarge):  # a combination's result over the size limit: as an upload's file would be
        return ApiError(413, TOO_LARGE, str(exc), param=exc.field, code="adapter_too_large")
    if isinstance(exc, AdapterError):
        return ApiError(400, INVALID_REQUEST, str(exc), param=exc.field, code="invalid_adapter")
    if isinstance(exc, RequestError):
        return invalid_request(str(exc), param=exc.field, code=exc.code)
    if isinstance(exc, SamplingError):
        return invalid_request(str(exc), param=exc.field)
    if isinstance(exc, QueueFullError):
        return ApiError(429, RATE_LIMIT, str(exc), code="queue_full", headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, EngineStoppedError):
        return unavailable(str(exc))
    return None


def is_openai_path(path: str) -> bool:
    return path in OPENAI_PATHS or path.startswith(OPENAI_PATH_PREFIXES)


def error_body(path: str, error: ApiError) -> dict:
    if is_openai_path(path):
        return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    return {"error": {"type": error.type, "message": error.message}}


def error_response(path: str, error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(path, error), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        error = api_error_from(exc, retry_after_s)
        if error is None:  # only registered for types that map
            raise exc
        return error_response(request.url.path, error)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, validation_error(exc))

    async def on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
        if status == 404:
            message = f"no route {request.method} {request.url.path}"
        error = ApiError(status, _TYPE_OF_STATUS.get(status, SERVER if status >= 500 else INVALID_REQUEST), message,
                         headers=dict(exc.headers or {}))  # a 405's Allow, from Starlette's routing
        return error_response(request.url.path, error)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this response is sent, and uvicorn logs the traceback: no logging here.
        return error_response(request.url.path, ApiError(500, SERVER, f"internal error: {type(exc).__name__}"))

    for exc_type in (ApiError, AdapterNotFound, AdapterUnusable, AdapterError, MergeRefused, RequestError,
                     SamplingError, QueueFullError, EngineStoppedError):
        app.add_exception_handler(exc_type, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(Exception, on_unexpected)


def validation_error(exc: RequestValidationError) -> ApiError:
    """Pydantic's error list as one readable line: `field.path: what is wrong; ...`."""
    parts, first_param = [], None
    for item in exc.errors():
        loc = [str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path", "form")]
        where = ".".join(loc) or "body"
        kind = item.get("type")
        if not loc and kind == "model_attributes_type":
            parts.append("the body must be a JSON object, sent with Content-Type: application/json")
            continue
        if kind == "json_invalid":  # its loc is ("body", character position): no parameter is at fault
            error = (item.get("ctx") or {}).get("error", "invalid")
            parts.append(f"the body is not valid JSON: {error} (at character {loc[0] if loc else 0})")
            continue
        first_param = first_param or (where if loc else None)
        if kind == "extra_forbidden":
            parts.append(f"{where}: unknown field: this server does not implement it, and refuses it rather than "
                         "ignore it")
            continue
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return invalid_request("; ".join(parts) or "invalid request", param=first_param)
