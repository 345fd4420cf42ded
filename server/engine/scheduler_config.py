"""The scheduler's limits, validated once at construction."""

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int  # KV cache blocks on the device
    max_model_len: int  # the most tokens (prompt + generated) one sequence may reach
    block_size: int = 16
    max_num_batched_tokens: int = 2048  # tokens fed through the model in one step, all sequences together
    max_num_seqs: int = 64  # sequences admitted at once (running, loading their adapter, or between chunks)
    max_overtakes: int = 8  # younger requests admitted ahead of one waiting for its adapter before admission stops
    prefill_chunk_size: int | None = None  # the most prompt tokens one sequence feeds per step; None: the step budget

    def __post_init__(self) -> None:
        if min(self.num_blocks, self.block_size, self.max_model_len, self.max_num_seqs) < 1:
            raise ValueError(f"num_blocks ({self.num_blocks}), block_size ({self.block_size}), max_model_len "
                             f"({self.max_model_len}) and max_num_seqs ({self.max_num_seqs}) must be positive")
        if self.max_model_len > self.num_blocks * self.block_size:
            # Why: a lone sequence must always fit, or preemption could not guarantee progress.
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the KV cache's "
                             f"{self.num_blocks} x {self.block_size} = {self.num_blocks * self.block_size} tokens")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Why: every admitted sequence must be able to decode in the same step.
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({self.max_num_seqs})")
        if self.max_overtakes < 0:
            raise ValueError(f"max_overtakes must be 0 (strict FCFS) or more, got {self.max_overtakes}")
        if self.prefill_chunk_size is not None and self.prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be positive or None, got {self.prefill_chunk_size}")

    @property
    def chunk_limit(self) -> int:
        """The most tokens one sequence feeds in one step."""
        return min(self.prefill_chunk_size or self.max_num_batched_tokens, self.max_num_batched_tokens)
