"""One generation request between the HTTP edge and the engine, shared by /v1/generate and the OpenAI routes.

    request = build_request(served, config, principal, prompt_token_ids, ...)   # ApiError for what no step could run
    tracked = TrackedStream(state, request)                                      # submits; engine errors raise here
    head = await until_disconnected(http_request, tracked.until_first_token())   # abort if the client goes away
    ... stream or collect the rest, then `await tracked.aclose()` in a finally

TrackedStream times the deltas (queue time, time to first token, gaps between tokens) for the response headers and
the metrics, and records the request's end exactly once, whether it finished or was aborted.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request
from starlette.types import Receive

from lora_server.api.auth import Principal
from lora_server.api.config import ApiConfig
from lora_server.api.errors import CONFLICT, INVALID_REQUEST, NOT_FOUND, SERVER, ApiError, invalid_request
from lora_server.api.metrics import ApiMetrics
from lora_server.api.state import Served
from lora_server.engine.async_engine import RequestStream
from lora_server.engine.request import MAX_LOGPROBS, EngineRequest, RequestDelta, TokenLogprob
from lora_server.engine.sampler import SamplingError, SamplingParams

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed its connection before the response was complete; the request was aborted."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def build_request(served: Served, config: ApiConfig, principal: Principal, *, prompt_token_ids: list[int],
                  adapter_id: str | None, max_new_tokens: int | None, temperature: float, top_p: float, top_k: int,
                  seed: int | None, stop: tuple[str, ...], logprobs: int | None, request_id: str,
                  max_tokens_param: str = "max_new_tokens", extras: dict[str, object] | None = None,
                  logprobs_param: str = "logprobs") -> EngineRequest:
    """The engine request, after the limits that are the API's to enforce. `max_new_tokens` None: as many as the
    model's maximum length leaves room for, up to the server's cap. The prompt itself is the engine's to check
    (server.engine.request.check_request, at submit): a RequestError naming `prompt` is a 400 like those below.
    `extras`: vLLM's sampling extras the client sent (SamplingExtras.sampling_extras), by SamplingParams' names."""
    num_prompt, max_len = len(prompt_token_ids), served.max_model_len
    if max_new_tokens is None:
        # At least 1: a prompt with no room left is refused at submit, with the reason (context_length_exceeded).
        max_new_tokens = max(min(config.max_new_tokens_limit, max_len - num_prompt), 1)
    if max_new_tokens > config.max_new_tokens_limit:
        raise invalid_request(f"{max_tokens_param} is {max_new_tokens}, over this server's limit of "
                              f"{config.max_new_tokens_limit}", param=max_tokens_param, code="max_tokens_exceeded")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:  # the engine checks it too, but cannot name the
        # field as this route spells it (chat's is top_logprobs)
        raise invalid_request(f"{logprobs_param} must be between 0 and {MAX_LOGPROBS}, got {logprobs}",
                              param=logprobs_param)
    try:
        sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                  seed=seed, **(extras or {}))
    except SamplingError as error:  # a 400 naming the field as this route spells it (OpenAI's is max_tokens)
        param = max_tokens_param if error.field == "max_new_tokens" else error.field
        raise invalid_request(str(error), param=param) from None
    return EngineRequest(prompt_token_ids=prompt_token_ids, sampling=sampling, adapter_id=adapter_id,
                         tenant=principal.tenant, stop=stop, logprobs=logprobs, request_id=request_id)


@dataclass
class Collected:
    """Everything a request produced."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    last: RequestDelta | None = None

    def add(self, delta: RequestDelta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        self.last = delta


class TrackedStream:
    """A submitted request's deltas, timed. Construct it on the event loop (submit needs the running loop)."""

    def __init__(self, served: Served, metrics: ApiMetrics, request: EngineRequest) -> None:
        self.request = request
        self._metrics = metrics
        self._started = time.monotonic()
        self._engine = served.engine
        self._stream: RequestStream = served.engine.submit(request)  # raises the engine's typed errors
        self.queue_time_s: float | None = None
        self.time_to_first_token_s: float | None = None
        self._last_token_at: float | None = None
        self.num_generated_tokens = 0
        self.adapter_version: int | str | None = None
        self.finish_reason: str | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    def __aiter__(self) -> "TrackedStream":
        return self

    async def __anext__(self) -> RequestDelta:
        if self.finish_reason is not None:
            raise StopAsyncIteration
        delta = await self._stream.__anext__()
        self._observe(delta)
        return delta

    async def until_first_token(self) -> list[RequestDelta]:
        """The deltas up to and including the first with tokens (or the last, if none has any)."""
        deltas = []
        async for delta in self:
            deltas.append(delta)
            if delta.token_ids or delta.is_finished:
                break
        return deltas

    async def collect(self, head: list[RequestDelta] | None = None) -> Collected:
        collected = Collected()
        for delta in head or []:
            collected.add(delta)
        async for delta in self:
            collected.add(delta)
        return collected

    async def aclose(self) -> None:
        """Abort the request if it has not finished (the client went away), and record it as aborted."""
        self.abort_now()

    def abort_now(self) -> None:
        """aclose without an await: safe in a cancelled task's finally."""
        if self.finish_reason is None:
            self._engine.abort(self.request_id)
            self._finish("abort")

    def timing_headers(self) -> dict[str, str]:
        headers = {"X-Request-Id": self.request_id}
        if self.queue_time_s is not None:
            headers["X-Queue-Time-Seconds"] = f"{self.queue_time_s:.6f}"
        if self.time_to_first_token_s is not None:
            headers["X-Time-To-First-Token-Seconds"] = f"{self.time_to_first_token_s:.6f}"
        return headers

    def _observe(self, delta: RequestDelta) -> None:
        now = time.monotonic()
        if delta.queue_time_s is not None and self.queue_time_s is None:
            self.queue_time_s = delta.queue_time_s
            self._metrics.queue_time.observe(delta.queue_time_s)
        if delta.token_ids:
            if self._last_token_at is None:
                self.time_to_first_token_s = now - self._started
                self._metrics.time_to_first_token.observe(self.time_to_first_token_s)
                gaps = len(delta.token_ids) - 1  # tokens after the first in one delta arrived together
                gap = 0.0
            else:
                gaps = len(delta.token_ids)
                gap = (now - self._last_token_at) / gaps
            for _ in range(gaps):
                self._metrics.inter_token_latency.observe(gap)
            self._last_token_at = now
        self.num_generated_tokens = max(self.num_generated_tokens, delta.num_generated_tokens)
        if delta.adapter_version is not None:
            self.adapter_version = delta.adapter_version
        if delta.is_finished:
            self._finish(delta.finish_reason)

    def _finish(self, finish_reason: str) -> None:
        self.finish_reason = finish_reason
        self._metrics.record_finished(self.request.tenant, self.request.adapter_id, self.adapter_version,
                                      finish_reason, self.num_prompt_tokens, self.num_generated_tokens,
                                      time.monotonic() - self._started, self.time_to_first_token_s)


# The engine's error kinds as HTTP: the adapter went away or is damaged since the request was pinned to it (as if
# asked for then), it cannot be loaded (it does not fit this device or model), or the server failed.
ERROR_STATUS = {  # error_type -> (status, error type, code)
    "adapter_not_found": (404, NOT_FOUND, "not_found"),
    "adapter_unusable": (409, CONFLICT, "adapter_unusable"),
    "adapter_load_failed": (422, INVALID_REQUEST, "adapter_load_failed"),
    "server_error": (500, SERVER, None),
}


def error_of(delta: RequestDelta) -> ApiError | None:
    """A request that ended with "error" before producing anything is an HTTP error, not a 200 with no text."""
    if delta.finish_reason != "error":
        return None
    status, kind, code = ERROR_STATUS[delta.error_type or "server_error"]
    return ApiError(status, kind, f"the request failed: {delta.error or 'unknown error'}", code=code)


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, unless the client disconnects first: then cancel it and raise ClientDisconnected.
    Only for after the body was read (the only messages left to receive are disconnects)."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watcher):
            if not task.done():
                task.cancel()
                # A cancelled gather ends later with a CancelledError *exception*: retrieve it, or asyncio logs it.
                task.add_done_callback(_retrieve_outcome)
    if work.done() and not work.cancelled():
        return work.result()
    raise ClientDisconnected


def _retrieve_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def submit_all(served: Served, metrics: ApiMetrics, requests: list[EngineRequest]) -> list[TrackedStream]:
    """Submit every request or none: if one is refused, those already submitted are aborted before it raises."""
    tracked: list[TrackedStream] = []
    try:
        for request in requests:
            tracked.append(TrackedStream(served, metrics, request))
    except BaseException:
        for stream in tracked:
            stream.abort_now()
        raise
    return tracked


async def merged(streams: list[TrackedStream], heads: list[list[RequestDelta]]) -> AsyncIterator[
        tuple[int, RequestDelta]]:
    """(index, delta) from several streams as they come, each stream's `head` first."""
    for index, head in enumerate(heads):
        for delta in head:
            yield index, delta
    if len(streams) == 1:  # the common case needs no tasks
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, RequestDelta | None]] = asyncio.Queue()

    async def pump(index: int, stream: TrackedStream) -> None:
        async for delta in stream:
            queue.put_nowait((index, delta))
        queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, delta = await queue.get()
            if delta is None:
                remaining -= 1
            else:
                yield index, delta
    finally:
        for task in tasks:
            task.cancel()
