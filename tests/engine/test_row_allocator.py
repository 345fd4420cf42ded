"""Rows of the LoRA pool: pages, best fit, coalescing; random allocate/free sequences never overlap or leak."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_server.engine.adapters.row_allocator import RowAllocator


def test_rounds_up_to_pages_and_reuses_freed_rows():
    rows = RowAllocator(total_rows=64, page_rows=8)
    assert rows.rows_for(4) == 8 and rows.rows_for(8) == 8 and rows.rows_for(9) == 16 and rows.rows_for(0) == 8
    a, b, c = rows.allocate(4), rows.allocate(16), rows.allocate(8)
    assert (a, b, c) == (0, 8, 24)
    assert rows.num_used_rows == 32 and rows.num_free_rows == 32
    rows.free(b)
    assert rows.allocate(9) == 8  # best fit: the 16-row hole, not the 32-row tail
    assert rows.allocate(64) is None


def test_best_fit_keeps_large_extents_whole():
    rows = RowAllocator(total_rows=64, page_rows=8)
    starts = [rows.allocate(8) for _ in range(8)]
    rows.free(starts[1])  # hole of one page at 8
    rows.free(starts[4])
    rows.free(starts[5])  # hole of two pages at 32
    assert rows.allocate(8) == 8  # the one-page hole, leaving the two-page one for a rank-16 adapter
    assert rows.allocate(16) == 32


def test_freeing_everything_coalesces_to_one_extent():
    rows = RowAllocator(total_rows=40, page_rows=8)
    starts = [rows.allocate(8) for _ in range(5)]
    for start in (starts[1], starts[3], starts[0], starts[4], starts[2]):
        rows.free(start)
    assert rows.free_extents() == [(0, 40)]


def test_refuses_bad_frees_and_sizes():
    rows = RowAllocator(total_rows=16, page_rows=8)
    with pytest.raises(KeyError):
        rows.free(0)
    start = rows.allocate(8)
    rows.free(start)
    with pytest.raises(KeyError):
        rows.free(start)  # double free
    with pytest.raises(ValueError):
        RowAllocator(total_rows=12, page_rows=8)


@settings(max_examples=200, deadline=None)
@given(total_pages=st.integers(1, 16), ops=st.lists(st.tuples(st.booleans(), st.integers(0, 40), st.integers(0, 99)),
                                                    max_size=60))
def test_random_allocate_free_never_overlaps(total_pages, ops):
    rows = RowAllocator(total_rows=total_pages * 8, page_rows=8)
    live: dict[int, int] = {}  # row_start -> rows
    for is_alloc, num_rows, pick in ops:
        if is_alloc or not live:
            before = dict(rows.free_extents())
            fitting = [length for length in before.values() if length >= rows.rows_for(num_rows)]
            start = rows.allocate(num_rows)
            if start is None:
                assert not fitting, "refused although an extent fits"
                continue
            assert before[start] == min(fitting), "not the best fit"  # taken from the front of the smallest fit
            live[start] = rows.rows_for(num_rows)
        else:
            start = sorted(live)[pick % len(live)]
            del live[start]
            rows.free(start)
        # Allocations and free extents tile [0, total) exactly, with no overlap and no adjacent free extents.
        assert rows.allocations() == live
        pieces = sorted([(s, n, "used") for s, n in live.items()] + [(s, n, "free") for s, n in rows.free_extents()])
        position = 0
        for (start, length, kind), following in zip(pieces, pieces[1:] + [None], strict=True):
            assert start == position and length > 0 and start % 8 == 0
            position += length
            if kind == "free" and following is not None:
                assert following[2] != "free", "free extents left uncoalesced"
        assert position == rows.total_rows
        assert rows.num_free_rows + rows.num_used_rows == rows.total_rows
    for start in list(live):
        rows.free(start)
    assert rows.free_extents() == [(0, rows.total_rows)]


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 24), min_size=1, max_size=10), frees=st.sets(st.integers(0, 9)),
       want=st.integers(1, 64))
def test_can_allocate_matches_freeing_then_allocating(sizes, frees, want):
    rows = RowAllocator(total_rows=96, page_rows=8)
    starts = [s for s in (rows.allocate(n) for n in sizes) if s is not None]
    also_free = [starts[i] for i in frees if i < len(starts)]
    predicted = rows.can_allocate(want, also_free=also_free)
    for start in also_free:
        rows.free(start)
    assert predicted == (rows.allocate(want) is not None)
