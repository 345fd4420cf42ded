"""Adapter residency: the store on disk, a host-memory LRU, and the device pool, with loads off the step loop.

The scheduler's side, per request (every `acquire` is paired with exactly one `release`, whatever the outcome):

    residency.can_make_resident(pinned)  # admission: on the device, or room for its max rank now
    residency.prefetch(key)              # when queued but cold: start bringing it in, no hold (advisory)
    future = residency.acquire(key)      # at admission: hold it; future.result() is its slot once on the device
    ...                                  # run while future.done() and not future.exception(); the slot is stable while
                                         # held, so the scheduler reads it from the future, never asks again
    residency.release(key)               # at the end, or when the load failed

An upload hands its parsed adapter over (`put_on_host`), so the first request for a new version finds it in the host
cache instead of parsing its files again.

Threading. One lock (a Condition) guards all policy state; it is never held across a disk read or a device copy, so
`can_make_resident`, `acquire`, `release` and `prefetch` (the step loop's calls) return in microseconds even while a
load is under way. Loads run on one loader thread: read (host cache, else the source) -> validate -> place
(evicting LRU unheld adapters) -> copy into the slot's rows -> mark ready. A load for a held key that finds no room
even after evicting every unheld adapter waits on the Condition for a release; a prefetch in that position gives up
(the adapter stays warm on the host). Two requests for one cold key join one load. A failed load fails only the
futures of its key; the next request for that key tries again.

Hot-swap. A key names one immutable version. When a newer version of an adapter is asked for (int versions compare
as numbers, as the store issues them; other versions are ordered by when residency first sees them), the older ones
are retired: they keep serving the requests that hold them and leave the device (and host cache) the moment their last
holder releases, rather than waiting for LRU. An older version asked for by name (pinned) still works, but it is never
kept once unheld. No request sees a mix: a version's rows are written before its future resolves and never rewritten
while anything holds it. (The set of retired keys only grows: one small entry per superseded version.)
"""

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from lora_server.adapters_store import LoraAdapter
from lora_server.engine.adapters.host_cache import HostCache
from lora_server.engine.adapters.keys import AdapterKey, AdapterLoadError, AdapterSource, PinnedAdapter
from lora_server.engine.adapters.slot_pool import Placement, SlotPool
from lora_server.engine.adapters.slot_writer import SlotWriter
from lora_server.model.llama import LlamaModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResidencyConfig:
    device_budget_bytes: int  # LoRA pool memory on the device, all layers; enforced as rows (see SlotPool)
    host_budget_bytes: int  # parsed adapters kept in CPU memory
    num_slots: int  # distinct adapters on the device at once (the most a batch can mix)
    page_rows: int = 8  # an adapter's rows are rounded up to this, so freed runs fit other ranks

    def __post_init__(self) -> None:
        if self.device_budget_bytes <= 0 or self.host_budget_bytes < 0:
            raise ValueError(f"budgets must be positive (device {self.device_budget_bytes}, "
                             f"host {self.host_budget_bytes})")
        if self.num_slots <= 0 or self.page_rows <= 0:
            raise ValueError(f"num_slots ({self.num_slots}) and page_rows ({self.page_rows}) must be positive")


@dataclass
class ResidencyCounters:
    """Totals since start, and the current bytes and adapters per tier (a snapshot: see Residency.counters)."""

    device_hits: int = 0  # acquires that found the adapter ready on the device
    load_joins: int = 0  # acquires or prefetches that joined a load already under way
    host_hits: int = 0  # loads served from the host cache
    disk_hits: int = 0  # loads that read the source
    disk_bytes_read: int = 0
    loads: int = 0  # adapters copied onto the device
    load_failures: int = 0
    device_evictions: int = 0  # LRU evictions to make room
    host_evictions: int = 0
    retired_frees: int = 0  # superseded versions taken off the device when their last holder released
    device_bytes: int = 0  # rows in use x bytes per row, page rounding included
    device_budget_bytes: int = 0  # total rows x bytes per row (the configured budget rounded down to whole pages)
    host_bytes: int = 0
    host_budget_bytes: int = 0
    num_device_adapters: int = 0
    num_host_adapters: int = 0
    num_loading: int = 0


class Residency:
    def __init__(self, model: LlamaModel, source: AdapterSource, config: ResidencyConfig) -> None:
        self.config = config
        self.source = source
        self.writer = SlotWriter(model)
        self.bytes_per_row = self.writer.bytes_per_row
        page_bytes = self.bytes_per_row * config.page_rows
        total_rows = config.device_budget_bytes // page_bytes * config.page_rows
        if total_rows == 0:
            raise ValueError(f"a device budget of {config.device_budget_bytes} bytes holds no page of "
                             f"{config.page_rows} LoRA rows ({page_bytes} bytes for this model)")
        self.writer.allocate_pool(total_rows, config.num_slots)
        self._pool: SlotPool[AdapterKey] = SlotPool(total_rows, config.num_slots, config.page_rows)
        self._host: HostCache[AdapterKey, LoraAdapter] = HostCache(config.host_budget_bytes)
        self._loading: dict[AdapterKey, Future] = {}  # keys with a load queued or running
        self._newest: dict[tuple[str, str], int | str] = {}  # lineage -> the version seen last
        self._retired: set[AdapterKey] = set()  # superseded or retired versions: never kept once unheld
        self._slots_to_clear: set[int] = set()  # freed slots whose tables the loader zeroes (tidiness, not safety)
        self._counters = ResidencyCounters()
        self._lock = threading.Condition()
        self._closed = False
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-loader")

    @property
    def total_rows(self) -> int:
        return self._pool.total_rows

    # ---------------------------------------------------------------- the scheduler's calls (never block on I/O)

    def prefetch(self, key: AdapterKey) -> Future[int | None]:
        """Start bringing `key` onto the device without holding it. The future gives its slot, or None when there was
        no room without waiting (it is then warm in the host cache); it may be evicted again before it is acquired."""
        with self._lock:
            self._note_version(key)
            if key in self._loading:
                self._counters.load_joins += 1
                return self._loading[key]
            placement = self._pool.placement(key)
            if placement is not None:
                self._pool.touch(key)
                return _resolved(placement.slot)
            return self._start_load(key)

    def acquire(self, key: AdapterKey) -> Future[int]:
        """Hold `key` (it is never evicted while held) and return a future of its slot: already done when the adapter
        is on the device, else done when its load ends, with an AdapterLoadError if the load failed."""
        with self._lock:
            self._note_version(key)
            self._pool.hold(key)
            if key in self._loading:
                self._counters.load_joins += 1
                return self._loading[key]
            placement = self._pool.placement(key)
            if placement is not None:
                self._counters.device_hits += 1
                return _resolved(placement.slot)
            return self._start_load(key)

    def release(self, key: AdapterKey) -> None:
        """Drop one hold taken by `acquire`; a retired version leaves the device when its last holder goes."""
        with self._lock:
            if self._pool.release(key) == 0:
                self._free_if_retired(key)
                self._lock.notify_all()  # a load waiting for room may now evict this adapter

    def retire_lineage(self, tenant: str, adapter_id: str) -> None:
        """Retire every version of an adapter (it was deleted): each leaves as soon as nothing holds it."""
        with self._lock:
            lineage = (tenant, adapter_id)
            for key in self._pool.placed_keys() + self._host.keys():
                if key.lineage == lineage:
                    self._retire(key)
            self._newest.pop(lineage, None)
            self._lock.notify_all()

    def tier_of(self, tenant: str, adapter_id: str) -> str:
        """Where the adapter's newest version seen here sits: "device", "host", or "disk" (only in the store)."""
        with self._lock:
            keys = [k for k in self._pool.placed_keys() + self._host.keys() if k.lineage == (tenant, adapter_id)]
            if any(self._pool.is_placed(k) and k not in self._loading for k in keys):
                return "device"
            return "host" if keys else "disk"

    def is_ready(self, key: AdapterKey) -> bool:
        with self._lock:
            return self._pool.is_placed(key) and key not in self._loading

    def can_place(self, rank: int) -> bool:
        """Whether an adapter of this max rank could go onto the device now without waiting for a release (evicting
        unheld adapters if need be). Loads under way are not counted: a hint for admission, not a promise."""
        with self._lock:
            return self._pool.can_place(rank)

    def can_make_resident(self, adapter: PinnedAdapter) -> bool:
        """Admission's question: on the device now, or room for it without waiting (the pinned max rank: no store
        read, so the step loop never waits on the registry)."""
        with self._lock:  # reentrant (a Condition's default lock): one consistent look at both
            return self.is_ready(adapter.key) or self.can_place(adapter.max_rank)

    def put_on_host(self, key: AdapterKey, adapter: LoraAdapter) -> None:
        """Keep an adapter the caller has just parsed (an upload: validated against the same base) in the host cache,
        so its first load copies it from there. Not for a retired key, nor one that does not fit this model (its load
        will then read the store and fail with the reason)."""
        try:
            self.writer.validate(adapter)
        except ValueError as exc:
            logger.warning("not caching %s on the host: it does not fit the base model: %s", key, exc)
            return
        with self._lock:
            if key not in self._retired:
                self._counters.host_evictions += len(self._host.put(key, adapter))

    def counters(self) -> ResidencyCounters:
        with self._lock:
            return replace(
                self._counters,
                device_bytes=self._pool.num_used_rows * self.bytes_per_row,
                device_budget_bytes=self._pool.total_rows * self.bytes_per_row,
                host_bytes=self._host.num_bytes,
                host_budget_bytes=self._host.budget_bytes,
                num_device_adapters=len(self._pool.placed_keys()),
                num_host_adapters=len(self._host),
                num_loading=len(self._loading),
            )

    def close(self) -> None:
        """Fail loads not yet placed, wait for the loader thread to stop."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._loader.shutdown(wait=True)

    def __enter__(self) -> "Residency":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------- policy helpers (called with the lock held)

    def _start_load(self, key: AdapterKey) -> Future:
        future: Future = Future()
        if self._closed:
            future.set_exception(AdapterLoadError(key, "the server is shutting down"))
            return future
        self._loading[key] = future
        self._loader.submit(self._load, key, future)
        return future

    def _note_version(self, key: AdapterKey) -> None:
        newest = self._newest.get(key.lineage)
        if newest is None:
            self._newest[key.lineage] = key.version
        elif key.version != newest:
            if isinstance(key.version, int) and isinstance(newest, int):
                is_newer = key.version > newest  # the store numbers versions
            else:
                is_newer = key not in self._retired  # otherwise: the version seen later is the newer
            if is_newer:
                self._newest[key.lineage] = key.version
                self._retire(AdapterKey(key.tenant, key.adapter_id, newest))
            else:
                self._retired.add(key)  # an older version asked for by name: served, but never kept once unheld

    def _retire(self, key: AdapterKey) -> None:
        self._retired.add(key)
        self._host.discard(key)
        self._free_if_retired(key)

    def _free_if_retired(self, key: AdapterKey) -> bool:
        # A key being written is held by the loader, so this never frees rows under a copy.
        if key not in self._retired or not self._pool.is_placed(key) or self._pool.is_held(key):
            return False
        self._slots_to_clear.add(self._pool.free(key).slot)
        self._counters.retired_frees += 1
        return True

    # ---------------------------------------------------------------- the loader thread

    def _load(self, key: AdapterKey, future: Future) -> None:
        try:
            adapter = self._read(key)
            placement = self._place(key, adapter)
            if placement is not None:
                self._write(key, placement, adapter)
        except Exception as exc:  # any failure fails this key's requests, and only them
            self._fail(key, future, exc)
        else:
            self._finish(key, future, placement)
        finally:
            self._clear_freed_slots()

    def _read(self, key: AdapterKey) -> LoraAdapter:
        with self._lock:
            if self._closed:
                raise AdapterLoadError(key, "the server is shutting down")
            adapter = self._host.get(key)
            if adapter is not None:
                self._counters.host_hits += 1
                return adapter
        adapter = self.source.read(key)  # the slow part: never under the lock
        with self._lock:
            self._counters.disk_hits += 1
            self._counters.disk_bytes_read += adapter.num_bytes
        try:
            self.writer.validate(adapter)
        except ValueError as exc:
            raise AdapterLoadError(key, f"it does not fit the base model: {exc}") from exc
        return adapter

    def _place(self, key: AdapterKey, adapter: LoraAdapter) -> Placement | None:
        """Rows and a slot for `key` (held by the loader until written), or None to leave it on the host only."""
        num_rows = self._pool.rows_for(adapter.max_rank)
        if num_rows > self._pool.total_rows:
            raise AdapterLoadError(key, f"rank {adapter.max_rank} needs {num_rows} rows of the device LoRA pool, "
                                        f"which has {self._pool.total_rows}; raise the device budget")
        with self._lock:
            if key not in self._retired:
                self._counters.host_evictions += len(self._host.put(key, adapter))
            while True:
                if self._closed:
                    raise AdapterLoadError(key, "the server is shutting down")
                wanted = self._pool.is_held(key)
                placed = None if not wanted and key in self._retired else self._pool.place(key, num_rows)
                if placed is not None:
                    break
                if not wanted:  # a prefetch never waits for room; an acquire from now on starts a new load
                    del self._loading[key]
                    return None
                self._lock.wait()  # every slot or row is held: wait for a release
            placement, evicted = placed
            self._counters.device_evictions += len(evicted)
            self._slots_to_clear.update(old.slot for _, old in evicted)
            self._slots_to_clear.discard(placement.slot)
            self._pool.hold(key)  # the loader's own hold: nothing frees these rows while they are written
            return placement

    def _write(self, key: AdapterKey, placement: Placement, adapter: LoraAdapter) -> None:
        try:
            self.writer.write(placement.slot, placement.row_start, adapter)
        except Exception:
            with self._lock:
                self._pool.release(key)
                self._slots_to_clear.add(self._pool.free(key).slot)
            raise

    def _finish(self, key: AdapterKey, future: Future, placement: Placement | None) -> None:
        slot = None
        if placement is not None:  # else _place already ended the load, leaving the adapter warm on the host
            with self._lock:
                del self._loading[key]
                self._counters.loads += 1
                self._pool.release(key)  # the loader's hold
                slot = None if self._free_if_retired(key) else placement.slot
                self._lock.notify_all()
        future.set_result(slot)

    def _fail(self, key: AdapterKey, future: Future, exc: Exception) -> None:
        error = exc if isinstance(exc, AdapterLoadError) else AdapterLoadError(key, f"{type(exc).__name__}: {exc}")
        if error is not exc:
            error.__cause__ = exc
        with self._lock:
            del self._loading[key]
            self._host.discard(key)
            self._counters.load_failures += 1
        logger.warning("%s", error)
        future.set_exception(error)

    def _clear_freed_slots(self) -> None:
        # Only the loader thread places adapters, so a slot taken from this set cannot be reused before it is cleared.
        with self._lock:
            slots, self._slots_to_clear = self._slots_to_clear, set()
        for slot in sorted(slots):
            self.writer.clear(slot)


def _resolved(slot: int) -> Future:
    future: Future = Future()
    future.set_result(slot)
    return future
