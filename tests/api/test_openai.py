"""The OpenAI-compatible routes through the official `openai` client: completions, chat, streaming, models, errors."""

from collections.abc import Iterator

import openai
import pytest

from lora_server.demo import tasks
from tests.api.conftest import ACME_ADMIN
from tests.api.helpers import HELLO, error_of, expected

BASE = "demo"


@pytest.fixture(scope="module")
def client(server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=ACME_ADMIN, max_retries=0) as client:
        yield client


@pytest.mark.parametrize("model", [BASE, "upper", "rot13"])
def test_completion(client, model):
    completion = client.completions.create(model=model, prompt=tasks.make_prompt(HELLO), max_tokens=40,
                                           temperature=0)
    choice = completion.choices[0]
    assert choice.text == expected(None if model == BASE else model) and choice.finish_reason == "stop"
    assert completion.model == model and completion.object == "text_completion"
    assert completion.usage.prompt_tokens == 16 and completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == 28


def test_completion_stream_with_usage(client):
    stream = client.completions.create(model="reverse", prompt=tasks.make_prompt(HELLO), max_tokens=40,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == expected("reverse")
    assert text_chunks[-1].choices[0].finish_reason == "stop"
    assert len(text_chunks) > 5, "streamed, not sent at the end"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completion_of_several_prompts(client):
    completion = client.completions.create(model="title", prompt=[tasks.make_prompt("one two"),
                                                                  tasks.make_prompt("three four")],
                                           max_tokens=40, temperature=0)
    assert [c.text for c in sorted(completion.choices, key=lambda c: c.index)] == ["One Two", "Three Four"]


def test_completion_logprobs(client):
    completion = client.completions.create(model="upper", prompt=tasks.make_prompt(HELLO), max_tokens=5,
                                           temperature=0, logprobs=3)
    logprobs = completion.choices[0].logprobs
    assert "".join(logprobs.tokens) == "HELLO" and len(logprobs.token_logprobs) == 5
    assert all(len(top) == 3 for top in logprobs.top_logprobs) and logprobs.text_offset == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("model", [BASE, "title"])
def test_chat_completion(client, model):
    completion = client.chat.completions.create(model=model, messages=[{"role": "user", "content": HELLO}],
                                                temperature=0)
    message = completion.choices[0].message
    assert message.role == "assistant" and message.content == expected(None if model == BASE else model)
    assert completion.choices[0].finish_reason == "stop" and completion.object == "chat.completion"


def test_chat_stream(client):
    stream = client.chat.completions.create(model="rot13", messages=[{"role": "user", "content": HELLO}],
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected("rot13")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"] and chunks[-1].usage.prompt_tokens == 16


def test_chat_logprobs(client):
    completion = client.chat.completions.create(model="upper", messages=[{"role": "user", "content": HELLO}],
                                                temperature=0, max_tokens=3, logprobs=True, top_logprobs=2)
    content = completion.choices[0].logprobs.content
    assert [entry.token for entry in content] == ["H", "E", "L"]
    assert all(len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token for entry in content)


def test_models_lists_the_base_and_the_callers_adapters(client):
    models = {model.id: model for model in client.models.list()}
    assert set(tasks.ADAPTER_NAMES) | {BASE} <= set(models)
    assert models[BASE].parent is None
    assert all(models[name].parent == BASE and models[name].owned_by == "acme" for name in tasks.ADAPTER_NAMES)
    assert client.models.retrieve("upper").id == "upper"


def test_unknown_model_is_404_in_openais_shape(client, acme):
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="no-such-model", prompt="x => ", temperature=0)
    assert raised.value.code == "model_not_found"
    response = acme.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user",
                                                                                       "content": "x"}]})
    assert response.status_code == 404
    assert set(error_of(response)) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("fields, param", [({"n": 2}, "n"), ({"echo": True}, "echo"),
                                           ({"logit_bias": {"1": 5.0}}, "logit_bias")])
def test_unsupported_parameters_are_refused_not_ignored(client, fields, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=BASE, prompt="x => ", **fields)
    assert raised.value.param == param


def test_bad_key_is_an_authentication_error(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-a-key-00000000", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
