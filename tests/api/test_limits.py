"""Every limit, with a clear JSON error: body and upload size, prompt length against the model's maximum, the cap on
new tokens, the bounded queue (429 + Retry-After), and routes that do not exist."""

import threading

import openai
import pytest

from server.demo import tasks
from tests.api.conftest import ACME_ADMIN, MAX_BODY_BYTES, MAX_NEW_TOKENS_LIMIT, MAX_UPLOAD_BYTES, SMALL_MAX_PENDING
from tests.api.helpers import (
    LONG_MAX_NEW_TOKENS,
    LONG_PROMPT,
    adapter_files,
    error_of,
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
    assert value(after, name, result="too_large") - value(before, name, result="too_large") == 1, \
        "the second never reached the route: the middleware refused it from its Content-Length"


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

