"""What callers hand the engine (`EngineRequest`), what it makes of it on the way in (`check_request`, then
`PreparedRequest`), and what they get back as it runs (`RequestDelta`).

The engine's narrow interface: the API and the CLI speak only these types (plus the errors below), never Sequence
or the scheduler.
"""

import itertools
from dataclasses import dataclass, field
from typing import Literal

from lora_server.adapters_store import AdapterNotFound, AdapterUnusable
from lora_server.engine.adapters.keys import AdapterLoadError, PinnedAdapter
from lora_server.engine.sampler import SamplingParams
from lora_server.engine.scheduling.sequence import FinishReason

MAX_LOGPROBS = 20  # alternatives reported per token; OpenAI's own cap
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256

_request_numbers = itertools.count()


def new_request_id() -> str:
    return f"req-{next(_request_numbers)}"


class RequestError(ValueError):
    """A request the engine cannot take as asked (empty or over-long prompt, bad token ids, a bad stop list).
    `field` names the request field at fault and `code` says what is wrong, where the API reports them."""

    def __init__(self, message: str, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.code = code


class QueueFullError(RuntimeError):
    """The engine already holds its maximum of unfinished requests; retry later."""


class EngineStoppedError(RuntimeError):
    """The engine is draining or stopped and takes no new requests."""


# What failed, so callers can answer in kind (the API: 404, 409, 422, 500) without parsing messages.
ErrorType = Literal["adapter_not_found", "adapter_unusable", "adapter_load_failed", "server_error"]


def error_type_of(error: BaseException | None) -> ErrorType:
    """Classify an exception that ended a request: an adapter deleted or damaged since the request was pinned to it,
    an adapter that could not be loaded (it does not fit the device or the model), or anything else."""
    cause = error.__cause__ if isinstance(error, AdapterLoadError) else error
    if isinstance(cause, AdapterNotFound):
        return "adapter_not_found"
    if isinstance(cause, AdapterUnusable):
        return "adapter_unusable"
    if isinstance(error, AdapterLoadError):
        return "adapter_load_failed"
    return "server_error"


@dataclass(frozen=True)
class EngineRequest:
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter_id: str | None = None  # None: the base model
    tenant: str = "default"
    adapter_version: int | None = None  # None: pinned to the newest stored version when submitted
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings; it is not part of the text
    logprobs: int | None = None  # None: none; n >= 0: the chosen token's logprob and the n most likely alternatives
    deadline: float | None = None  # time.monotonic() seconds; past it the request ends with "timeout"
    request_id: str = field(default_factory=new_request_id)


def check_request(request: EngineRequest, max_model_len: int, vocab_size: int) -> None:
    """Raise RequestError for what no step could run. The one check of a request: Engine.prepare calls it where
    requests enter the engine, before anything is queued."""
    prompt = request.prompt_token_ids
    if not prompt:
        raise RequestError("the prompt is empty")
    if len(prompt) >= max_model_len:
        raise RequestError(f"the prompt has {len(prompt)} tokens, but this model takes at most {max_model_len} tokens "
                           f"in all (prompt and output), so a prompt may have at most {max_model_len - 1}",
                           field="prompt", code="context_length_exceeded")
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt):
        raise RequestError(f"prompt token ids must be integers in [0, {vocab_size})")
    stop_token_ids = request.sampling.stop_token_ids
    if any(t >= vocab_size for t in stop_token_ids):
        raise RequestError(f"stop_token_ids must be token ids in [0, {vocab_size}), got {list(stop_token_ids)}",
                           field="stop_token_ids")
    if len(request.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in request.stop):
        raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_STRING_CHARS} "
                           f"characters each")
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
        raise RequestError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {request.logprobs}")


@dataclass(frozen=True)
class PreparedRequest:
    """A request the engine has checked and pinned (Engine.prepare): it goes into the queue as it is, with no store
    read and no second check on the step loop's thread."""

    request: EngineRequest
    adapter: PinnedAdapter | None  # the adapter version it runs with; None: the base model

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the most likely tokens, best first


@dataclass(frozen=True)
class RequestDelta:
    """What one request produced since its previous delta. The last delta has `finish_reason` set."""

    request_id: str
    token_ids: list[int]  # new tokens (a stop string's tokens included; the EOS that ended it included)
    text: str  # new text, up to (not including) a stop string; held back while it could be the start of one
    logprobs: list[TokenLogprob] | None  # one per new token when asked for
    finish_reason: FinishReason | None = None
    error: str | None = None  # why, when finish_reason is "error"
    error_type: ErrorType | None = None  # what kind of error, when finish_reason is "error" (see error_type_of)
    adapter_version: int | str | None = None  # the adapter version serving the request
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0  # so far, this delta included
    queue_time_s: float | None = None  # arrival -> first scheduled step; set on the first delta that has tokens

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None
