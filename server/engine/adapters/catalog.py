"""The adapter versions the store holds, as the engine reads them: `pin` when a request is submitted (one registry
read: its version and max rank), and `read` for residency's loader thread (the files, parsed). The step loop calls
neither: what it needs of a version travels with the request as a PinnedAdapter."""

from lora_server.adapters_store import AdapterStore, LoraAdapter
from lora_server.engine.adapters.keys import AdapterKey, PinnedAdapter


class AdapterCatalog:
    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    def pin(self, tenant: str, adapter_id: str, version: int | None = None) -> PinnedAdapter:
        """The version a request submitted now runs with: `version`, or the newest stored (hot-swap). Raises
        adapters_store.AdapterNotFound (unknown, or another tenant's) or AdapterUnusable."""
        record = self.store.get(tenant, adapter_id, version)
        return PinnedAdapter(AdapterKey(tenant, adapter_id, record.version), record.max_rank)

    def read(self, key: AdapterKey) -> LoraAdapter:
        """Residency's AdapterSource: the stored version, parsed (on the loader thread)."""
        record = self.store.get(key.tenant, key.adapter_id, int(key.version))
        with self.store.held(record):  # a concurrent delete waits until the read is done
            return self.store.read(record)
