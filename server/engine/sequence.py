"""One request over its life in the engine: its tokens, its adapter, its stop conditions, and the scheduler's state.

Plain Python. The sampling parameters are carried opaquely (`sampling`): the scheduler needs only `max_new_tokens`,
and the sampler's types import torch.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from server.engine.adapter_key import AdapterKey

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
    adapter_id: str | None = None  # None for the base model
    tenant: str = "default"
    adapter_version: int | str | None = None  # pinned by Scheduler.add unless the caller pinned it already
    sampling: object = None  # the sampler's parameters, opaque here
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
        if not self.prompt_token_ids:
            raise ValueError(f"sequence {self.seq_id}: the prompt is empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"sequence {self.seq_id}: max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.adapter_id is None and self.adapter_version is not None:
            raise ValueError(f"sequence {self.seq_id}: an adapter version without an adapter")

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
        if self.adapter_id is None:
            return None
        assert self.adapter_version is not None, f"sequence {self.seq_id}: adapter version not pinned yet"
        return AdapterKey(self.tenant, self.adapter_id, self.adapter_version)
