"""The dialects users bring from OpenAI and vLLM, through the official `openai` client: no field silently ignored,
OpenAI's error shape on every OpenAI route, adapters loaded by path (--lora-modules, /v1/load_lora_adapter), and
/tokenize, /detokenize, /version in vLLM's shapes."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lora_server.demo import tasks
from lora_server.demo.paths import demo_adapter_dirs
from lora_server.engine.sampler import SamplingParams
from tests.api.conftest import ACME_ADMIN, ACME_USER, KEYS, _serve, client_for
from tests.api.helpers import HELLO, error_of, expected, generate

BASE = "demo"
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}
EXTRAS_LANDED = "ignore_eos" in SamplingParams.__dataclass_fields__  # the engine's half of issue 17


@pytest.fixture(scope="module")
def adapter_root(api_root) -> Path:
    """An allowed directory holding the demo's `upper` adapter, and a directory outside it holding `title`."""
    root = api_root / "dialects-allowed"
    outside = api_root / "dialects-outside"
    shutil.copytree(demo_adapter_dirs()["upper"], root / "upper-copy", dirs_exist_ok=True)
    shutil.copytree(demo_adapter_dirs()["title"], outside / "title-copy", dirs_exist_ok=True)
    return root


@pytest.fixture(scope="module")
def dialect_server(api_root, adapter_root) -> Iterator:
    keys_file = api_root / "dialect-keys.json"
    keys_file.write_text(json.dumps(KEYS))
    yield from _serve(api_root / "dialects", "--api-keys", str(keys_file), "--adapter-dirs-allowed", str(adapter_root),
                      "--lora-modules", f"preloaded={demo_adapter_dirs()['rot13']}")


@pytest.fixture(scope="module")
def oai(dialect_server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{dialect_server.url}/v1", api_key=ACME_ADMIN, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def http(dialect_server) -> Iterator[httpx.Client]:
    with client_for(dialect_server, ACME_ADMIN) as client:
        yield client


def chat(client: openai.OpenAI, **fields):
    return client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": HELLO}], max_tokens=4,
                                          **fields)


def complete(client: openai.OpenAI, **fields):
    return client.completions.create(model=BASE, prompt=tasks.make_prompt(HELLO), max_tokens=4, **fields)


# ---------------------------------------------------------------- never silently ignore a field


@pytest.mark.parametrize("call", [chat, complete])
@pytest.mark.parametrize("fields, param", [
    ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
    ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
    ({"n": 2}, "n"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: OpenAI's 400 too
    ({"extra_body": {"min_tokens": "three"}}, "min_tokens"),
    ({"extra_body": {"ignore_eos": "yes"}}, "ignore_eos"),
    ({"extra_body": {"stop_token_ids": ["a"]}}, "stop_token_ids.0"),
    ({"extra_body": {"repetition_penalty": "high"}}, "repetition_penalty"),
])
def test_openai_routes_refuse_what_they_would_ignore_naming_the_field(oai, call, fields, param):
    with pytest.raises(openai.BadRequestError) as raised:
        call(oai, **fields)
    assert raised.value.param == param, raised.value.body
    assert set(raised.value.body) == OPENAI_ERROR_KEYS


@pytest.mark.parametrize("fields, param", [({"best_of": 2}, "best_of"), ({"echo": True}, "echo"),
                                           ({"suffix": "x"}, "suffix")])
def test_completions_refuse_their_unsupported_fields(oai, fields, param):
    with pytest.raises(openai.BadRequestError) as raised:
        complete(oai, **fields)
    assert raised.value.param == param and raised.value.code == "unsupported_parameter"


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"modalities": ["audio"]}, "modalities"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
])
def test_chat_refuses_its_unsupported_fields(oai, fields, param):
    with pytest.raises(openai.BadRequestError) as raised:
        chat(oai, **fields)
    assert raised.value.param == param and raised.value.code == "unsupported_parameter"


def test_openais_bookkeeping_fields_are_accepted(oai):
    completion = chat(oai, user="someone", metadata={"k": "v"}, store=False, temperature=0)
    assert completion.choices[0].message.content
    assert complete(oai, user="someone", temperature=0).choices[0].text


@pytest.mark.parametrize("fields, param", [({"guided_json": {}}, "guided_json"), ({"min_tokens": 1.5}, "min_tokens"),
                                           ({"include_stop_str_in_output": "no"}, "include_stop_str_in_output"),
                                           ({"min_p": "x"}, "min_p")])
def test_native_route_refuses_unknown_and_mistyped_fields(http, fields, param):
    response = generate(http, **fields)
    assert response.status_code == 400 and param in error_of(response)["message"], response.text


# vLLM's documented request bodies for the extras, as-is (with the demo's model and prompt)
VLLM_EXTRAS = {"repetition_penalty": 1.1, "presence_penalty": 0.2, "frequency_penalty": 0.2, "min_p": 0.05,
               "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [2], "include_stop_str_in_output": True}


@pytest.mark.skipif(not EXTRAS_LANDED, reason="the engine's sampling extras have not landed yet")
def test_vllm_extras_are_accepted_on_every_route(oai, http):
    assert complete(oai, temperature=0, extra_body=VLLM_EXTRAS).choices[0].finish_reason == "length"
    assert chat(oai, temperature=0, extra_body=VLLM_EXTRAS).choices[0].finish_reason == "length"
    assert generate(http, max_new_tokens=4, **VLLM_EXTRAS).json()["finish_reason"] == "length"


@pytest.mark.skipif(not EXTRAS_LANDED, reason="the engine's sampling extras have not landed yet")
@pytest.mark.parametrize("field, value", [("repetition_penalty", 0.0), ("min_p", 1.5), ("min_tokens", -1)])
def test_extras_out_of_range_are_400s_naming_the_field(oai, field, value):
    with pytest.raises(openai.BadRequestError) as raised:
        complete(oai, extra_body={field: value})
    assert raised.value.param == field


# ---------------------------------------------------------------- OpenAI's error shape on every OpenAI route


def test_every_openai_route_answers_openais_error_shape(oai, dialect_server):
    """A bad request to each route, through the openai client: its exception type, and the body's four keys with the
    offending parameter named."""
    cases = [("/completions", {"model": BASE, "prompt": "x", "temperature": -1}, openai.BadRequestError,
              "temperature"),
             ("/completions", {"model": BASE, "prompt": "x", "logprobs": -1}, openai.BadRequestError, "logprobs"),
             ("/chat/completions", {"model": BASE, "messages": []}, openai.BadRequestError, "messages"),
             ("/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
              openai.NotFoundError, "model"),
             ("/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}, openai.PermissionDeniedError,
              "lora_path"),
             ("/unload_lora_adapter", {"lora_name": "never-loaded"}, openai.NotFoundError, None),
             ("/unload_lora_adapter", {"lora_name": "bad id!"}, openai.BadRequestError, "lora_name")]
    for path, body, error_type, param in cases:
        with pytest.raises(error_type) as raised:
            oai.post(path, body=body, cast_to=httpx.Response)
        assert set(raised.value.body) == OPENAI_ERROR_KEYS, (path, raised.value.body)
        assert raised.value.param == param, (path, raised.value.body)
    with pytest.raises(openai.NotFoundError) as raised:
        oai.models.retrieve("no-such-model")
    assert raised.value.code == "model_not_found" and raised.value.param == "model"
    with pytest.raises(openai.BadRequestError) as raised:
        oai.models.retrieve("bad id!")
    assert set(raised.value.body) == OPENAI_ERROR_KEYS
    root = dialect_server.url
    for path in ("/tokenize", "/detokenize"):
        response = httpx.post(root + path, json={"tokens": "x", "prompt": 1},
                              headers={"Authorization": f"Bearer {ACME_ADMIN}"})
        assert response.status_code == 400 and set(error_of(response)) == OPENAI_ERROR_KEYS, response.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_invalid_json_is_openais_400_without_a_made_up_param(http, path):
    response = http.post(path, content=b'{"model": "demo", "prompt": ', headers={"Content-Type": "application/json"})
    error = error_of(response)
    assert response.status_code == 400 and set(error) == OPENAI_ERROR_KEYS
    assert error["param"] is None and "not valid JSON" in error["message"], error


# ---------------------------------------------------------------- adapters by path


def test_lora_modules_are_stored_at_startup(oai):
    assert "preloaded" in {model.id for model in oai.models.list()}
    completion = oai.completions.create(model="preloaded", prompt=tasks.make_prompt(HELLO), max_tokens=40,
                                        temperature=0)
    assert completion.choices[0].text == expected("rot13")


def test_load_and_unload_an_adapter_by_path_as_vllm_does(http, adapter_root):
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "by-path", "lora_path": str(adapter_root /
                                                                                                "upper-copy")})
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'by-path' added successfully."
    body = {"model": "by-path", "prompt": tasks.make_prompt(HELLO), "max_tokens": 40, "temperature": 0}
    assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == expected("upper")
    again = http.post("/v1/load_lora_adapter", json={"lora_name": "by-path", "lora_path": str(adapter_root /
                                                                                             "upper-copy")})
    assert again.status_code == 409
    response = http.post("/v1/unload_lora_adapter", json={"lora_name": "by-path"})
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'by-path' removed successfully."
    assert http.post("/v1/completions", json=body).status_code == 404


def test_load_refuses_paths_outside_the_allowed_directories(http, adapter_root, tmp_path):
    outside = adapter_root.parent / "dialects-outside" / "title-copy"
    escape = adapter_root / "escape"
    if not escape.exists():
        escape.symlink_to(outside, target_is_directory=True)
    cases = [(str(outside), 403), (str(escape), 403), (f"{adapter_root}/../dialects-outside/title-copy", 400),
             ("upper-copy", 400), (str(adapter_root / "missing"), 400)]
    for path, status in cases:
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "nope", "lora_path": path})
        assert response.status_code == status and error_of(response)["param"] == "lora_path", (path, response.text)
    assert http.get("/v1/models/nope").status_code == 404


def test_load_is_for_admins_only(dialect_server, adapter_root):
    with client_for(dialect_server, ACME_USER) as user:
        response = user.post("/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": str(adapter_root /
                                                                                                 "upper-copy")})
        assert response.status_code == 403
        assert user.post("/v1/unload_lora_adapter", json={"lora_name": "preloaded"}).status_code == 403


def test_load_is_403_without_adapter_dirs_allowed(acme):
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
                       ("/v1/unload_lora_adapter", {"lora_name": "upper"})):
        response = acme.post(path, json=body)
        assert response.status_code == 403 and error_of(response)["code"] == "adapter_dirs_not_allowed"
    assert acme.get("/v1/models/upper").status_code == 200  # the refused unload deleted nothing


# ---------------------------------------------------------------- tokenize, detokenize, version


def test_tokenize_and_detokenize_in_vllms_shapes(http, dialect_server):
    prompt = tasks.make_prompt(HELLO)
    tokens = http.post("/tokenize", json={"model": BASE, "prompt": prompt}).json()
    assert set(tokens) == {"count", "max_model_len", "tokens", "token_strs"} and tokens["token_strs"] is None
    assert tokens["count"] == len(tokens["tokens"]) == 16 and tokens["max_model_len"] == 128
    no_bos = http.post("/tokenize", json={"prompt": prompt, "add_special_tokens": False}).json()
    assert no_bos["tokens"] == tokens["tokens"][1:]
    text = http.post("/detokenize", json={"model": BASE, "tokens": no_bos["tokens"]}).json()
    assert text == {"prompt": prompt}
    chat_tokens = http.post("/tokenize", json={"messages": [{"role": "user", "content": HELLO}]}).json()
    assert chat_tokens["count"] == 16  # as /v1/chat/completions counts its prompt
    assert http.post("/detokenize", json={"tokens": [10**9]}).json()["error"]["param"] == "tokens"
    version = http.get("/version").json()
    assert set(version) == {"version"} and version["version"][0].isdigit()
