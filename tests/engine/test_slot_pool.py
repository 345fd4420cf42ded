"""The device tier's policy: held adapters never move, rows and slots never overlap, eviction is LRU among the unheld,
and a placement is refused only when not even evicting every unheld adapter would make room."""

from hypothesis import given, settings
from hypothesis import strategies as st

from lora_server.engine.adapters.slot_pool import SlotPool


def test_evicts_least_recently_used_unheld_and_reuses_its_rows():
    pool: SlotPool[str] = SlotPool(total_rows=32, num_slots=4)
    pool.place("a", 8)
    pool.place("b", 16)
    pool.place("c", 8)
    pool.hold("a")
    pool.touch("b")  # b is now more recent than c; a is held
    placement, evicted = pool.place("d", 8)
    assert [key for key, _ in evicted] == ["c"] and placement.row_start == evicted[0][1].row_start
    assert pool.is_placed("a") and pool.is_placed("b")


def test_mixed_ranks_cost_their_own_rows():
    pool: SlotPool[str] = SlotPool(total_rows=64, num_slots=8)
    sizes = {key: pool.place(key, rank)[0].num_rows for key, rank in [("r4", 4), ("r16", 16), ("r8", 8), ("r32", 32)]}
    assert sizes == {"r4": 8, "r16": 16, "r8": 8, "r32": 32}
    assert pool.num_used_rows == 64


def test_refuses_when_only_held_adapters_are_left():
    pool: SlotPool[str] = SlotPool(total_rows=16, num_slots=4)
    pool.place("a", 8)
    pool.place("b", 8)
    pool.hold("a")
    pool.hold("b")
    assert pool.place("c", 8) is None and pool.placed_keys() == ["a", "b"]
    pool.release("b")
    assert [key for key, _ in pool.place("c", 8)[1]] == ["b"]


def test_slots_are_a_budget_too():
    pool: SlotPool[str] = SlotPool(total_rows=64, num_slots=2)
    pool.place("a", 8)
    pool.place("b", 8)
    placement, evicted = pool.place("c", 8)  # rows to spare, but no slot: evict the LRU one for its slot
    assert [key for key, _ in evicted] == ["a"] and placement.slot == evicted[0][1].slot


def fits_without_moving_held(pool: SlotPool, held: set, num_rows: int) -> bool:
    """Brute force: the gaps left between held adapters' rows, and the slots they leave."""
    if len([k for k in pool.placed_keys() if k in held]) >= pool.num_slots:
        return False
    need = pool.rows_for(num_rows)
    position, largest = 0, 0
    for start, rows in sorted((pool.placement(k).row_start, pool.placement(k).num_rows)
                              for k in pool.placed_keys() if k in held):
        largest, position = max(largest, start - position), start + rows
    return max(largest, pool.total_rows - position) >= need


OPS = st.lists(st.tuples(st.sampled_from(["place", "hold", "release", "free"]), st.integers(0, 9),
                         st.sampled_from([1, 4, 8, 16, 24, 32])), max_size=60)


@settings(max_examples=300, deadline=None)
@given(total_pages=st.integers(1, 8), num_slots=st.integers(1, 5), ops=OPS)
def test_random_operations_keep_every_invariant(total_pages, num_slots, ops):
    pool: SlotPool[int] = SlotPool(total_rows=total_pages * 8, num_slots=num_slots)
    holds: dict[int, int] = {}
    for op, key, rank in ops:
        before = {k: pool.placement(k) for k in pool.placed_keys()}
        if op == "place" and not pool.is_placed(key):
            lru_unheld = [k for k in pool.placed_keys() if k not in holds]
            expected_fit = fits_without_moving_held(pool, set(holds), rank)
            result = pool.place(key, rank)
            assert (result is not None) == expected_fit
            if result is None:
                assert {k: pool.placement(k) for k in pool.placed_keys()} == before, "a refusal evicted something"
            else:
                evicted = [k for k, _ in result[1]]
                assert evicted == lru_unheld[: len(evicted)], "evicted out of LRU order, or a held adapter"
                assert result[0].num_rows == pool.rows_for(rank)
        elif op == "hold":
            pool.hold(key)
            holds[key] = holds.get(key, 0) + 1
        elif op == "release" and key in holds:
            assert pool.release(key) == holds[key] - 1
            holds[key] -= 1
            if not holds[key]:
                del holds[key]
        elif op == "free" and pool.is_placed(key) and key not in holds:
            pool.free(key)
        # Held adapters never move; rows and slots never overlap; rows never exceed the budget.
        for k, placement in before.items():
            if k in holds and k != key:
                assert pool.placement(k) == placement
        placements = [pool.placement(k) for k in pool.placed_keys()]
        assert len({p.slot for p in placements}) == len(placements) and all(0 <= p.slot < num_slots
                                                                            for p in placements)
        spans = sorted((p.row_start, p.row_start + p.num_rows) for p in placements)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False))
        assert all(0 <= start and end <= pool.total_rows for start, end in spans)
        assert pool.num_used_rows == sum(p.num_rows for p in placements) <= pool.total_rows
        assert pool.num_free_slots == num_slots - len(placements)
