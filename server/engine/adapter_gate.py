"""The scheduler's view of adapters: which version a new request pins (the store's newest), and whether it can run
now (residency). Implements scheduled_batch.AdapterResidency over a Residency and a StoreAdapterSource."""

from concurrent.futures import Future
from functools import lru_cache

from server.engine.adapter_key import AdapterKey
from server.engine.residency import Residency
from server.engine.store_source import StoreAdapterSource


class AdapterGate:
    def __init__(self, residency: Residency, source: StoreAdapterSource) -> None:
        self.residency = residency
        self.source = source
        # Why cache: a version is immutable, so its rank never changes; admission asks on every step it waits.
        self._max_rank = lru_cache(maxsize=4096)(source.max_rank)

    def latest_version(self, tenant: str, adapter_id: str) -> int | str:
        """Raises adapters_store.AdapterNotFound (unknown, or another tenant's) or AdapterUnusable."""
        return self.source.latest_key(tenant, adapter_id).version

    def can_make_resident(self, key: AdapterKey) -> bool:
        if self.residency.is_ready(key):
            return True
        try:
            rank = self._max_rank(key)
        except Exception:  # deleted since it was pinned: let acquire run the load, which fails with the reason
            return True
        return self.residency.can_place(rank)

    def prefetch(self, key: AdapterKey) -> Future:
        return self.residency.prefetch(key)

    def acquire(self, key: AdapterKey) -> Future[int]:
        return self.residency.acquire(key)

    def release(self, key: AdapterKey) -> None:
        self.residency.release(key)
