"""Random acquire / release / prefetch sequences through the whole residency: byte budgets of both tiers are never
exceeded, held adapters never move or change, and held adapters' rows never overlap."""

from functools import cache

from hypothesis import given, settings
from hypothesis import strategies as st

from lora_server.engine.adapters.keys import AdapterKey
from lora_server.engine.adapters.residency import Residency, ResidencyConfig
from lora_server.model.llama import LlamaModel
from tests.engine.residency_helpers import (
    FakeSource,
    page_budget,
    random_adapter,
    rows_for,
    slot_matches,
    slot_rows,
    tiny_model,
)

RANKS = (4, 8, 16, 8, 4, 24)  # adapter i has rank RANKS[i]
WAIT_S = 10


@cache
def shared_model() -> LlamaModel:
    return tiny_model()  # each Residency allocates a fresh pool in it


@cache
def adapters():
    return {AdapterKey("t", str(i), 1): random_adapter(rank, seed=i) for i, rank in enumerate(RANKS)}


OPS = st.lists(st.tuples(st.sampled_from(["acquire", "release", "prefetch"]), st.integers(0, len(RANKS) - 1)),
               max_size=30)


@settings(max_examples=100, deadline=None)
@given(num_pages=st.integers(3, 6), num_slots=st.integers(1, 4), host_adapters=st.integers(0, 4), ops=OPS)
def test_budgets_hold_and_held_adapters_never_move(num_pages, num_slots, host_adapters, ops):
    model = shared_model()
    source = FakeSource(adapters())
    host_budget = host_adapters * random_adapter(8, seed=0).num_bytes
    config = ResidencyConfig(device_budget_bytes=page_budget(model, num_pages), host_budget_bytes=host_budget,
                             num_slots=num_slots)
    held: dict[AdapterKey, tuple[int, int]] = {}  # key -> (holds, slot)
    with Residency(model, source, config) as residency:
        for op, index in ops:
            key = AdapterKey("t", str(index), 1)
            if op == "acquire" and (key in held or residency.can_place(RANKS[index])):
                slot = residency.acquire(key).result(timeout=WAIT_S)  # the loader is idle: this never waits long
                holds, old_slot = held.get(key, (0, slot))
                assert slot == old_slot
                held[key] = (holds + 1, slot)
            elif op == "release" and key in held:
                residency.release(key)
                holds, slot = held[key]
                held[key] = (holds - 1, slot)
                if holds == 1:
                    del held[key]
            elif op == "prefetch":
                residency.prefetch(key).result(timeout=WAIT_S)

            counters = residency.counters()
            assert counters.device_bytes <= counters.device_budget_bytes
            assert counters.host_bytes <= counters.host_budget_bytes
            assert counters.num_device_adapters <= num_slots
            spans = []
            for held_key, (_, slot) in held.items():
                # Still in the slot its first acquire gave (the scheduler relies on that slot for every step).
                assert residency.is_ready(held_key) and slot_matches(model, slot, source.adapters[held_key])
                start, rank = slot_rows(model, slot)
                spans.append((start, start + rows_for(rank)))
            spans.sort()
            assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False))
        for held_key, (holds, _) in held.items():
            for _ in range(holds):
                residency.release(held_key)
