"""Every limit, with a clear JSON error: body and upload size, prompt length against the model's maximum, the cap on
new tokens, the bounded queue (429 + Retry-After) and each tenant's bounded share of it, and routes that do not
exist."""

import argparse
import threading
from pathlib import Path

import openai
import pytest

from lora_server.adapters_store import StoreLimits
from lora_server.api.loading import ServeTarget
from lora_server.api.serve import add_serve_arguments
from lora_server.demo import tasks
from lora_server.engine.build import EngineOptions
from tests.api.conftest import (
    ACME_ADMIN,
    MAX_BODY_BYTES,
    MAX_NEW_TOKENS_LIMIT,
    MAX_PENDING_PER_TENANT,
    MAX_UPLOAD_BYTES,
    SMALL_MAX_PENDING,
)
from tests.api.helpers import (
    LONG_MAX_NEW_TOKENS,
    LONG_PROMPT,
    adapter_files,
    error_of,
    expected,
    generate,
    metrics,
    num_unfinished,
    value,
    wait_for,
)

DEMO_MAX_LEN = 128


def test_a_body_over_the_limit_is_413(acme):
    big = {"prompt": "x" * MAX_BODY_BYTES}
    response = acme.post("/v1/generate", json=big)
    assert response.status_code == 413
    assert error_of(response) == {"type": "request_too_large", "message": "the request body is over this server's "
                                                                          f"limit of {MAX_BODY_BYTES} bytes"}
    openai_shape = acme.post("/v1/completions", json={"model": "demo", **big})
    assert openai_shape.status_code == 413 and error_of(openai_shape)["code"] is None


def test_a_chunked_body_is_cut_off_at_the_limit(acme):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    response = acme.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and error_of(response)["type"] == "request_too_large"


def test_an_upload_over_the_limit_is_413(acme):
    before = metrics(acme)
    files = {**adapter_files("upper"), "adapter_model": ("adapter_model.safetensors", b"\0" * (MAX_UPLOAD_BYTES + 1),
                                                         "application/octet-stream")}
    response = acme.post("/v1/adapters", data={"adapter_id": "too-big"}, files=files)
    assert response.status_code == 413 and "adapter_model" in error_of(response)["message"]
    whole_body = {**files, "adapter_model": ("adapter_model.safetensors", b"\0" * (3 * MAX_UPLOAD_BYTES), "x")}
    assert acme.post("/v1/adapters", data={"adapter_id": "too-big"}, files=whole_body).status_code == 413
    after = metrics(acme)
    name = "lora_server_adapter_uploads_total"
    assert value(after, name, result="too_large") - value(before, name, result="too_large") == 2, \
        "the second never reached the route (the gate refused it from its Content-Length), and is counted all the same"


def test_a_prompt_over_the_models_length_is_400(server, acme):
    response = generate(acme, "x" * DEMO_MAX_LEN)
    assert response.status_code == 400
    assert f"at most {DEMO_MAX_LEN} tokens" in error_of(response)["message"]
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=ACME_ADMIN, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            client.completions.create(model="demo", prompt="x" * DEMO_MAX_LEN)
    assert raised.value.code == "context_length_exceeded"


def test_max_new_tokens_over_the_cap_is_400_not_cut(acme):
    response = generate(acme, max_new_tokens=MAX_NEW_TOKENS_LIMIT + 1)
    assert response.status_code == 400
    assert f"limit of {MAX_NEW_TOKENS_LIMIT}" in error_of(response)["message"]
    chat = acme.post("/v1/chat/completions", json={"model": "demo", "messages": [{"role": "user", "content": "x"}],
                                                   "max_tokens": MAX_NEW_TOKENS_LIMIT + 1})
    assert chat.status_code == 400 and error_of(chat)["param"] == "max_tokens"
    assert generate(acme, max_new_tokens=MAX_NEW_TOKENS_LIMIT).status_code == 200, "the cap itself is allowed"


def test_unknown_routes_and_methods_are_json(acme):
    missing = acme.get("/v1/nothing-here")
    assert missing.status_code == 404 and error_of(missing)["type"] == "not_found_error"
    wrong_method = acme.get("/v1/generate")
    assert wrong_method.status_code == 405 and "message" in error_of(wrong_method)


def test_a_full_queue_is_429_with_retry_after(small):
    results = []

    def long_request() -> None:
        results.append(small.post("/v1/generate", json={"prompt": LONG_PROMPT, "max_new_tokens": LONG_MAX_NEW_TOKENS}))

    threads = [threading.Thread(target=long_request) for _ in range(SMALL_MAX_PENDING)]
    for thread in threads:
        thread.start()
    wait_for(lambda: num_unfinished(small) == SMALL_MAX_PENDING)
    refused = small.post("/v1/generate", json={"prompt": tasks.make_prompt("x")})
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1" and error_of(refused)["type"] == "rate_limit_error"
    for thread in threads:
        thread.join()
    assert [r.json()["finish_reason"] for r in results] == ["length"] * SMALL_MAX_PENDING
    assert small.post("/v1/generate", json={"prompt": tasks.make_prompt("x")}).status_code == 200, "room again"


def test_a_tenant_at_its_bound_is_429_while_another_tenant_gets_in(acme, globex):
    held = []
    # One request of many prompts: every one is queued at the same moment, so all are unfinished together.
    holder = threading.Thread(target=lambda: held.append(acme.post("/v1/completions", json={
        "model": "demo", "prompt": [LONG_PROMPT] * MAX_PENDING_PER_TENANT, "max_tokens": LONG_MAX_NEW_TOKENS,
        "temperature": 0})))
    holder.start()
    wait_for(lambda: num_unfinished(acme) >= MAX_PENDING_PER_TENANT)
    refused, admitted = generate(acme), generate(globex)
    holder.join()
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert error_of(refused)["type"] == "rate_limit_error"
    assert "tenant 'acme'" in error_of(refused)["message"]
    assert f"limit per tenant is {MAX_PENDING_PER_TENANT}" in error_of(refused)["message"]
    assert admitted.status_code == 200 and admitted.json()["text"] == expected(None)
    assert held[0].status_code == 200
    assert [c["finish_reason"] for c in held[0].json()["choices"]] == ["length"] * MAX_PENDING_PER_TENANT
    assert generate(acme).status_code == 200, "room again"


@pytest.mark.parametrize("argv, tenants, bound", [
    ([], ("default",), 1024),  # an open server: its one tenant may use the whole queue
    ([], ("acme", "globex"), 512),  # several: half, so no tenant can lock the others out
    (["--max-pending", "3"], ("acme", "globex"), 1),
    (["--max-pending-per-tenant", "7"], ("acme", "globex"), 7),
])
def test_the_per_tenant_bound_is_all_of_the_queue_for_one_tenant_and_half_for_several(argv, tenants, bound):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    target = ServeTarget(model_dir=None, model_name=None, store_dir=Path("unused"), engine_options=EngineOptions(),
                         store_limits=StoreLimits(), max_pending=args.max_pending, tenants=tenants,
                         max_pending_per_tenant=args.max_pending_per_tenant)
    assert target.resolved_max_pending_per_tenant == bound
