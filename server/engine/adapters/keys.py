"""How the engine names an adapter version (`AdapterKey`), what a request pins (`PinnedAdapter`), where residency
reads adapters from, and how a load fails. Plain Python, so the scheduler and the API can name adapters and errors
without importing torch."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the adapter type only: importing adapters_store at run time would import torch
    from lora_server.adapters_store import LoraAdapter


@dataclass(frozen=True)
class AdapterKey:
    """One immutable version of a tenant's adapter: what residency loads, holds and evicts."""

    tenant: str
    adapter_id: str
    version: int | str

    @property
    def lineage(self) -> tuple[str, str]:
        """The adapter across its versions."""
        return self.tenant, self.adapter_id

    def __str__(self) -> str:
        return f"{self.tenant}/{self.adapter_id}@{self.version}"


@dataclass(frozen=True)
class PinnedAdapter:
    """The adapter version a request runs with, and what admission needs to know of it. Read from the store once,
    when the request is submitted (AdapterCatalog.pin); it travels with the request, so the step loop never reads the
    store. A version is immutable, so these facts never go stale."""

    key: AdapterKey
    max_rank: int  # the largest LoRA rank of its modules: the LoRA pool rows it needs

    def __post_init__(self) -> None:
        assert self.max_rank > 0, f"{self.key}: max rank {self.max_rank}"


class AdapterSource(Protocol):
    """Where adapters come from (the durable store). May block on disk; may raise anything, which fails the load."""

    def read(self, key: AdapterKey) -> "LoraAdapter": ...


class AdapterLoadError(RuntimeError):
    """An adapter could not be brought onto the device. `__cause__` holds the underlying error, if any (an
    adapters_store.AdapterError means the adapter itself was refused)."""

    def __init__(self, key: AdapterKey, reason: str) -> None:
        super().__init__(f"adapter {key} could not be loaded: {reason}")
        self.key = key
        self.reason = reason
