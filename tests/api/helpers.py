"""Requests and readings shared by the API tests."""

import json
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lora_server.demo import tasks
from lora_server.demo.paths import demo_adapter_dirs

HELLO = "hello world"
LONG_PROMPT = "a"  # the demo base continues it with "aaaa..." to the length limit: a request that runs long
LONG_MAX_NEW_TOKENS = 126  # the demo's maximum length is 128; "a" is 2 tokens with BOS


def expected(adapter: str | None, text: str = HELLO) -> str:
    return tasks.TRANSFORMS[adapter or "copy"](text)


def generate(client: httpx.Client, text: str = HELLO, adapter: str | None = None, **fields) -> httpx.Response:
    body = {"prompt": tasks.make_prompt(text), "adapter_id": adapter, "max_new_tokens": 40, **fields}
    return client.post("/v1/generate", json=body)


def adapter_files(demo_adapter: str) -> dict[str, tuple[str, bytes, str]]:
    path: Path = demo_adapter_dirs()[demo_adapter]
    return {"adapter_config": ("adapter_config.json", (path / "adapter_config.json").read_bytes(), "application/json"),
            "adapter_model": ("adapter_model.safetensors", (path / "adapter_model.safetensors").read_bytes(),
                              "application/octet-stream")}


def upload(client: httpx.Client, adapter_id: str, demo_adapter: str) -> httpx.Response:
    return client.post("/v1/adapters", data={"adapter_id": adapter_id}, files=adapter_files(demo_adapter))


def put_version(client: httpx.Client, adapter_id: str, demo_adapter: str) -> httpx.Response:
    return client.put(f"/v1/adapters/{adapter_id}", files=adapter_files(demo_adapter))


def sse_data(lines: list[str]) -> list[dict | str]:
    """The `data:` payloads of an SSE body, JSON-decoded except OpenAI's final [DONE]."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metrics(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


def num_unfinished(client: httpx.Client) -> float:
    """Requests the engine holds (running or waiting), as of its last step."""
    samples = metrics(client)
    return value(samples, "lora_server_requests_running") + value(samples, "lora_server_requests_waiting")


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
