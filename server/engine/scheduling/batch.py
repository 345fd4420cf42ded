"""What the scheduler hands the model runner each step: chunks of sequences to feed, each with its adapter's slot.

Plain Python, like the scheduler: the model runner is the one module that turns these into tensors.
"""

from dataclasses import dataclass

from lora_server.engine.scheduling.sequence import Sequence


@dataclass(frozen=True)
class ScheduledChunk:
    """Feed `token_ids` at positions start_position.. of `seq`; its K/V cache entries are allocated. When
    `is_sampled`, the chunk ends at the sequence's last token and the logits of its last position give the next token.
    `lora_slot` is where the sequence's adapter sits on the device (None: the base model), read from its hold."""

    seq: Sequence
    start_position: int
    token_ids: list[int]
    is_sampled: bool
    lora_slot: int | None

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
