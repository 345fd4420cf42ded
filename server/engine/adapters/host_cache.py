"""The host-memory tier: parsed adapters kept in CPU memory, least recently used first out, under a byte budget.

Plain Python. A value only needs `num_bytes` (adapters_store.LoraAdapter has it). A value larger than the whole
budget is never cached: the caller still uses it once, it just is not kept.
"""

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar


class HasNumBytes(Protocol):
    @property
    def num_bytes(self) -> int: ...


K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=HasNumBytes)


class HostCache(Generic[K, V]):
    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"the host cache budget must be non-negative, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[K, V] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def keys(self) -> list[K]:
        """Cached keys, least recently used first."""
        return list(self._entries)

    def get(self, key: K) -> V | None:
        """The cached value (now the most recently used), or None."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> list[K]:
        """Cache `value` as the most recently used, evicting from the least recently used end until it fits.

        Returns the keys evicted to make room. A value over the whole budget is not cached (and evicts nothing)."""
        self.discard(key)
        if value.num_bytes > self.budget_bytes:
            return []
        evicted = []
        while self.num_bytes + value.num_bytes > self.budget_bytes:
            old_key, old_value = self._entries.popitem(last=False)
            self.num_bytes -= old_value.num_bytes
            evicted.append(old_key)
        self._entries[key] = value
        self.num_bytes += value.num_bytes
        return evicted

    def discard(self, key: K) -> None:
        value = self._entries.pop(key, None)
        if value is not None:
            self.num_bytes -= value.num_bytes
