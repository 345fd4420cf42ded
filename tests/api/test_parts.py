"""The API's parts without a server: key files, SSE framing, chat templates, per-adapter series, errors, sizes."""

import argparse
import json

import pytest

from lora_server.adapters_store import AdapterError, AdapterNotFound, AdapterUnusable
from lora_server.api.adapter_traffic import AdapterTraffic
from lora_server.api.auth import ApiKeys, ApiKeysError, Principal
from lora_server.api.chat_template import ChatTemplate, ChatTemplateError, Message
from lora_server.api.config import ApiConfig
from lora_server.api.errors import ApiError, api_error_from, error_body
from lora_server.api.serve import add_serve_parser, byte_size
from lora_server.api.sse import parse_sse, sse_event
from lora_server.demo.paths import DEMO_MODEL_DIR
from lora_server.engine.request import EngineStoppedError, QueueFullError, RequestError
from lora_server.engine.sampler import SamplingError

# ---------------------------------------------------------------- keys


def write_keys(tmp_path, keys) -> object:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": keys}))
    return path


def test_keys_authenticate_to_their_tenant_and_role(tmp_path):
    keys = ApiKeys.load(write_keys(tmp_path, [{"key": "k" * 20, "tenant": "a", "role": "admin"},
                                              {"key": "u" * 20, "tenant": "b", "role": "user"}]))
    assert keys.authenticate("k" * 20) == Principal("a", "admin")
    assert keys.authenticate("u" * 20) == Principal("b", "user")
    assert keys.authenticate("k" * 19) is None and keys.authenticate("") is None
    assert keys.tenants == ["a", "b"]


@pytest.mark.parametrize("keys, fragment", [
    ([], "at least one key"),
    ([{"key": "short", "tenant": "a", "role": "admin"}], "at least 16"),
    ([{"key": "k" * 20, "tenant": "a b", "role": "admin"}], "tenant"),
    ([{"key": "k" * 20, "tenant": "a", "role": "root"}], "role"),
    ([{"key": "k" * 20, "tenant": "a"}], "exactly the fields"),
    ([{"key": "k" * 20, "tenant": "a", "role": "user"}, {"key": "k" * 20, "tenant": "b", "role": "user"}], "twice"),
])
def test_bad_key_files_are_refused_with_the_reason(tmp_path, keys, fragment):
    with pytest.raises(ApiKeysError, match=fragment):
        ApiKeys.load(write_keys(tmp_path, keys))


# ---------------------------------------------------------------- SSE, chat template


def test_sse_events_round_trip():
    events = [{"text": "a\nb", "n": 1}, {"text": "ü"}]
    stream = b"".join(sse_event(e) for e in events) + sse_event({"x": 1}, event="error")
    parsed = parse_sse(stream.decode())
    assert [json.loads(data) for _, data in parsed] == [*events, {"x": 1}]
    assert [name for name, _ in parsed] == [None, None, "error"]


def test_the_demo_chat_template_makes_the_demo_prompt():
    template = ChatTemplate.from_model_dir(DEMO_MODEL_DIR)
    assert template is not None
    assert template.render([Message("user", "hello world")]) == "<s>hello world => "
    conversation = [Message("user", "ab"), Message("assistant", "AB"), Message("user", "cd")]
    assert template.render(conversation) == "<s>ab => AB</s>cd => "


def test_a_template_that_refuses_raises_a_chat_template_error():
    template = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}x")
    with pytest.raises(ChatTemplateError, match="user first"):
        template.render([Message("system", "hi")])


def test_a_model_without_a_template_has_none(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert ChatTemplate.from_model_dir(tmp_path) is None


# ---------------------------------------------------------------- per-adapter series


def series(traffic: AdapterTraffic) -> dict[str, int]:
    return {label: counts.requests for label, counts in traffic.samples()}


def test_adapter_series_stay_bounded_and_every_series_only_grows():
    traffic = AdapterTraffic(max_series=2)
    for adapter in ["a", "a", "b", "c"]:
        traffic.record("t", adapter, 1, 3, 5)
    traffic.record("t", None, None, 3, 5)
    assert series(traffic) == {"base": 1, "t/a": 2, "t/b": 1, "other": 1}
    history = [series(traffic)]
    for _ in range(3):  # c's 2nd request puts it past b by the promotion factor: b's series goes, c's starts
        traffic.record("t", "c", 1, 3, 5)
        history.append(series(traffic))
    assert history[-1] == {"base": 1, "t/a": 2, "t/c": 3, "other": 1}
    for earlier, later in zip(history, history[1:], strict=False):
        assert all(later[label] >= count for label, count in earlier.items() if label in later), "counters grow"
    last_seen = {label: count for snapshot in history for label, count in snapshot.items()}
    assert sum(last_seen.values()) == 8, "as Prometheus sees it: no request lost or counted twice"
    assert traffic.served("t", "c") == {1: 4}


def test_tenants_with_the_same_adapter_name_are_distinct_series():
    traffic = AdapterTraffic(max_series=4)
    traffic.record("x", "same", 1, 1, 1)
    traffic.record("y", "same", 2, 1, 1)
    assert series(traffic) == {"base": 0, "x/same": 1, "y/same": 1, "other": 0}


# ---------------------------------------------------------------- errors, config, sizes


@pytest.mark.parametrize("exc, status", [
    (AdapterNotFound("x"), 404), (AdapterUnusable("x"), 409), (AdapterError("use_dora", "refused"), 400),
    (RequestError("x"), 400), (SamplingError("x"), 400), (QueueFullError("x"), 429), (EngineStoppedError("x"), 503),
])
def test_engine_and_store_errors_map_to_statuses(exc, status):
    error = api_error_from(exc, retry_after_s=2)
    assert error.status == status
    if status == 429:
        assert error.headers == {"Retry-After": "2"}


def test_error_bodies_take_openais_shape_on_openai_routes():
    error = ApiError(400, "invalid_request_error", "bad", param="n", code="unsupported_parameter")
    assert error_body("/v1/generate", error) == {"error": {"type": "invalid_request_error", "message": "bad"}}
    assert error_body("/v1/completions", error) == {"error": {"message": "bad", "type": "invalid_request_error",
                                                              "param": "n", "code": "unsupported_parameter"}}


def test_config_and_sizes_are_validated():
    with pytest.raises(ValueError, match="max_body_bytes"):
        ApiConfig(max_body_bytes=0)
    with pytest.raises(ValueError, match="default_max_new_tokens"):
        ApiConfig(max_new_tokens_limit=10, default_max_new_tokens=20)
    assert byte_size("512MiB") == 512 << 20 and byte_size("2GB") == 2 * 10**9 and byte_size("64") == 64
    for bad in ("", "0", "-5", "12 parsecs"):
        with pytest.raises(Exception, match="expected a size"):
            byte_size(bad)


def test_the_serve_parser_plugs_into_a_subcommand_parser():
    parser = argparse.ArgumentParser(prog="lora-server")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--port", "9000", "--max-upload-bytes", "2MiB", "--quantize", "nf4"])
    assert (args.command, args.port, args.max_upload_bytes, args.quantize, args.model) == \
        ("serve", 9000, 2 << 20, "nf4", None)


@pytest.mark.parametrize("error_type, status", [("adapter_not_found", 404), ("adapter_unusable", 409),
                                                ("adapter_load_failed", 422), ("server_error", 500), (None, 500)])
def test_an_error_delta_becomes_the_matching_http_error(error_type, status):
    from lora_server.api.generation import error_of
    from lora_server.engine.request import RequestDelta

    delta = RequestDelta("r", [], "", None, finish_reason="error", error="why", error_type=error_type)
    assert error_of(delta).status == status and "why" in error_of(delta).message
    assert error_of(RequestDelta("r", [1], "a", None, finish_reason="stop")) is None
