"""HTTP to lora-server over the standard library: one streaming request timed from the client's side (first token,
gaps between chunks, end to end), token counts from the server's own `usage`, and the few JSON and multipart calls the
load generator makes. Imports nothing from server/: this is a black-box client."""

import http.client
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from lora_server.loadtest.errors import LoadtestError
from lora_server.loadtest.workload import Job


@dataclass
class Result:
    adapter: str | None
    adapter_rank: int
    arrival_s: float  # when the workload meant to send it, from the run's start
    sent_s: float = 0.0  # when it was sent, from the run's start
    status: int = 0  # HTTP status; 0 when the connection failed
    error: str = ""
    ttft_s: float | None = None
    chunk_gaps_s: list[float] = field(default_factory=list)  # each gap divided by the tokens its chunk carried
    e2e_s: float = 0.0
    prompt_tokens: int = 0  # from the server's usage
    completion_tokens: int = 0  # from the server's usage
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (vLLM's TPOT); None with fewer than two tokens."""
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)

    def to_json(self) -> dict:
        return asdict(self) | {"ok": self.ok, "tpot_s": self.tpot_s}


class Endpoint:
    def __init__(self, url: str, api_key: str | None, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LoadtestError(f"--url: expected an http(s) URL such as http://127.0.0.1:8000, got {url!r}")
        self.url = url
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.base_path = parts.path.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s

    def connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout_s)

    def call(self, method: str, path: str, body: bytes | None = None,
             content_type: str = "application/json") -> tuple[int, dict]:
        """One request; (status, JSON body or {}). An unreachable server is a LoadtestError; other statuses are the
        caller's to judge (see `check`)."""
        connection = self.connect()
        headers = self.headers | ({"Content-Type": content_type} if body is not None else {})
        try:
            connection.request(method, self.base_path + path, body=body, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except OSError as error:
            raise LoadtestError(f"cannot reach the server at {self.url}: {error.strerror or error}") from None
        finally:
            connection.close()
        try:
            return response.status, json.loads(raw) if raw else {}
        except ValueError:
            return response.status, {"error": {"message": raw[:200].decode(errors="replace")}}

    def get_json(self, path: str) -> dict:
        status, body = self.call("GET", path)
        check(status, body, f"GET {path}")
        return body

    def post_json(self, method: str, path: str, payload: dict | None = None) -> tuple[int, dict]:
        return self.call(method, path, None if payload is None else json.dumps(payload).encode())

    def post_multipart(self, path: str, fields: dict[str, str], files: dict[str, bytes]) -> tuple[int, dict]:
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for name, data in files.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.call("POST", path, body, f"multipart/form-data; boundary={boundary}")


def check(status: int, body: dict, what: str) -> None:
    """A LoadtestError that says what to do for a refused key; the server's own message otherwise."""
    if status in (200, 201):
        return
    message = error_message(body)
    if status == 401:
        raise LoadtestError(f"{what}: HTTP 401, the server wants an API key: pass one with --api-key ({message})")
    if status == 403:
        raise LoadtestError(f"{what}: HTTP 403, this API key may not do that: {message}")
    raise LoadtestError(f"{what}: HTTP {status}: {message}")


def error_message(body: object) -> str:
    """The server's `{"error": {"message": ...}}`, or whatever else came back, cut short."""
    if not isinstance(body, dict):
        return str(body)[:300]
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message", error))[:300]
    return str(error or body.get("detail") or body)[:300]


def stream_request(endpoint: Endpoint, route: str, base_model: str, job: Job, started_at: float) -> Result:
    """POST the job to /v1/generate or /v1/completions with streaming on; `started_at` is the run's perf_counter
    origin."""
    if route == "generate":
        path = "/v1/generate"
        body: dict = {"prompt": job.prompt, "adapter_id": job.adapter, "max_new_tokens": job.max_new_tokens,
                      "stream": True}
    else:
        path = "/v1/completions"
        body = {"model": job.adapter or base_model, "prompt": job.prompt, "max_tokens": job.max_new_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    result = Result(job.adapter, job.adapter_rank, job.arrival_s)
    sent = time.perf_counter()
    result.sent_s = sent - started_at
    connection = endpoint.connect()
    try:
        connection.request("POST", endpoint.base_path + path, body=json.dumps(body),
                           headers=endpoint.headers | {"Content-Type": "application/json",
                                                       "Accept": "text/event-stream"})
        response = connection.getresponse()
        result.status = response.status
        if response.status != 200:
            raw = response.read()
            try:
                result.error = error_message(json.loads(raw))
            except ValueError:
                result.error = raw[:300].decode(errors="replace")
            return result
        _read_events(response, result, sent)
    except (OSError, http.client.HTTPException, ValueError) as error:
        result.error = f"{type(error).__name__}: {error}"
    finally:
        connection.close()
        result.e2e_s = time.perf_counter() - sent
    return result


def _read_events(response: http.client.HTTPResponse, result: Result, sent: float) -> None:
    last = None
    for raw in response:  # SSE: one `data: {...}` line per event
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data:"):])
        if isinstance(event.get("error"), dict):
            result.error = str(event["error"].get("message", event["error"]))
        usage = event.get("usage")
        if usage:
            result.prompt_tokens = int(usage.get("prompt_tokens", 0))
            result.completion_tokens = int(usage.get("completion_tokens", 0))
        choices = event.get("choices") or []
        # Timing only: which events carry tokens. The counts themselves come from `usage` (both routes agree there).
        num = len(event["token_ids"]) if "token_ids" in event else int(any(c.get("text") for c in choices))
        finish = event.get("finish_reason") or next((c["finish_reason"] for c in choices if c.get("finish_reason")),
                                                    None)
        result.finish_reason = finish or result.finish_reason
        if num:
            now = time.perf_counter()
            if last is None:
                result.ttft_s = now - sent
            else:
                result.chunk_gaps_s.append((now - last) / num)
            last = now
