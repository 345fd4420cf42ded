"""A client that goes away aborts its request: its KV blocks are freed at once, not when it would have finished, and
the server logs no error for it."""

import asyncio
import gc
from types import SimpleNamespace

import httpx
import pytest

from lora_server.api.generation import ClientDisconnected, until_disconnected
from tests.api.conftest import SMALL_MAX_PENDING
from tests.api.helpers import LONG_MAX_NEW_TOKENS, LONG_PROMPT, metrics, value, wait_for

LONG = {"prompt": LONG_PROMPT, "max_new_tokens": LONG_MAX_NEW_TOKENS}


def _engine(client: httpx.Client) -> dict[str, float]:
    samples = metrics(client)
    return {"running": value(samples, "lora_server_requests_running"),
            "kv": value(samples, "lora_server_kv_cache_usage_ratio"),
            "steps": value(samples, "lora_server_engine_steps_total"),
            "aborted": value(samples, "lora_server_finished_requests_total", finish_reason="abort")}


def test_closing_a_stream_mid_way_frees_its_blocks(small):
    before = _engine(small)
    with small.stream("POST", "/v1/generate", json={**LONG, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        during = _engine(small)
        assert during["running"] == 1 and during["kv"] > 0, "the request holds blocks while it runs"
    # Leaving the block closed the connection mid-stream.
    wait_for(lambda: _engine(small)["running"] == 0 and _engine(small)["kv"] == 0)
    after = _engine(small)
    assert after["aborted"] == before["aborted"] + 1
    assert after["steps"] - before["steps"] < LONG_MAX_NEW_TOKENS, "it stopped early: aborted, not finished"


def test_a_non_streaming_client_that_times_out_frees_its_blocks(small):
    before = _engine(small)
    with pytest.raises(httpx.ReadTimeout):
        small.post("/v1/generate", json=LONG, timeout=0.15)
    wait_for(lambda: _engine(small)["running"] == 0 and _engine(small)["kv"] == 0)
    after = _engine(small)
    assert after["aborted"] == before["aborted"] + 1
    assert after["steps"] - before["steps"] < LONG_MAX_NEW_TOKENS


def test_openai_stream_closed_early_frees_its_blocks(small):
    before = _engine(small)
    body = {"model": "demo", "prompt": LONG_PROMPT, "max_tokens": LONG_MAX_NEW_TOKENS, "temperature": 0,
            "stream": True}
    with small.stream("POST", "/v1/completions", json=body) as response:
        assert next(response.iter_lines()).startswith("data: ")
    wait_for(lambda: _engine(small)["running"] == 0 and _engine(small)["kv"] == 0)
    assert _engine(small)["aborted"] == before["aborted"] + 1


def test_a_disconnected_non_streaming_completion_logs_no_unretrieved_exception(small, small_server):
    log_start = small_server.log_path.stat().st_size
    before = _engine(small)
    body = {"model": "demo", "prompt": [LONG_PROMPT] * SMALL_MAX_PENDING, "max_tokens": LONG_MAX_NEW_TOKENS,
            "temperature": 0}  # several prompts: the route gathers one collection per prompt
    with pytest.raises(httpx.ReadTimeout):
        small.post("/v1/completions", json=body, timeout=0.15)
    wait_for(lambda: _engine(small)["running"] == 0 and _engine(small)["kv"] == 0)
    assert _engine(small)["aborted"] > before["aborted"]
    assert small.get("/health").status_code == 200  # one more request: whatever was dropped has been collected
    with open(small_server.log_path, "rb") as log:
        log.seek(log_start)
        written = log.read().decode(errors="replace")
    assert "never retrieved" not in written and "Traceback" not in written, written


def test_until_disconnected_retrieves_what_it_cancels():
    """A cancelled gather ends with an exception (CancelledError) that someone must retrieve, or asyncio logs it."""
    reported: list[dict] = []

    async def disconnected() -> dict:
        return {"type": "http.disconnect"}

    async def forever() -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        with pytest.raises(ClientDisconnected):
            await until_disconnected(SimpleNamespace(receive=disconnected), asyncio.gather(forever(), forever()))
        for _ in range(3):  # the children's cancellation, then the gather's end
            await asyncio.sleep(0)
        gc.collect()

    asyncio.run(main())
    assert not reported, [context["message"] for context in reported]
