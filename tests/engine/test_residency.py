"""Residency over a tiny real model: loads land in the right rows, one load per cold adapter, loads never block the
step loop, failures stay with their adapter, LRU eviction by rows, held adapters stay, and the counters add up."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lora_server.adapters_store import AdapterError, LoraAdapter, LoraModuleWeights
from lora_server.engine.adapters.keys import AdapterKey, AdapterLoadError
from lora_server.engine.adapters.residency import Residency, ResidencyConfig
from tests.engine.residency_helpers import (
    FakeSource,
    page_budget,
    random_adapter,
    rows_for,
    slot_matches,
    slot_rows,
    tiny_model,
)

WAIT_S = 10  # generous timeouts for futures: a healthy test never gets near them


def key(name: str, version: int = 1) -> AdapterKey:
    return AdapterKey("tenant", name, version)


def make(num_pages: int, num_slots: int = 4, host_budget: int = 10**9, delay_s: float = 0.0, **ranks: int):
    model = tiny_model()
    adapters = {key(name): random_adapter(rank, seed=i) for i, (name, rank) in enumerate(ranks.items())}
    source = FakeSource(adapters, delay_s=delay_s)
    config = ResidencyConfig(device_budget_bytes=page_budget(model, num_pages), host_budget_bytes=host_budget,
                             num_slots=num_slots)
    return model, source, Residency(model, source, config)


def load(residency: Residency, k: AdapterKey) -> int:
    """Acquire, wait for the slot, release: the adapter is left resident and unheld."""
    slot = residency.acquire(k).result(timeout=WAIT_S)
    residency.release(k)
    return slot


def test_an_acquired_adapter_is_in_its_slot_rows():
    model, source, residency = make(num_pages=4, a=4, b=16)
    with residency:
        slot_a = residency.acquire(key("a")).result(timeout=WAIT_S)
        slot_b = residency.acquire(key("b")).result(timeout=WAIT_S)
        assert slot_a != slot_b
        assert slot_matches(model, slot_a, source.adapters[key("a")])
        assert slot_matches(model, slot_b, source.adapters[key("b")])
        (start_a, rank_a), (start_b, rank_b) = slot_rows(model, slot_a), slot_rows(model, slot_b)
        assert (rank_a, rank_b) == (4, 16)
        assert start_a + rows_for(4) <= start_b or start_b + rows_for(16) <= start_a  # mixed ranks, own rows
        assert residency.is_ready(key("a"))
        counters = residency.counters()
        assert (counters.loads, counters.disk_hits, counters.device_bytes) == (2, 2, 3 * residency.total_rows // 4
                                                                               * residency.bytes_per_row)


def test_two_requests_for_one_cold_adapter_cause_one_load():
    model, source, residency = make(num_pages=2, a=8)
    gate = source.gate(key("a"))
    with residency:
        with ThreadPoolExecutor(max_workers=8) as requests:
            futures = list(requests.map(lambda _: residency.acquire(key("a")), range(8)))
        assert source.reading[key("a")].wait(WAIT_S)
        assert not any(f.done() for f in futures)
        gate.set()
        slots = {f.result(timeout=WAIT_S) for f in futures}
        assert len(slots) == 1 and source.reads[key("a")] == 1
        counters = residency.counters()
        assert (counters.loads, counters.load_joins) == (1, 7)
        assert slot_matches(model, slots.pop(), source.adapters[key("a")])
        for _ in futures:
            residency.release(key("a"))


def test_a_resident_adapter_is_served_while_another_load_is_blocked_on_disk():
    model, source, residency = make(num_pages=4, a=8, b=8)
    with residency:
        slot_a = load(residency, key("a"))
        gate = source.gate(key("b"))
        pending = residency.acquire(key("b"))
        assert source.reading[key("b")].wait(WAIT_S)
        started = time.perf_counter()
        future = residency.acquire(key("a"))  # the step loop's call: must not wait for b's read
        assert future.done() and future.result() == slot_a and residency.is_ready(key("a"))
        residency.release(key("a"))
        assert time.perf_counter() - started < 0.5 and not pending.done()
        assert residency.counters().device_hits == 1
        gate.set()
        assert slot_matches(model, pending.result(timeout=WAIT_S), source.adapters[key("b")])
        residency.release(key("b"))


def test_a_failed_load_fails_only_its_adapter_and_the_next_request_retries():
    model, source, residency = make(num_pages=4, a=8, b=8)
    source.failures[key("b")] = OSError("disk on fire")
    gate = source.gate(key("b"))
    with residency:
        failing = [residency.acquire(key("b")) for _ in range(2)]
        fine = residency.acquire(key("a"))  # queued behind b's load
        gate.set()
        for future in failing:
            with pytest.raises(AdapterLoadError, match="tenant/b@1 could not be loaded: OSError: disk on fire") as info:
                future.result(timeout=WAIT_S)
            assert isinstance(info.value.__cause__, OSError) and info.value.key == key("b")
        assert slot_matches(model, fine.result(timeout=WAIT_S), source.adapters[key("a")])
        for _ in failing:
            residency.release(key("b"))
        assert not residency.is_ready(key("b")) and residency.counters().load_failures == 1
        del source.failures[key("b")]
        assert slot_matches(model, load(residency, key("b")), source.adapters[key("b")])
        assert source.reads[key("b")] == 2
        residency.release(key("a"))


def test_an_adapter_that_does_not_fit_the_model_fails_with_the_module_named():
    model, source, residency = make(num_pages=4)
    bad = LoraModuleWeights(lora_a=torch.randn(8, 31), lora_b=torch.randn(32, 8), scale=1.0)
    source.adapters[key("bad")] = LoraAdapter(modules={(0, "q_proj"): bad}, config={})
    source.failures[key("refused")] = AdapterError("r", "must be positive", file="adapter_config.json")
    with residency:
        with pytest.raises(AdapterLoadError, match=r"does not fit the base model: layer 0 q_proj: lora_a \(8, 31\)"):
            residency.acquire(key("bad")).result(timeout=WAIT_S)
        with pytest.raises(AdapterLoadError, match="adapter_config.json: r: must be positive") as info:
            residency.acquire(key("refused")).result(timeout=WAIT_S)
        assert isinstance(info.value.__cause__, AdapterError)  # what the API maps to a 4xx
        residency.release(key("bad"))
        residency.release(key("refused"))
        assert residency.counters().device_bytes == 0


def test_a_rank_larger_than_the_whole_pool_fails_instead_of_waiting():
    model, source, residency = make(num_pages=2, big=24)
    with residency:
        with pytest.raises(AdapterLoadError, match="rank 24 needs 24 rows of the device LoRA pool, which has 16"):
            residency.acquire(key("big")).result(timeout=WAIT_S)
        residency.release(key("big"))


def test_lru_eviction_by_rows_and_host_hits_after_eviction():
    model, source, residency = make(num_pages=2, a=8, b=8, c=8)
    with residency:
        load(residency, key("a"))
        load(residency, key("b"))
        load(residency, key("a"))  # a is now the most recently used
        load(residency, key("c"))  # no room: evicts b, the least recently used
        assert residency.is_ready(key("a")) and not residency.is_ready(key("b")) and residency.is_ready(key("c"))
        slot = load(residency, key("b"))  # back from the host cache, no disk read; evicts a
        assert slot_matches(model, slot, source.adapters[key("b")]) and source.reads[key("b")] == 1
        counters = residency.counters()
        assert (counters.device_hits, counters.disk_hits, counters.host_hits) == (1, 3, 1)
        assert (counters.loads, counters.device_evictions) == (4, 2)
        assert counters.device_bytes == counters.device_budget_bytes == 16 * residency.bytes_per_row
        assert counters.host_bytes == 3 * source.adapters[key("a")].num_bytes


def test_a_held_adapter_is_never_evicted_and_a_load_waits_for_a_release():
    model, source, residency = make(num_pages=2, a=8, b=8, c=8)
    with residency:
        slot_a = residency.acquire(key("a")).result(timeout=WAIT_S)
        residency.acquire(key("b")).result(timeout=WAIT_S)
        waiting = residency.acquire(key("c"))
        time.sleep(0.05)
        assert not waiting.done() and residency.is_ready(key("a")) and residency.is_ready(key("b"))
        assert slot_matches(model, slot_a, source.adapters[key("a")])
        residency.release(key("a"))
        slot_c = waiting.result(timeout=WAIT_S)
        assert slot_c == slot_a and slot_matches(model, slot_c, source.adapters[key("c")])
        assert residency.is_ready(key("b")) and not residency.is_ready(key("a"))
        residency.release(key("b"))
        residency.release(key("c"))


def test_prefetch_warms_without_holding_and_never_waits():
    model, source, residency = make(num_pages=1, num_slots=1, a=8, b=8)
    with residency:
        assert residency.prefetch(key("a")).result(timeout=WAIT_S) is not None  # room: onto the device
        assert residency.is_ready(key("a")) and residency.acquire(key("a")).done()
        assert residency.prefetch(key("b")).result(timeout=WAIT_S) is None  # a is held: b stays on the host
        counters = residency.counters()
        assert (counters.num_host_adapters, counters.disk_hits) == (2, 2)
        residency.release(key("a"))
        assert residency.prefetch(key("b")).result(timeout=WAIT_S) is not None  # now it evicts a, from the host
        assert source.reads[key("b")] == 1 and residency.is_ready(key("b"))


def test_host_cache_stays_under_budget_and_skips_adapters_over_it():
    adapter_bytes = random_adapter(8, seed=0).num_bytes
    model, source, residency = make(num_pages=3, host_budget=2 * adapter_bytes, a=8, b=8, c=8, big=24)
    with residency:
        for name in ("a", "b", "c", "big"):
            load(residency, key(name))
            counters = residency.counters()
            assert counters.host_bytes <= counters.host_budget_bytes
        counters = residency.counters()
        assert counters.num_host_adapters == 2 and counters.host_evictions == 1  # big was never cached


def test_acquire_after_close_fails_cleanly():
    model, source, residency = make(num_pages=1, a=8)
    residency.close()
    with pytest.raises(AdapterLoadError, match="shutting down"):
        residency.acquire(key("a")).result(timeout=WAIT_S)


def test_counters_are_a_snapshot():
    model, source, residency = make(num_pages=1, a=8)
    with residency:
        before = residency.counters()
        load(residency, key("a"))
        assert before.loads == 0 and residency.counters().loads == 1


def test_release_from_many_threads_keeps_the_count():
    model, source, residency = make(num_pages=2, a=8, b=8)
    with residency:
        load(residency, key("a"))

        def request(_: int) -> None:
            residency.acquire(key("a")).result(timeout=WAIT_S)
            residency.release(key("a"))

        threads = [threading.Thread(target=request, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        load(residency, key("b"))
        assert residency.counters().device_hits == 16
        residency.acquire(key("b")).result(timeout=WAIT_S)  # a is unheld: a third adapter would evict it
        assert residency.is_ready(key("a"))
        residency.release(key("b"))
