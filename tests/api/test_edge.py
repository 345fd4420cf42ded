"""What the HTTP edge refuses before any work: strings that are not UTF-8 text, malformed adapter ids (one rule,
`adapters_store.upload.check_id`), chat roles the template would drop, too many prompts in one request; and how a
multi-prompt request that is refused midway gives its queue slots back."""

import json
import random

import httpx
import pytest

from lora_server.adapters_store.upload import ROUTE_WORDS
from lora_server.api.app import create_app
from lora_server.api.config import ApiConfig
from tests.api.conftest import SMALL_MAX_PENDING
from tests.api.helpers import (
    LONG_MAX_NEW_TOKENS,
    LONG_PROMPT,
    adapter_files,
    error_of,
    generate,
    metrics,
    num_unfinished,
    upload,
    value,
    wait_for,
)

FINISHED = "lora_server_finished_requests_total"


def post_json(client: httpx.Client, path: str, body: dict) -> httpx.Response:
    # json.dumps writes a lone surrogate as its `\ud8xx` escape, exactly as a hostile client would send it.
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def named_field(response: httpx.Response) -> str:
    """The field a 400 names: OpenAI's `param`, or the start of our message (`field: what is wrong`)."""
    assert response.status_code == 400, response.text
    error = error_of(response)
    return error["param"] if "param" in error else error["message"].split(":")[0]


# ---------------------------------------------------------------- strings that are not UTF-8 text


def _surrogate_cases(bad: str) -> list[tuple[str, dict, str]]:
    chat = {"model": "demo", "max_tokens": 2}
    return [
        ("/v1/generate", {"prompt": f"hello {bad} => "}, "prompt"),
        ("/v1/generate", {"prompt": "x", "adapter_id": f"up{bad}"}, "adapter_id"),
        ("/v1/generate", {"prompt": "x", "stop": ["a", bad]}, "stop.1"),
        ("/v1/completions", {"model": bad, "prompt": "x", "max_tokens": 2}, "model"),
        ("/v1/completions", {"model": "demo", "prompt": ["x", bad], "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"model": "demo", "prompt": "x", "stop": bad, "max_tokens": 2}, "stop"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": bad}]}, "messages.0.content"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": bad}]}]},
         "messages.0.content"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": bad, "content": "x"}]}, "messages.0.role"),
        ("/v1/adapters/combine", {"adapter_id": bad, "sources": [{"id": "upper"}]}, "adapter_id"),
        ("/v1/adapters/combine", {"adapter_id": "c", "sources": [{"id": bad}]}, "sources.0.id"),
    ]


@pytest.mark.parametrize("case", range(len(_surrogate_cases("x"))))
def test_a_lone_surrogate_is_a_400_naming_the_field(acme, case):
    seed = random.randrange(2**32)
    bad = chr(random.Random(seed).randrange(0xD800, 0xE000))  # any lone surrogate, high or low
    path, body, field = _surrogate_cases(bad)[case]
    response = post_json(acme, path, body)
    assert named_field(response) == field, f"seed {seed}: {response.text}"
    assert "UTF-8" in error_of(response)["message"]


# ---------------------------------------------------------------- adapter ids: one rule, before any store access


BAD_IDS = ["..", ".", "...", "combine", "merge", "a/b", "x" * 129]


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_a_malformed_adapter_id_is_a_400_wherever_it_is_given(acme, bad_id):
    before = metrics(acme)
    fields = {
        "adapter_id": upload(acme, bad_id, "upper"),
        "generate adapter_id": generate(acme, adapter=bad_id),
        "model": post_json(acme, "/v1/completions", {"model": bad_id, "prompt": "x", "max_tokens": 2}),
        "chat model": post_json(acme, "/v1/chat/completions", {"model": bad_id, "max_tokens": 2,
                                                               "messages": [{"role": "user", "content": "x"}]}),
        "combine adapter_id": post_json(acme, "/v1/adapters/combine", {"adapter_id": bad_id,
                                                                        "sources": [{"id": "upper"}]}),
        "sources[0].id": post_json(acme, "/v1/adapters/combine", {"adapter_id": "c", "sources": [{"id": bad_id}]}),
    }
    expected = {"adapter_id": "adapter_id", "generate adapter_id": "adapter_id", "model": "model",
                "chat model": "model", "combine adapter_id": "adapter_id", "sources[0].id": "sources[0].id"}
    assert {name: named_field(response) for name, response in fields.items()} == expected
    assert value(metrics(acme), "lora_server_adapter_uploads_total", result="invalid") == \
        value(before, "lora_server_adapter_uploads_total", result="invalid") + 1
    assert bad_id not in {a["id"] for a in acme.get("/v1/adapters").json()["data"]}


@pytest.mark.parametrize("bad_id", ["%2E%2E", "%2E", "...", "combine", "merge", "x" * 129])
def test_a_malformed_adapter_id_in_a_path_is_a_400(acme, bad_id):
    # Percent-encoded so that the client sends the segment as it is (a plain ".." is resolved away by clients).
    responses = [acme.get(f"/v1/adapters/{bad_id}"), acme.delete(f"/v1/adapters/{bad_id}"),
                 acme.put(f"/v1/adapters/{bad_id}", files=adapter_files("upper")),
                 acme.post(f"/v1/adapters/{bad_id}/merge"), acme.get(f"/v1/models/{bad_id}")]
    assert [named_field(response) for response in responses] == ["adapter_id"] * 4 + ["model"], \
        [response.text for response in responses]


def test_the_base_model_name_and_good_ids_still_pass(acme):
    assert acme.get("/v1/models/demo").status_code == 200
    assert acme.get("/v1/adapters/upper").status_code == 200
    assert acme.get("/v1/adapters/no.such_adapter-1").status_code == 404


def test_route_words_are_every_fixed_segment_under_v1_adapters():
    paths = create_app(ApiConfig(), None, lambda: None).openapi()["paths"]
    segments = {segment for path in paths if path.startswith("/v1/adapters/")
                for segment in path.removeprefix("/v1/adapters/").split("/") if not segment.startswith("{")}
    assert segments == set(ROUTE_WORDS)


# ---------------------------------------------------------------- chat roles


@pytest.mark.parametrize("role, why", [("bogus", "one of system, user, assistant"), ("developer", "'system'"),
                                       ("tool", "does not call tools")])
def test_a_chat_message_of_an_unknown_role_is_refused_not_dropped(acme, role, why):
    messages = [{"role": "user", "content": "hello"}, {"role": role, "content": "world"}]
    response = post_json(acme, "/v1/chat/completions", {"model": "demo", "messages": messages, "max_tokens": 2})
    assert named_field(response) == "messages[1].role"
    assert why in error_of(response)["message"]


def test_the_known_chat_roles_are_accepted(acme):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "hello"}]
    response = post_json(acme, "/v1/chat/completions", {"model": "demo", "messages": messages, "max_tokens": 2})
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------- prompts per request


def test_too_many_prompts_in_one_completions_request_is_a_400(acme):
    default_limit = ApiConfig().max_prompts_per_request
    before = value(metrics(acme), FINISHED, finish_reason="abort")
    response = post_json(acme, "/v1/completions", {"model": "demo", "prompt": ["x"] * (default_limit + 1),
                                                   "max_tokens": 1})
    assert named_field(response) == "prompt" and error_of(response)["code"] == "too_many_prompts"
    assert f"limit of {default_limit}" in error_of(response)["message"]
    assert value(metrics(acme), FINISHED, finish_reason="abort") == before, "refused before any was submitted"
    token_ids = [random.randrange(3, 98) for _ in range(default_limit + 1)]  # the demo's ids are 0..97
    one_list = post_json(acme, "/v1/completions", {"model": "demo", "prompt": token_ids, "max_tokens": 1})
    assert one_list.status_code == 200, "a list of token ids is one prompt, whatever its length"


def test_a_multi_prompt_request_refused_midway_aborts_those_already_queued(small):
    """--max-pending 2 and three prompts: the first two are queued, the third is a 429, and the two are aborted at
    once rather than left to run (the client has its 429 and will never read them)."""
    before = value(metrics(small), FINISHED, finish_reason="abort")
    body = {"model": "demo", "prompt": [LONG_PROMPT] * (SMALL_MAX_PENDING + 1), "max_tokens": LONG_MAX_NEW_TOKENS}
    refused = small.post("/v1/completions", json=body)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1", refused.text
    wait_for(lambda: num_unfinished(small) == 0)
    assert value(metrics(small), FINISHED, finish_reason="abort") - before == SMALL_MAX_PENDING
    assert small.post("/v1/completions", json={**body, "prompt": "x", "max_tokens": 2}).status_code == 200


# ---------------------------------------------------------------- sizes: every 413 counted, combine as upload


def test_uploads_refused_by_the_body_gate_are_counted_too_large(server, acme):
    name = "lora_server_adapter_uploads_total"
    over = b"\0" * (3 * (1 << 20))  # over the server's upload body limit (its --max-upload-bytes + 1 MiB)
    files = {**adapter_files("upper"), "adapter_model": ("adapter_model.safetensors", over, "x")}
    before = value(metrics(acme), name, result="too_large")
    assert acme.post("/v1/adapters", data={"adapter_id": "gate-post"}, files=files).status_code == 413
    assert acme.put("/v1/adapters/gate-put", files=files).status_code == 413

    def chunks():  # no Content-Length: the gate cuts it off as it arrives
        yield (b"--b\r\nContent-Disposition: form-data; name=\"adapter_id\"\r\n\r\ngate-chunked\r\n"
               b"--b\r\nContent-Disposition: form-data; name=\"adapter_model\"; filename=\"m\"\r\n\r\n")
        for _ in range(len(over) // (1 << 16)):
            yield b"\0" * (1 << 16)

    chunked = acme.post("/v1/adapters", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert chunked.status_code == 413
    assert value(metrics(acme), name, result="too_large") - before == 3
    not_uploads = [acme.post("/v1/adapters/combine", content=over, headers={"content-type": "application/json"}),
                   acme.post("/v1/adapters/upper/merge", content=over)]
    assert [response.status_code for response in not_uploads] == [413, 413]
    assert value(metrics(acme), name, result="too_large") - before == 3, "only upload routes count as uploads"


def test_a_combined_adapter_over_the_size_limit_is_413_like_an_upload(acme):
    # Linear combination concatenates ranks: eight copies of `upper` (about 158 kB each) pass the 1 MiB file limit.
    sources = [{"id": "upper", "weight": 0.125}] * 8
    response = post_json(acme, "/v1/adapters/combine", {"adapter_id": "too-big-combined", "sources": sources})
    assert response.status_code == 413, response.text
    error = error_of(response)
    assert error["type"] == "request_too_large" and "adapter_model.safetensors" in error["message"]
    assert acme.get("/v1/adapters/too-big-combined").status_code == 404
