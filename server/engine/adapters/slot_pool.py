"""The device tier's bookkeeping: which adapter sits in which slot and rows of the LoRA pool, who holds it, and who
goes when room is short.

Plain Python (no torch, no device memory: the slot writer owns the tensors). A placed adapter owns one slot (the
index the batch's token_slots use) and a run of pool rows (its max rank, rounded up to a page). The budget is rows:
the device memory of a row across every layer is fixed (see `SlotWriter.bytes_per_row`), so rows x bytes per row is
the tier's byte budget.

Holds are counted per key whether or not the key is placed yet (a request may hold an adapter that is still
loading). A held adapter is never evicted. Unheld placed adapters form an LRU; `place` evicts from its old end until
the newcomer fits. With fragmented rows that may evict more than the bare row count needs: we evict rather than
compact, because moving a resident adapter's rows would race with batches that use it.
"""

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from lora_server.engine.adapters.row_allocator import RowAllocator

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Placement:
    slot: int
    row_start: int
    num_rows: int  # rows taken, page rounding included


class SlotPool(Generic[K]):
    def __init__(self, total_rows: int, num_slots: int, page_rows: int = 8) -> None:
        if num_slots <= 0:
            raise ValueError(f"the slot pool needs at least one slot, got {num_slots}")
        self.rows = RowAllocator(total_rows, page_rows)
        self.num_slots = num_slots
        self._free_slots = set(range(num_slots))
        self._placed: OrderedDict[K, Placement] = OrderedDict()  # least recently used first
        self._holders: dict[K, int] = {}

    # ---------------------------------------------------------------- queries

    @property
    def total_rows(self) -> int:
        return self.rows.total_rows

    @property
    def num_used_rows(self) -> int:
        return self.rows.num_used_rows

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def rows_for(self, rank: int) -> int:
        return self.rows.rows_for(rank)

    def is_placed(self, key: K) -> bool:
        return key in self._placed

    def placement(self, key: K) -> Placement | None:
        return self._placed.get(key)

    def placed_keys(self) -> list[K]:
        """Placed keys, least recently used first."""
        return list(self._placed)

    def is_held(self, key: K) -> bool:
        return key in self._holders

    def can_place(self, num_rows: int) -> bool:
        """Whether `num_rows` could be placed now, evicting unheld adapters if need be (held ones never move)."""
        unheld = [p for key, p in self._placed.items() if key not in self._holders]
        has_slot = bool(self._free_slots) or bool(unheld)
        return has_slot and self.rows.can_allocate(num_rows, also_free=[p.row_start for p in unheld])

    # ---------------------------------------------------------------- hold / release

    def hold(self, key: K) -> None:
        self._holders[key] = self._holders.get(key, 0) + 1
        self.touch(key)

    def release(self, key: K) -> int:
        """Drop one hold; returns the holds left."""
        remaining = self._holders[key] - 1
        assert remaining >= 0
        if remaining:
            self._holders[key] = remaining
        else:
            del self._holders[key]
        self.touch(key)  # recency is the last use, and a release is one
        return remaining

    def touch(self, key: K) -> None:
        if key in self._placed:
            self._placed.move_to_end(key)

    # ---------------------------------------------------------------- place / free

    def place(self, key: K, num_rows: int) -> tuple[Placement, list[tuple[K, Placement]]] | None:
        """Give `key` a slot and rows, evicting least recently used unheld adapters until they fit.

        Returns (placement, evicted (key, placement) pairs), or None, evicting nothing, when not even evicting every
        unheld adapter would make room."""
        assert key not in self._placed, f"{key} is already placed"
        if not self.can_place(num_rows):
            return None
        evicted = []
        while not self._free_slots or not self.rows.can_allocate(num_rows):
            victim = next(k for k in self._placed if k not in self._holders)  # exists: can_place said so
            evicted.append((victim, self.free(victim)))
        row_start = self.rows.allocate(num_rows)
        assert row_start is not None
        slot = min(self._free_slots)
        self._free_slots.remove(slot)
        placement = Placement(slot=slot, row_start=row_start, num_rows=self.rows.rows_for(num_rows))
        self._placed[key] = placement
        return placement, evicted

    def free(self, key: K) -> Placement:
        """Take `key` off the device (held or not: the caller decides that is safe)."""
        placement = self._placed.pop(key)
        self.rows.free(placement.row_start)
        self._free_slots.add(placement.slot)
        return placement
