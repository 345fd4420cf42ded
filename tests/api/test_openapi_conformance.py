"""The OpenAPI document is true: what it says of each route (error statuses and bodies, media types, the bearer key,
the prompt rules) is what the server answers. Checked by reading the document, and by schemathesis against a live
server: every operation, positive and negative examples, every response checked against the document.

Schemathesis' `positive_data_acceptance` check is left out: a schema cannot say that a prompt's token count fits the
model, which token ids exist, or which adapters a tenant has, so a schema-valid request may rightly be a 400 or 404.
Generation is bounded by the fixture's flags (8 new tokens at most, 4 prompts per request, 64 KiB bodies), so no
example waits on a long generation or sends a large body; the multipart upload routes are fuzzed like the rest (their
random files are refused as invalid adapters)."""

import json
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from lora_server.api.app import create_app
from lora_server.api.auth import ApiKeys, Principal
from lora_server.api.config import ApiConfig
from tests.api.conftest import ACME_ADMIN, KEYS
from tests.api.helpers import error_of
from tests.api.server_process import ServerProcess

MAX_NEW_TOKENS = 8
MAX_PROMPTS = 4
ADMIN_OPERATIONS = {("post", "/v1/adapters"), ("put", "/v1/adapters/{adapter_id}"),
                    ("delete", "/v1/adapters/{adapter_id}"), ("post", "/v1/adapters/combine"),
                    ("post", "/v1/adapters/{adapter_id}/merge"), ("delete", "/v1/adapters/{adapter_id}/merge"),
                    ("post", "/v1/load_lora_adapter"), ("post", "/v1/unload_lora_adapter")}
# The routes that answer OpenAI's error shape: OpenAI's own, and vLLM's
OPENAI_SHAPED = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model}", "/v1/load_lora_adapter",
                 "/v1/unload_lora_adapter", "/tokenize", "/detokenize", "/version"}
GENERATION = {("post", "/v1/generate"), ("post", "/v1/completions"), ("post", "/v1/chat/completions")}
PUBLIC = {("get", "/health"), ("get", "/ready"), ("get", "/metrics")}
AUTH = {"Authorization": f"Bearer {ACME_ADMIN}"}


def document(with_keys: bool, config: ApiConfig | None = None) -> dict:
    keys = ApiKeys([("k" * 16, Principal("acme", "admin"))]) if with_keys else None
    return create_app(config or ApiConfig(), keys, lambda: None).openapi()


def operations(doc: dict) -> Iterator[tuple[tuple[str, str], dict]]:
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            yield (method, path), operation


# ---------------------------------------------------------------- the document, read


def test_no_operation_documents_fastapis_validation_error():
    doc = document(with_keys=True)
    assert "HTTPValidationError" not in json.dumps(doc)
    for key, operation in operations(doc):
        if "422" in operation["responses"]:  # only where the engine says an adapter could not be loaded
            assert key in GENERATION and "could not be loaded" in operation["responses"]["422"]["description"]


def test_each_operation_documents_its_real_error_statuses_with_the_error_body():
    doc = document(with_keys=True)
    for key, operation in operations(doc):
        responses = operation["responses"]
        statuses = {int(status) for status in responses if int(status) >= 400}
        if key in PUBLIC:
            assert 401 not in statuses and operation["security"] == [], key
        else:
            no_body = key in {("get", "/v1/models"), ("get", "/version")}  # nothing a client sends can be invalid
            assert {503 if no_body else 400, 401, 413, 503} <= statuses, key
        assert (403 in statuses) == (key in ADMIN_OPERATIONS), key
        assert (429 in statuses) == (key in GENERATION), key
        openai = key[1] in OPENAI_SHAPED
        for status in statuses:
            schema = responses[str(status)]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/" + ("OpenAIError" if openai else "Error")}, key
    assert doc["paths"]["/v1/generate"]["post"]["responses"]["429"]["headers"]["Retry-After"]["required"]
    assert doc["paths"]["/v1/adapters"]["post"]["responses"]["413"]
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}


def test_an_open_server_documents_no_key():
    doc = document(with_keys=False)
    assert "securitySchemes" not in doc["components"] and "security" not in doc
    assert all("401" not in operation["responses"] for _, operation in operations(doc))


def test_the_schema_says_exactly_one_of_prompt_and_prompt_token_ids():
    schema = document(with_keys=False)["components"]["schemas"]["GenerateRequest"]
    branches = [set(branch["required"]) for branch in schema["oneOf"]]
    assert branches == [{"prompt"}, {"prompt_token_ids"}]


def test_the_schema_gives_the_prompts_per_request_and_the_id_pattern():
    doc = document(with_keys=False, config=ApiConfig(max_prompts_per_request=5))
    prompt = doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert sorted(branch.get("maxItems", 0) for branch in prompt) == [0, 0, 5, 5]
    parameter = doc["paths"]["/v1/adapters/{adapter_id}"]["get"]["parameters"][0]
    assert parameter["name"] == "adapter_id" and parameter["schema"]["pattern"] == "^[A-Za-z0-9._-]{1,128}$"


def test_streams_and_metrics_document_their_media_types():
    doc = document(with_keys=False)
    for path in ("/v1/generate", "/v1/completions", "/v1/chat/completions"):
        assert set(doc["paths"][path]["post"]["responses"]["200"]["content"]) == {"application/json",
                                                                                  "text/event-stream"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


# ---------------------------------------------------------------- 405 carries Allow


@pytest.mark.parametrize("method, path, allow", [("TRACE", "/v1/generate", "POST"), ("GET", "/v1/generate", "POST"),
                                                 ("OPTIONS", "/v1/adapters", "GET, POST"),
                                                 ("TRACE", "/v1/adapters/upper", "DELETE, GET, PUT"),
                                                 ("OPTIONS", "/v1/adapters/combine", "POST")])
def test_a_405_names_every_allowed_method(acme, method, path, allow):
    response = acme.request(method, path)
    assert response.status_code == 405 and response.headers["allow"] == allow
    assert error_of(response)["type"] == "invalid_request_error"


# ---------------------------------------------------------------- the document, checked against a live server


# The live server's flags, and the same as an ApiConfig: the document is built here, at collection (schemathesis
# parametrizes from it), and checked to be the live server's own before anything else.
CONFORMANCE_CONFIG = ApiConfig(max_new_tokens_limit=MAX_NEW_TOKENS, default_max_new_tokens=MAX_NEW_TOKENS,
                               max_prompts_per_request=MAX_PROMPTS, max_body_bytes=64 * 1024,
                               max_upload_bytes=1 << 20)
CONFORMANCE_FLAGS = ("--max-new-tokens-limit", str(MAX_NEW_TOKENS), "--default-max-new-tokens", str(MAX_NEW_TOKENS),
                     "--max-prompts-per-request", str(MAX_PROMPTS), "--max-body-bytes", "64KiB",
                     "--max-upload-bytes", "1MiB")


@pytest.fixture(scope="module")
def conformance_server(api_root) -> Iterator[ServerProcess]:
    keys_file = api_root / "conformance-keys.json"
    keys_file.write_text(json.dumps(KEYS))
    server = ServerProcess(api_root / "conformance", "--api-keys", str(keys_file), *CONFORMANCE_FLAGS)
    try:
        server.wait_ready()
        live = httpx.get(f"{server.url}/openapi.json", headers=AUTH, timeout=30).json()
        assert live == schema.raw_schema, "the live server's document is the one schemathesis generates from"
        yield server
    finally:
        server.stop()


# Why from_dict and not schemathesis.pytest.from_fixture: the latter does not run under pytest 9 (schemathesis 4.32).
schema = schemathesis.openapi.from_dict(document(with_keys=True, config=CONFORMANCE_CONFIG))


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_server_answers_as_its_openapi_document_says(case, conformance_server):
    case.call_and_validate(base_url=conformance_server.url, headers=AUTH, timeout=30,
                           excluded_checks=[positive_data_acceptance])
