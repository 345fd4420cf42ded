"""FastAPI dependencies: the server state and the caller (authenticated by GateMiddleware before any route runs)."""

from typing import Annotated

from fastapi import Depends, Request

from lora_server.api.auth import Principal
from lora_server.api.middleware import PRINCIPAL_KEY
from lora_server.api.state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.server


def get_principal(request: Request) -> Principal:
    principal = request.scope.get("state", {}).get(PRINCIPAL_KEY)
    assert principal is not None, f"{request.url.path} is a public path: it has no caller"
    return principal


StateDep = Annotated[ServerState, Depends(get_state)]
CallerDep = Annotated[Principal, Depends(get_principal)]
