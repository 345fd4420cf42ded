"""What the scheduler hands the model runner each step, and what it asks of adapter residency.

Plain Python, like the scheduler: the model runner is the one module that turns these into tensors.
"""

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from server.engine.adapter_key import AdapterKey
from server.engine.sequence import Sequence


class AdapterResidency(Protocol):
    """What the scheduler asks of adapter residency. Must not block: the step loop calls it."""

    def latest_version(self, tenant: str, adapter_id: str) -> int | str: ...  # the version a new request pins

    def can_make_resident(self, key: AdapterKey) -> bool: ...  # on the device now, or room for it without waiting

    def prefetch(self, key: AdapterKey) -> object: ...  # advisory, no hold

    def acquire(self, key: AdapterKey) -> Future[int]: ...  # hold; the future gives its slot or the load's error

    def release(self, key: AdapterKey) -> None: ...  # once per acquire, whatever the outcome


@dataclass(frozen=True)
class ScheduledChunk:
    """Feed `token_ids` at positions start_position.. of `seq`; its K/V slots are allocated. When `is_sampled`, the
    chunk ends at the sequence's last token and the logits of its last position give the next token."""

    seq: Sequence
    start_position: int
    token_ids: list[int]
    is_sampled: bool

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class ScheduledBatch:
    chunks: tuple[ScheduledChunk, ...]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_seqs(self) -> int:
        return len(self.chunks)
