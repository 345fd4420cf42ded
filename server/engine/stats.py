"""A snapshot of the engine for metrics and health: plain numbers, taken between steps."""

from dataclasses import dataclass

from server.engine.merge_control import MergeStats
from server.engine.residency import ResidencyCounters


@dataclass(frozen=True)
class EngineStats:
    num_running: int  # admitted: running, loading their adapter, or between prefill chunks
    num_waiting: int  # queued, or preempted and waiting to recompute
    num_kv_blocks: int
    num_kv_blocks_used: int
    num_preemptions: int  # since start
    num_steps: int
    num_prompt_tokens_total: int
    num_generated_tokens_total: int
    num_step_failures: int  # steps that raised on their retry too (their requests ended with an error)
    num_step_retries: int  # steps that raised once and were run again
    residency: ResidencyCounters | None = None  # None when the engine serves no adapters
    merge: MergeStats | None = None

    @property
    def kv_cache_usage(self) -> float:
        return self.num_kv_blocks_used / self.num_kv_blocks
