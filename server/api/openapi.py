"""The OpenAPI document, made true to what the server answers.

FastAPI's own document lists 200 and 422 for every route; this server never answers a validation error with 422 (it
is a 400), and it answers 401, 403, 404, 409, 413, 429 and 503 as JSON errors. `true_openapi` rewrites FastAPI's
document once: each operation's real error statuses (the table below) with the error body schema of its path (OpenAI's
shape on the OpenAI routes), the streaming and plain-text media types, the bearer key when the server has keys, the
id pattern on path parameters, and the per-request prompt limit."""

from collections.abc import Callable
from http import HTTPStatus

from fastapi import FastAPI

from lora_server.adapters_store.upload import ID_PATTERN
from lora_server.api.config import ApiConfig
from lora_server.api.errors import is_openai_path
from lora_server.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from lora_server.api.path_ids import ADAPTER_ID_PARAM
from lora_server.api.schemas import ID_DESCRIPTION
from lora_server.api.sse import MEDIA_TYPE as EVENT_STREAM

PUBLIC_OPERATIONS = {("get", "/health"), ("get", "/ready"), ("get", "/metrics")}  # no key; answered while draining
GENERATION = (400, 404, 409, 422, 429)
# Each operation's own error statuses; every operation but the public ones also gets GATE_STATUSES.
ERROR_STATUSES: dict[tuple[str, str], tuple[int, ...]] = {
    ("get", "/health"): (503,),
    ("get", "/ready"): (503,),
    ("get", "/metrics"): (),
    ("post", "/v1/generate"): GENERATION,
    ("post", "/v1/completions"): GENERATION,
    ("post", "/v1/chat/completions"): GENERATION,
    ("get", "/v1/models"): (),
    ("get", "/v1/models/{model}"): (400, 404),
    ("get", "/v1/adapters"): (400,),
    ("post", "/v1/adapters"): (400, 403, 409),
    ("get", "/v1/adapters/{adapter_id}"): (400, 404),
    ("put", "/v1/adapters/{adapter_id}"): (400, 403),
    ("delete", "/v1/adapters/{adapter_id}"): (400, 403, 404),
    ("post", "/v1/adapters/combine"): (400, 403, 404, 409),
    ("post", "/v1/adapters/{adapter_id}/merge"): (400, 403, 404, 409),
    ("delete", "/v1/adapters/{adapter_id}/merge"): (400, 403, 404, 409),
    ("post", "/v1/load_lora_adapter"): (400, 403, 409),
    ("post", "/v1/unload_lora_adapter"): (400, 403, 404),
    ("post", "/tokenize"): (400,),
    ("post", "/detokenize"): (400,),
    ("get", "/version"): (),
}
# GateMiddleware's refusals, before any route runs: a body over the limit (413; also an adapter file, or a combined
# adapter, over the store's), a body that does not arrive in time (408), draining or still loading (503).
GATE_STATUSES = (408, 413, 503)
STREAMING = {("post", "/v1/generate"), ("post", "/v1/completions"), ("post", "/v1/chat/completions")}

WHEN = {
    400: "Invalid request: the message (and `param`, where the shape has it) names the field",
    401: "No API key, or an unknown one",
    403: "A user key: only an admin key may change adapters",
    404: "No such adapter (or model) for the caller's tenant",
    408: "The request body did not arrive in time",
    409: "Conflicts with the server's state: the message says which (exists already, a damaged stored version, "
         "the merge policy)",
    413: "The body, an adapter file or a combined adapter is over the server's limit",
    422: "The adapter could not be loaded (it does not fit this server's device or model)",
    429: "Queue full: retry after Retry-After seconds",
    503: "The model is still loading, or the server is draining",
}
HEADERS = {
    401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    429: {"Retry-After": {"required": True, "schema": {"type": "string"}}},
}
ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {"type": "object", "required": ["type", "message"],
                             "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}},
}
OPENAI_ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"],
                             "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                            "param": {"type": ["string", "null"]},
                                            "code": {"type": ["string", "null"]}}}},
}
VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")  # FastAPI's 422 body, which this server never sends


def install_true_openapi(app: FastAPI, config: ApiConfig, has_keys: bool) -> None:
    """Replace `app.openapi` by one that builds the true document once, from FastAPI's."""
    fastapi_openapi: Callable[[], dict] = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = true_openapi(fastapi_openapi(), config, has_keys)
        return app.openapi_schema

    app.openapi = openapi  # FastAPI's documented way to customize the document


def true_openapi(document: dict, config: ApiConfig, has_keys: bool) -> dict:
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    schemas["Error"], schemas["OpenAIError"] = ERROR_SCHEMA, OPENAI_ERROR_SCHEMA
    if has_keys:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            key = (method, path)
            assert key in ERROR_STATUSES, f"{method.upper()} {path} has no row in openapi.ERROR_STATUSES"
            responses = operation["responses"]
            responses.pop("422", None)
            statuses = set(ERROR_STATUSES[key])
            if key in PUBLIC_OPERATIONS:
                operation["security"] = []
            else:
                statuses |= set(GATE_STATUSES) | ({401} if has_keys else set())
            error_ref = {"$ref": "#/components/schemas/" + ("OpenAIError" if is_openai_path(path) else "Error")}
            for status in sorted(statuses):
                responses[str(status)] = {"description": WHEN.get(status, HTTPStatus(status).phrase),
                                          "content": {"application/json": {"schema": error_ref}}}
                if status in HEADERS:
                    responses[str(status)]["headers"] = HEADERS[status]
            _fix_success_media_types(key, responses)
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] == ADAPTER_ID_PARAM:
                    parameter["schema"] = {"type": "string", "pattern": ID_PATTERN.pattern,
                                           "description": ID_DESCRIPTION}
    _limit_prompts(schemas.get("CompletionRequest"), config.max_prompts_per_request)
    return document


def _fix_success_media_types(key: tuple[str, str], responses: dict) -> None:
    success = next((responses[status] for status in ("200", "201") if status in responses), None)
    assert success is not None, key
    if key == ("get", "/metrics"):
        success["content"] = {METRICS_CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}
    elif key in STREAMING:
        success["description"] = "The result; with `\"stream\": true`, Server-Sent Events"
        success["content"][EVENT_STREAM] = {"schema": {"type": "string"}}


def _limit_prompts(schema: dict | None, max_prompts: int) -> None:
    """A completions `prompt` that is a list of prompts holds 1 to `max_prompts` of them; a list of token ids holds at
    least one."""
    assert schema is not None, "the completions request schema is named CompletionRequest"
    for branch in schema["properties"]["prompt"]["anyOf"]:
        if branch.get("type") != "array":
            continue
        branch["minItems"] = 1
        if branch["items"].get("type") != "integer":  # a list of prompts, not one prompt's token ids
            branch["maxItems"] = max_prompts
        if branch["items"].get("type") == "array":  # each prompt's token ids
            branch["items"]["minItems"] = 1
