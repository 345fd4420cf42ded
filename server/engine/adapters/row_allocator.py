"""Rows of the LoRA pool, handed out in pages: an adapter of rank r takes ceil(r / page_rows) pages of contiguous rows.

Plain Python (no torch): the slot pool decides *where* an adapter goes, and only the slot writer touches tensors.
Free rows are kept as sorted, coalesced extents of pages. Allocation is best-fit (the smallest extent that fits,
lowest start on ties), which keeps large extents whole for high-rank adapters when ranks are mixed.
"""

import bisect
from collections.abc import Iterable


class RowAllocator:
    def __init__(self, total_rows: int, page_rows: int = 8) -> None:
        if page_rows <= 0 or total_rows < 0 or total_rows % page_rows:
            raise ValueError(f"total_rows ({total_rows}) must be a non-negative multiple of page_rows ({page_rows})")
        self.total_rows = total_rows
        self.page_rows = page_rows
        # Free extents as parallel sorted lists (in pages): never empty, never overlapping, never adjacent.
        self._free_starts: list[int] = [0] if total_rows else []
        self._free_lens: list[int] = [total_rows // page_rows] if total_rows else []
        self._allocated: dict[int, int] = {}  # start page -> number of pages

    # ---------------------------------------------------------------- queries

    def rows_for(self, num_rows: int) -> int:
        """The rows an allocation of `num_rows` really takes: rounded up to whole pages (at least one)."""
        return self._pages_for(num_rows) * self.page_rows

    @property
    def num_free_rows(self) -> int:
        return sum(self._free_lens) * self.page_rows

    @property
    def num_used_rows(self) -> int:
        return sum(self._allocated.values()) * self.page_rows

    def free_extents(self) -> list[tuple[int, int]]:
        """(row_start, num_rows) of every free extent, in row order."""
        extents = zip(self._free_starts, self._free_lens, strict=True)
        return [(start * self.page_rows, length * self.page_rows) for start, length in extents]

    def allocations(self) -> dict[int, int]:
        """row_start -> num_rows of every live allocation."""
        return {s * self.page_rows: n * self.page_rows for s, n in self._allocated.items()}

    def can_allocate(self, num_rows: int, also_free: Iterable[int] = ()) -> bool:
        """Whether `num_rows` would fit if the allocations starting at the rows in `also_free` were freed first."""
        pages = self._pages_for(num_rows)
        extents = list(zip(self._free_starts, self._free_lens, strict=True))
        extents += [(row // self.page_rows, self._allocated[row // self.page_rows]) for row in also_free]
        run_start, run_len = None, 0
        for start, length in sorted(extents):
            if run_start is not None and start == run_start + run_len:
                run_len += length
            else:
                run_start, run_len = start, length
            if run_len >= pages:
                return True
        return False

    # ---------------------------------------------------------------- allocate / free

    def allocate(self, num_rows: int) -> int | None:
        """The first row of a fresh run of rows_for(num_rows) rows, or None if no free extent is large enough."""
        pages = self._pages_for(num_rows)
        best = None
        for i, length in enumerate(self._free_lens):
            if length >= pages and (best is None or length < self._free_lens[best]):
                best = i
        if best is None:
            return None
        start = self._free_starts[best]
        if self._free_lens[best] == pages:
            del self._free_starts[best], self._free_lens[best]
        else:
            self._free_starts[best] += pages
            self._free_lens[best] -= pages
        self._allocated[start] = pages
        return start * self.page_rows

    def free(self, row_start: int) -> None:
        """Return the allocation that starts at `row_start`, merging it with free neighbours."""
        start = row_start // self.page_rows
        if row_start % self.page_rows or start not in self._allocated:
            raise KeyError(f"no allocation starts at row {row_start}")
        pages = self._allocated.pop(start)
        i = bisect.bisect_left(self._free_starts, start)
        merges_left = i > 0 and self._free_starts[i - 1] + self._free_lens[i - 1] == start
        merges_right = i < len(self._free_starts) and start + pages == self._free_starts[i]
        if merges_left and merges_right:
            self._free_lens[i - 1] += pages + self._free_lens[i]
            del self._free_starts[i], self._free_lens[i]
        elif merges_left:
            self._free_lens[i - 1] += pages
        elif merges_right:
            self._free_starts[i] = start
            self._free_lens[i] += pages
        else:
            self._free_starts.insert(i, start)
            self._free_lens.insert(i, pages)

    def _pages_for(self, num_rows: int) -> int:
        assert num_rows >= 0, num_rows
        return max(1, -(-num_rows // self.page_rows))
