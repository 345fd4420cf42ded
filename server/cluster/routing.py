"""Which adapter a request is for, as Ray Serve's multiplexed model id: `tenant/adapter_id`, or "" (any replica).

Plain Python, no Ray: the ingress calls it on every request, and tests call it directly."""

import json
from urllib.parse import unquote

from lora_server.api.auth import DEFAULT_TENANT, ApiKeys

NO_ADAPTER = ""  # the base model, an adapter list, metrics: any replica will do
_ADAPTER_PATH = "/v1/adapters/"
GENERATION_PATHS = ("/v1/generate", "/v1/completions", "/v1/chat/completions")


def multiplex_key(method: str, path: str, authorization: str, body: bytes, keys: ApiKeys | None) -> str:
    """`tenant/adapter_id` for a request naming an adapter (`adapter_id` or OpenAI's `model` in a JSON body, or the
    /v1/adapters/{id} path), else NO_ADAPTER. Never raises: a request it cannot read goes to any replica, whose server
    answers it with the same error a single server would."""
    tenant = _tenant(authorization, keys)
    if tenant is None:
        return NO_ADAPTER
    adapter_id = _adapter_of_body(body) if method == "POST" and path in GENERATION_PATHS else None
    if adapter_id is None and path.startswith(_ADAPTER_PATH):
        adapter_id = unquote(path[len(_ADAPTER_PATH):].split("/", 1)[0]) or None
    return NO_ADAPTER if not adapter_id else f"{tenant}/{adapter_id}"


def is_retryable(method: str, path: str) -> bool:
    """Whether a request whose replica died before answering may be sent again to another: reads and generation
    (nothing was produced, nothing was sent), not writes (an upload or delete may have reached the repository before
    the replica died: sent again, a POST would answer 409 to its own upload, a PUT store a second version)."""
    return method in ("GET", "HEAD") or (method == "POST" and path in GENERATION_PATHS)


def _tenant(authorization: str, keys: ApiKeys | None) -> str | None:
    if keys is None:
        return DEFAULT_TENANT
    scheme, _, token = authorization.partition(" ")
    principal = keys.authenticate(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
    return None if principal is None else principal.tenant


def _adapter_of_body(body: bytes) -> str | None:
    try:
        fields = json.loads(body)
    except ValueError:
        return None
    if not isinstance(fields, dict):
        return None
    adapter_id = fields.get("adapter_id", fields.get("model"))
    return adapter_id if isinstance(adapter_id, str) else None
