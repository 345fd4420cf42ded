"""One request over its life in the engine: its tokens, its pinned adapter, its sampling state, its stop conditions,
and the scheduler's state.

Plain Python. The sampling parameters and the request's random stream are carried opaquely (`sampling`,
`generator`): the scheduler needs only `max_new_tokens`, and the sampler's types import torch.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from lora_server.engine.adapters.keys import AdapterKey, PinnedAdapter

FinishReason = Literal["stop", "length", "timeout", "abort", "error"]


class SequenceStatus(Enum):
    WAITING = "waiting"  # queued: new, or preempted and waiting to be recomputed
    RUNNING = "running"  # admitted: holds its adapter; scheduled whenever the adapter is ready and blocks allow
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: sequences are mutable and live in sets and dicts
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    tenant: str = "default"
    adapter: PinnedAdapter | None = None  # the version pinned when the request was submitted; None: the base model
    sampling: object = None  # the sampler's parameters, opaque here
    # Why the stream lives here, made once and kept across preemption: a seeded request draws the same tokens whatever
    # shares its batch, and a recompute after preemption continues the stream rather than restarting it.
    generator: object = None  # the request's own random stream (a torch.Generator; None when greedy)
    num_logprobs: int | None = None  # alternatives reported with each token's logprob; None: no logprobs
    deadline: float | None = None  # monotonic seconds; past it the request finishes with "timeout"

    # The scheduler's state.
    status: SequenceStatus = SequenceStatus.WAITING
    arrival: int = -1  # order of Scheduler.add calls: smaller is older
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # leading tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)  # block ids, position p lives in block_table[p // size]
    num_times_overtaken: int = 0  # requests admitted after it in admission order while it waited for its adapter
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None  # why, when finish_reason is "error"
    error_cause: BaseException | None = None  # the exception behind `error`, when there is one

    def __post_init__(self) -> None:
        # The engine checked the request (server.engine.request.check_request) before making its sequence.
        assert self.prompt_token_ids, f"sequence {self.seq_id}: the prompt is empty"
        assert self.max_new_tokens >= 1, f"sequence {self.seq_id}: max_new_tokens {self.max_new_tokens}"
        assert self.adapter is None or self.adapter.key.tenant == self.tenant, \
            f"sequence {self.seq_id} of tenant {self.tenant!r} pinned {self.adapter.key}"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to feed: the rest of the prompt (everything, after preemption), or the last sample."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, stop: int) -> list[int]:
        """all_token_ids[start:stop] without building the whole list."""
        num_prompt = len(self.prompt_token_ids)
        if stop <= num_prompt:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:] + self.output_token_ids[max(start - num_prompt, 0):stop - num_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def adapter_key(self) -> AdapterKey | None:
        """The pinned adapter version this request runs with, or None for the base model."""
        return None if self.adapter is None else self.adapter.key

    @property
    def adapter_id(self) -> str | None:
        return None if self.adapter is None else self.adapter.key.adapter_id

    @property
    def adapter_version(self) -> int | str | None:
        return None if self.adapter is None else self.adapter.key.version
