"""The host tier: LRU under a byte budget; never over it; a value over the whole budget is not kept."""

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from lora_server.engine.adapters.host_cache import HostCache


@dataclass(frozen=True)
class Blob:
    num_bytes: int


def test_evicts_least_recently_used_first():
    cache: HostCache[str, Blob] = HostCache(budget_bytes=100)
    assert cache.put("a", Blob(40)) == [] and cache.put("b", Blob(40)) == []
    assert cache.get("a") == Blob(40)  # a is now the most recent
    assert cache.put("c", Blob(40)) == ["b"]
    assert cache.keys() == ["a", "c"] and cache.num_bytes == 80


def test_value_over_the_budget_is_not_cached_and_evicts_nothing():
    cache: HostCache[str, Blob] = HostCache(budget_bytes=100)
    cache.put("a", Blob(60))
    assert cache.put("big", Blob(101)) == []
    assert "big" not in cache and "a" in cache


@settings(max_examples=200, deadline=None)
@given(budget=st.integers(0, 200),
       ops=st.lists(st.tuples(st.sampled_from(["put", "get", "discard"]), st.integers(0, 7), st.integers(0, 120)),
                    max_size=50))
def test_never_over_budget_and_evicts_in_lru_order(budget, ops):
    cache: HostCache[int, Blob] = HostCache(budget_bytes=budget)
    order: list[int] = []  # our model of the LRU order
    sizes: dict[int, int] = {}
    for op, key, size in ops:
        if op == "put":
            if key in order:
                order.remove(key)
            evicted = cache.put(key, Blob(size))
            if size > budget:
                assert evicted == [] and key not in cache
            else:
                assert evicted == order[: len(evicted)], "evicted out of LRU order"
                del order[: len(evicted)]
                order.append(key)
                sizes[key] = size
        elif op == "get":
            assert (cache.get(key) is not None) == (key in order)
            if key in order:
                order.remove(key)
                order.append(key)
        else:
            cache.discard(key)
            if key in order:
                order.remove(key)
        assert cache.keys() == order
        assert cache.num_bytes == sum(sizes[k] for k in order) <= budget
