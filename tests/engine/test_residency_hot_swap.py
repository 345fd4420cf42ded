"""Hot-swap: requests admitted after a new version is stored run on it, requests already running finish on theirs, the
old version leaves the device with its last request, and no request ever reads a mix of two versions' weights."""

import random
import threading
import time

from lora_server.engine.adapters.keys import AdapterKey
from lora_server.engine.adapters.residency import Residency, ResidencyConfig
from tests.engine.residency_helpers import FakeSource, page_budget, random_adapter, slot_matches, tiny_model

WAIT_S = 10


def versions(name: str, count: int, rank: int = 8) -> dict[AdapterKey, object]:
    return {AdapterKey("t", name, v): random_adapter(rank, seed=100 + v) for v in range(1, count + 1)}


def test_running_requests_finish_on_their_version_and_it_leaves_with_the_last():
    model = tiny_model()
    adapters = versions("a", 2)
    v1, v2 = AdapterKey("t", "a", 1), AdapterKey("t", "a", 2)
    source = FakeSource(adapters)
    config = ResidencyConfig(device_budget_bytes=page_budget(model, 2), host_budget_bytes=10**9, num_slots=2)
    with Residency(model, source, config) as residency:
        old_slots = [residency.acquire(v1).result(timeout=WAIT_S) for _ in range(3)]  # three requests on v1
        gate = source.gate(v2)
        new = [residency.acquire(v2) for _ in range(3)]  # v2 stored: the next three are admitted on it
        assert source.reading[v2].wait(WAIT_S)
        assert slot_matches(model, old_slots[0], adapters[v1])  # v1 keeps decoding while v2 loads
        gate.set()
        new_slots = [f.result(timeout=WAIT_S) for f in new]
        assert len(set(old_slots)) == 1 and len(set(new_slots)) == 1 and old_slots[0] != new_slots[0]
        assert source.reads[v2] == 1
        assert slot_matches(model, old_slots[0], adapters[v1]) and slot_matches(model, new_slots[0], adapters[v2])
        residency.release(v1)
        residency.release(v1)
        assert residency.is_ready(v1) and slot_matches(model, old_slots[0], adapters[v1])  # one request left on v1
        residency.release(v1)
        assert not residency.is_ready(v1)  # freed at once with its last request, not left for LRU
        counters = residency.counters()
        assert counters.retired_frees == 1 and counters.num_device_adapters == 1 and counters.num_host_adapters == 1
        for _ in new:
            residency.release(v2)
        assert residency.is_ready(v2)  # the current version stays, unheld, for the next request


def test_a_pinned_older_version_is_served_but_not_kept():
    model = tiny_model()
    adapters = versions("a", 2)
    v1, v2 = AdapterKey("t", "a", 1), AdapterKey("t", "a", 2)
    config = ResidencyConfig(device_budget_bytes=page_budget(model, 2), host_budget_bytes=10**9, num_slots=2)
    with Residency(model, FakeSource(adapters), config) as residency:
        residency.acquire(v1).result(timeout=WAIT_S)
        residency.release(v1)
        residency.acquire(v2).result(timeout=WAIT_S)  # v2 is new: v1 leaves (it was unheld)
        assert not residency.is_ready(v1)
        slot = residency.acquire(v1).result(timeout=WAIT_S)  # asking for v1 by name still works
        assert slot_matches(model, slot, adapters[v1]) and residency.is_ready(v2)
        residency.release(v1)
        assert not residency.is_ready(v1) and residency.is_ready(v2)  # v2 stays current
        residency.release(v2)


def test_retire_drops_an_adapter_once_nothing_holds_it():
    model = tiny_model()
    adapters = {**versions("a", 1), **versions("b", 1)}
    a, b = AdapterKey("t", "a", 1), AdapterKey("t", "b", 1)
    config = ResidencyConfig(device_budget_bytes=page_budget(model, 2), host_budget_bytes=10**9, num_slots=2)
    with Residency(model, FakeSource(adapters), config) as residency:
        residency.acquire(a).result(timeout=WAIT_S)
        residency.acquire(b).result(timeout=WAIT_S)
        residency.release(b)
        residency.retire_lineage("t", "a")
        residency.retire_lineage("t", "b")
        assert residency.is_ready(a) and not residency.is_ready(b)
        residency.release(a)
        counters = residency.counters()
        assert (counters.num_device_adapters, counters.num_host_adapters, counters.device_bytes) == (0, 0, 0)


def test_hot_swaps_under_concurrent_requests_never_mix_versions():
    """Request threads admit on whatever version is current, decode a few steps reading their slot's weights back,
    and release; a publisher stores v2 then v3 meanwhile. The pool has room for two adapters only, so v3 waits for
    v1's last request to end."""
    model = tiny_model()
    adapters = versions("a", 3)
    source = FakeSource(adapters, delay_s=0.01)
    config = ResidencyConfig(device_budget_bytes=page_budget(model, 2), host_budget_bytes=10**9, num_slots=2)
    store_lock, current = threading.Lock(), {"version": 1}
    admitted: list[tuple[int, int]] = []  # (version current at admission, version run)
    errors: list[str] = []

    def request(seed: int) -> None:
        rng = random.Random(seed)
        time.sleep(rng.uniform(0, 0.15))
        with store_lock:  # admission: the version stored last, as the store reports it
            version = current["version"]
            key = AdapterKey("t", "a", version)
            future = residency.acquire(key)
        try:
            slot = future.result(timeout=WAIT_S)
            for _ in range(rng.randint(1, 4)):  # decode steps
                if not slot_matches(model, slot, adapters[key]):
                    errors.append(f"a request on v{version} read other weights at slot {slot}")
                time.sleep(rng.uniform(0, 0.01))
            admitted.append((version, key.version))
        finally:
            residency.release(key)

    with Residency(model, source, config) as residency:
        threads = [threading.Thread(target=request, args=(seed,)) for seed in range(24)]
        for thread in threads:
            thread.start()
        for version in (2, 3):
            time.sleep(0.05)
            with store_lock:
                current["version"] = version
        for thread in threads:
            thread.join(timeout=WAIT_S)
        assert not errors, errors
        assert len(admitted) == 24 and all(at == ran for at, ran in admitted)
        v3 = AdapterKey("t", "a", 3)
        assert not residency.is_ready(AdapterKey("t", "a", 1)) and not residency.is_ready(AdapterKey("t", "a", 2))
        counters = residency.counters()
        seen = {ran for _, ran in admitted}
        assert all(source.reads[AdapterKey("t", "a", v)] == 1 for v in seen)  # concurrent requests: one load each
        if 3 in seen:
            assert residency.is_ready(v3) and counters.num_device_adapters == 1
        assert counters.device_bytes <= counters.device_budget_bytes


def test_an_older_version_first_seen_after_the_newest_does_not_supersede_it():
    model = tiny_model()
    adapters = versions("a", 2)
    v1, v2 = AdapterKey("t", "a", 1), AdapterKey("t", "a", 2)
    config = ResidencyConfig(device_budget_bytes=page_budget(model, 2), host_budget_bytes=10**9, num_slots=2)
    with Residency(model, FakeSource(adapters), config) as residency:
        residency.acquire(v2).result(timeout=WAIT_S)  # after a restart, say: v2 is the first version seen
        residency.acquire(v1).result(timeout=WAIT_S)  # a request pinned to v1
        residency.release(v1)
        residency.release(v2)
        assert residency.is_ready(v2) and not residency.is_ready(v1)
