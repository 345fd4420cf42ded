"""The FastAPI app: routes, middleware, error handlers, and the lifespan that loads the model and closes it."""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware

from lora_server.api import (
    routes_adapters,
    routes_combine,
    routes_generate,
    routes_merge,
    routes_openai,
    routes_ops,
    routes_vllm,
)
from lora_server.api.auth import ApiKeys
from lora_server.api.config import ApiConfig
from lora_server.api.errors import INVALID_REQUEST, ApiError, error_response, install_error_handlers
from lora_server.api.generation import ClientDisconnected
from lora_server.api.middleware import AccountingMiddleware, GateMiddleware
from lora_server.api.openapi import install_true_openapi
from lora_server.api.path_ids import check_path_ids
from lora_server.api.state import Loader, ServerState

CLIENT_CLOSED_REQUEST = 499  # nginx's code for it: nobody receives the response, but the metrics say what happened


def create_app(config: ApiConfig, keys: ApiKeys | None, loader: Loader,
               on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """`loader` runs on a worker thread once the app starts; requests that need the model get a 503 until then."""
    state = ServerState(config, keys, loader, on_load_failure)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        try:
            yield
        finally:
            state.close()

    # The fixed paths (/v1/adapters/combine) before /v1/adapters/{adapter_id}, so the `route` label names them.
    routers = [module.router for module in (routes_ops, routes_generate, routes_openai, routes_vllm, routes_combine,
                                            routes_merge, routes_adapters)]
    route_patterns = [(route.path_regex, route.path) for router in routers for route in router.routes]
    app = FastAPI(title="lora-server", summary="Multi-LoRA inference: one base model, many adapters per batch",
                  lifespan=lifespan, middleware=[Middleware(AccountingMiddleware, state=state, routes=route_patterns),
                                                 Middleware(GateMiddleware, state=state)])
    app.state.server = state
    install_error_handlers(app, config.retry_after_s)

    async def on_disconnect(request: object, exc: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    app.add_exception_handler(ClientDisconnected, on_disconnect)

    async def on_method_not_allowed(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's Allow names only the methods of the first route whose path matched; a path served by several
        # routes (GET and POST /v1/adapters) allows all of theirs. A fixed path (/v1/adapters/combine) is only its
        # own routes': the routes with a parameter there refuse that word as an id.
        path = request.url.path
        matching = [route for router in routers for route in router.routes if route.path_regex.match(path)]
        fixed = [route for route in matching if not route.param_convertors]
        allowed = ", ".join(sorted({method for route in fixed or matching for method in route.methods}))
        allowed = allowed or (exc.headers or {}).get("Allow", "")  # FastAPI's own routes (/openapi.json, /docs)
        return error_response(path, ApiError(405, INVALID_REQUEST, f"{request.method} is not allowed on {path} "
                                             f"(allowed: {allowed})", headers={"Allow": allowed}))

    app.add_exception_handler(405, on_method_not_allowed)
    for router in routers:
        app.include_router(router, dependencies=[Depends(check_path_ids)])
    install_true_openapi(app, config, has_keys=keys is not None)
    return app
