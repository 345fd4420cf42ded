"""Residency's adapter source backed by the durable store: a key names one stored version."""

from adapters_store import AdapterStore, LoraAdapter
from server.engine.adapter_key import AdapterKey


class StoreAdapterSource:
    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    def latest_key(self, tenant: str, adapter_id: str) -> AdapterKey:
        """The version a request admitted now is pinned to (hot-swap: the newest stored one)."""
        return AdapterKey(tenant, adapter_id, self.store.get(tenant, adapter_id).version)

    def max_rank(self, key: AdapterKey) -> int:
        """The largest LoRA rank of a stored version, from the registry (no file read)."""
        return self.store.get(key.tenant, key.adapter_id, int(key.version)).max_rank

    def read(self, key: AdapterKey) -> LoraAdapter:
        record = self.store.get(key.tenant, key.adapter_id, int(key.version))
        with self.store.held(record):  # a concurrent delete waits until the read is done
            return self.store.read(record)
