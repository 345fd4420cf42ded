"""When to run merged: watch each step's tokens by adapter, merge the one that dominates, unmerge when it stops.

Plain Python, in the spirit of dLoRA's dynamic merge: over a sliding window of recent steps, if one adapter's share of
the batched tokens is at least `merge_share`, merge it; while merged, if its share falls below `unmerge_share`, go
back to unmerged (or straight to another adapter that now dominates). The gap between the two thresholds, the full
window required before any decision, and `min_steps_between_switches` keep it from thrashing.

    policy.observe({key: num_tokens, None: base_tokens})   # after every step
    decision = policy.decide(merged_key)                     # None: stay; else ("merge", key) or ("unmerge", None)
"""

from collections import Counter, deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class MergePolicyConfig:
    window_steps: int = 64
    merge_share: float = 0.9  # merge an adapter with at least this share of the window's tokens
    unmerge_share: float = 0.6  # unmerge when the merged adapter's share falls below this
    min_steps_between_switches: int = 128

    def __post_init__(self) -> None:
        if not 0.0 < self.unmerge_share < self.merge_share <= 1.0:
            raise ValueError(f"need 0 < unmerge_share ({self.unmerge_share}) < merge_share ({self.merge_share}) <= 1")
        if self.window_steps < 1 or self.min_steps_between_switches < 0:
            raise ValueError("window_steps must be positive and min_steps_between_switches not negative")


class AutoMergePolicy:
    def __init__(self, config: MergePolicyConfig) -> None:
        self.config = config
        self._window: deque[Mapping[Hashable | None, int]] = deque(maxlen=config.window_steps)
        self._totals: Counter = Counter()  # tokens per adapter (None: base) over the window
        self._steps_since_switch = config.min_steps_between_switches  # free to switch at start

    def observe(self, tokens_by_adapter: Mapping[Hashable | None, int]) -> None:
        if len(self._window) == self._window.maxlen:
            self._totals.subtract(self._window[0])
        self._window.append(dict(tokens_by_adapter))
        self._totals.update(tokens_by_adapter)
        self._steps_since_switch += 1

    def share(self, key: Hashable | None) -> float:
        total = sum(self._totals.values())
        return self._totals[key] / total if total else 0.0

    def decide(self, merged: Hashable | None) -> tuple[str, Hashable | None] | None:
        config = self.config
        if len(self._window) < config.window_steps or self._steps_since_switch < config.min_steps_between_switches:
            return None
        leader, leader_tokens = max(((k, n) for k, n in self._totals.items() if k is not None),
                                    key=lambda item: item[1], default=(None, 0))
        total = sum(self._totals.values())
        leader_share = leader_tokens / total if total else 0.0
        if merged is None:
            return ("merge", leader) if leader is not None and leader_share >= config.merge_share else None
        if self.share(merged) >= config.unmerge_share:
            return None
        if leader is not None and leader != merged and leader_share >= config.merge_share:
            return "merge", leader
        return "unmerge", None

    def switched(self) -> None:
        """The engine carried out a decision: the dwell time starts again."""
        self._steps_since_switch = 0
