"""POST /v1/generate through a real server: each demo adapter's behaviour, token ids, SSE, stop strings, logprobs,
timing headers, and mixed adapters at once."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from lora_server.demo import tasks
from lora_server.demo.paths import DEMO_MODEL_DIR
from lora_server.model.tokenizer import load_tokenizer
from tests.api.helpers import HELLO, error_of, expected, generate, sse_data


@pytest.mark.parametrize("adapter", [None, *tasks.ADAPTER_NAMES])
def test_each_demo_adapter_transforms_the_text(acme, adapter):
    response = generate(acme, adapter=adapter)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == expected(adapter)
    assert body["finish_reason"] == "stop" and body["adapter_id"] == adapter
    assert body["adapter_version"] == (None if adapter is None else 1)
    assert body["usage"] == {"prompt_tokens": len(tasks.make_prompt(HELLO)) + 1,  # one token per char, and BOS
                             "completion_tokens": len(body["token_ids"])}
    assert body["id"].startswith("gen-")


def test_token_ids_in_give_the_same_tokens_out(acme):
    by_text = generate(acme, adapter="upper").json()
    by_ids = acme.post("/v1/generate", json={"prompt_token_ids": _prompt_ids(), "adapter_id": "upper",
                                             "max_new_tokens": 40}).json()
    assert by_ids["token_ids"] == by_text["token_ids"] and by_ids["text"] == "HELLO WORLD"


def _prompt_ids() -> list[int]:
    return load_tokenizer(DEMO_MODEL_DIR).encode(tasks.make_prompt(HELLO))


def test_stream_sends_one_event_per_delta_then_the_finish(acme):
    with acme.stream("POST", "/v1/generate", json={"prompt": tasks.make_prompt(HELLO), "adapter_id": "reverse",
                                                   "max_new_tokens": 40, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_data(list(response.iter_lines()))
    *deltas, final = events
    assert len(deltas) >= len(HELLO) - 1, "text arrives token by token"
    assert all("finish_reason" not in event for event in deltas)
    assert "".join(event["text"] for event in events) == expected("reverse")
    assert final["finish_reason"] == "stop" and final["adapter_version"] == 1
    assert final["usage"]["completion_tokens"] == sum(len(event["token_ids"]) for event in events)


def test_stop_strings_cut_the_text(acme):
    body = generate(acme, adapter="upper", stop=["WOR"]).json()
    assert body["text"] == "HELLO " and body["finish_reason"] == "stop"


def test_max_new_tokens_ends_with_length(acme):
    body = generate(acme, adapter="upper", max_new_tokens=3).json()
    assert body["text"] == "HEL" and body["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3


def test_logprobs_per_token(acme):
    body = generate(acme, adapter="upper", logprobs=2).json()
    assert len(body["logprobs"]) == len(body["token_ids"])
    for token_id, entry in zip(body["token_ids"], body["logprobs"], strict=True):
        assert entry["token_id"] == token_id and entry["logprob"] <= 0 and len(entry["top"]) == 2
        assert entry["top"][0][0] == token_id, "greedy picks the most likely token"


def test_timing_headers(acme):
    for stream in (False, True):
        response = generate(acme, adapter="title", stream=stream)
        assert response.status_code == 200
        queue_s = float(response.headers["x-queue-time-seconds"])
        first_token_s = float(response.headers["x-time-to-first-token-seconds"])
        assert 0 <= queue_s <= first_token_s < 30
        assert response.headers["x-request-id"].startswith("gen-")


def test_mixed_adapters_at_once(acme):
    texts = ["lora adapters", "mixed batch", "hello world", "paged cache"]
    jobs = [(text, adapter) for text in texts for adapter in (None, *tasks.ADAPTER_NAMES)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: generate(acme, job[0], job[1]).json()["text"], jobs))
    assert results == [expected(adapter, text) for text, adapter in jobs]


def test_unknown_adapter_is_404_never_the_base_model(acme):
    response = generate(acme, adapter="no-such-adapter")
    assert response.status_code == 404
    assert error_of(response)["type"] == "not_found_error"


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "x => ", "prompt_token_ids": [1, 2]}, "exactly one"),
    ({"adapter_id": "upper"}, "exactly one"),
    ({"prompt": "x => ", "temprature": 0.5}, "temprature"),
    ({"prompt": "x => ", "temperature": -1}, "temperature"),
    ({"prompt": "x => ", "top_p": 0}, "top_p"),
    ({"prompt": "x => ", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "x => ", "max_new_tokens": "many"}, "max_new_tokens"),
    ({"prompt_token_ids": [1, 100000]}, "token ids"),
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt": "x => ", "logprobs": 99}, "logprobs"),
])
def test_bad_requests_are_400_with_a_message(acme, body, fragment):
    response = acme.post("/v1/generate", json=body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and fragment in error["message"]


def test_a_body_that_is_not_json_says_so(acme):
    response = acme.post("/v1/generate", content=b"prompt=hi", headers={"content-type": "text/plain"})
    assert response.status_code == 400 and "Content-Type: application/json" in error_of(response)["message"]
