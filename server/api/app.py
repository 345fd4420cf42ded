"""The FastAPI app: routes, middleware, error handlers, and the lifespan that loads the model and closes it."""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.middleware import Middleware

from server.api import routes_adapters, routes_combine, routes_generate, routes_merge, routes_openai, routes_ops
from server.api.auth import ApiKeys
from server.api.config import ApiConfig
from server.api.errors import install_error_handlers
from server.api.generation import ClientDisconnected
from server.api.middleware import AccountingMiddleware, GateMiddleware
from server.api.state import Loader, ServerState

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
    routers = [module.router for module in (routes_ops, routes_generate, routes_openai, routes_combine, routes_merge,
                                            routes_adapters)]
    route_patterns = [(route.path_regex, route.path) for router in routers for route in router.routes]
    app = FastAPI(title="lora-server", summary="Multi-LoRA inference: one base model, many adapters per batch",
                  lifespan=lifespan, middleware=[Middleware(AccountingMiddleware, state=state, routes=route_patterns),
                                                 Middleware(GateMiddleware, state=state)])
    app.state.server = state
    install_error_handlers(app, config.retry_after_s)

    async def on_disconnect(request: object, exc: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    app.add_exception_handler(ClientDisconnected, on_disconnect)
    for router in routers:
        app.include_router(router)
    return app
