"""One streaming request over http.client, timed from the client's side: time to first token, gaps between tokens,
end to end."""

import http.client
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Result:
    adapter: str | None
    status: int = 0  # HTTP status; 0 when the connection failed
    error: str = ""
    ttft_s: float | None = None
    token_gaps_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    num_tokens: int = 0
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


class Endpoint:
    def __init__(self, url: str, api_key: str | None, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"expected an http(s) URL, got {url!r}")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.base_path = parts.path.rstrip("/")
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s

    def connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout_s)

    def get_json(self, path: str) -> dict:
        connection = self.connect()
        try:
            connection.request("GET", self.base_path + path, headers=self.headers)
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {response.status}: {body[:200]!r}")
            return json.loads(body)
        finally:
            connection.close()


def stream_generate(endpoint: Endpoint, prompt: str, adapter: str | None, max_new_tokens: int) -> Result:
    """POST /v1/generate with "stream": true; each event's token_ids count as tokens."""
    body = {"prompt": prompt, "adapter_id": adapter, "max_new_tokens": max_new_tokens, "stream": True}
    return _stream(endpoint, "/v1/generate", body, adapter, lambda event: len(event.get("token_ids", [])))


def stream_completion(endpoint: Endpoint, prompt: str, model: str, adapter: str | None,
                      max_new_tokens: int) -> Result:
    """POST /v1/completions (OpenAI) with stream: true; each chunk with text counts as one token."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0, "stream": True}
    return _stream(endpoint, "/v1/completions", body, adapter,
                   lambda event: int(any(choice.get("text") for choice in event.get("choices", []))))


def _stream(endpoint: Endpoint, path: str, body: dict, adapter: str | None, tokens_in) -> Result:
    result = Result(adapter)
    started = time.perf_counter()
    connection = endpoint.connect()
    try:
        connection.request("POST", endpoint.base_path + path, body=json.dumps(body), headers=endpoint.headers)
        response = connection.getresponse()
        result.status = response.status
        if response.status != 200:
            result.error = response.read()[:300].decode(errors="replace")
            return result
        last = None
        for raw in response:  # SSE: one `data: {...}` line per event
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data:"):])
            if "error" in event and "choices" not in event and "id" not in event:
                result.error = str(event["error"])
                continue
            num = tokens_in(event)
            now = time.perf_counter()
            if num:
                if last is None:
                    result.ttft_s = now - started
                else:
                    result.token_gaps_s.append((now - last) / num)
                last = now
                result.num_tokens += num
            result.finish_reason = event.get("finish_reason") or next(
                (c.get("finish_reason") for c in event.get("choices", []) if c.get("finish_reason")),
                result.finish_reason)
    except (OSError, http.client.HTTPException, ValueError) as error:
        result.error = f"{type(error).__name__}: {error}"
    finally:
        connection.close()
        result.e2e_s = time.perf_counter() - started
    return result
