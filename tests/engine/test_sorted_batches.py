"""Adapter-sorted steps: the runner orders each step's chunks by adapter slot, so every adapter's tokens are one run
of the batch; the LoRA batch of a step is built once, whatever the number of layers; and the order changes nothing.

- Model level: the same sequences fed sorted by slot or interleaved give the same hidden states (fp32 tolerance),
  with base-only, one-token and long prompts and heterogeneous ranks (rank_pattern, partial targets).
- Engine level: with requests of every adapter arriving mid-run (prefill chunks and decodes mixed), every step's LoRA
  batch has exactly one run per adapter present, one build per step (two while merged: own terms and compensation),
  and greedy outputs equal each request run alone.
"""

import random

import pytest
import torch

from lora_server.engine.adapters.keys import AdapterKey
from lora_server.engine.adapters.residency import Residency, ResidencyConfig
from lora_server.engine.request import EngineRequest
from lora_server.engine.sampler import SamplingParams
from lora_server.kernels import lora_batch
from lora_server.kernels.lora_batch import NO_SLOT, LoraBatch
from lora_server.model.attention import ContiguousKVCache, SequenceChunk
from tests.engine.engine_helpers import RANDOM_ADAPTERS, open_random_engine, write_random_checkpoint
from tests.engine.residency_helpers import TINY, FakeSource, page_budget, random_adapter, tiny_model


def prefill_by_sequence(model, prompts: list[list[int]], slots: list[int], order: list[int]) -> list[torch.Tensor]:
    """Hidden states of each prompt [len, hidden], from one flat prefill that feeds the prompts in `order`."""
    cache = ContiguousKVCache(TINY.num_layers, len(prompts), 32, TINY.num_kv_heads, TINY.head_dim, torch.float32,
                              "cpu")
    chunks, ids, positions, token_slots, starts = [], [], [], [], {}
    for row in order:
        starts[row] = len(ids)
        chunks.append(SequenceChunk(cache_row=row, token_start=len(ids), num_tokens=len(prompts[row]),
                                    start_position=0))
        ids += prompts[row]
        positions += range(len(prompts[row]))
        token_slots += [slots[row]] * len(prompts[row])
    cache.set_batch(tuple(chunks))
    hidden = model(torch.tensor(ids), torch.tensor(positions), cache, LoraBatch.build(token_slots))
    return [hidden[starts[row] : starts[row] + len(prompts[row])] for row in range(len(prompts))]


def test_sorted_and_interleaved_orders_give_the_same_hidden_states(rng):
    model = tiny_model()
    adapters = {AdapterKey("t", "r4", 1): random_adapter(4, seed=1),
                AdapterKey("t", "r16", 1): random_adapter(16, seed=2),
                AdapterKey("t", "mixed", 1): random_adapter(8, seed=3, module_ranks={"q_proj": 4, "down_proj": 16})}
    config = ResidencyConfig(device_budget_bytes=page_budget(model, 8), host_budget_bytes=0, num_slots=4)
    with Residency(model, FakeSource(adapters), config) as residency:
        slot_of = {key: residency.acquire(key).result(timeout=10) for key in adapters}
        choices = [NO_SLOT, *slot_of.values()]
        slots = [rng.choice(choices) for _ in range(12)]
        prompts = [[rng.randrange(TINY.vocab_size) for _ in range(rng.choice((1, 1, 2, 5, 17)))] for _ in slots]
        by_slot = sorted(range(len(slots)), key=lambda row: slots[row])
        interleaved = list(range(len(slots)))
        rng.shuffle(interleaved)
        sorted_hidden = prefill_by_sequence(model, prompts, slots, by_slot)
        interleaved_hidden = prefill_by_sequence(model, prompts, slots, interleaved)
        for row, (a, b) in enumerate(zip(sorted_hidden, interleaved_hidden, strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"sequence {row} (slot {slots[row]})")
        assert len(LoraBatch.build([slots[row] for row in by_slot]).segments) == len(set(slots) - {NO_SLOT})
        for key in adapters:
            residency.release(key)


@pytest.fixture(scope="module")
def random_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("sorted")
    write_random_checkpoint(root)
    engine = open_random_engine(root, root / "store", max_num_seqs=12, max_num_batched_tokens=48,
                                merge_policy="manual")
    yield engine
    engine.close()
    engine.store.close()


class BuildSpy:
    """Counts LoraBatch.build calls and checks each is one run per slot present (the step was sorted), and that none
    is built for tokens of no adapter at all (a base-only step runs without LoRA)."""

    def __init__(self, monkeypatch) -> None:
        self.num_builds, self.unsorted, self.num_empty = 0, [], 0
        original = lora_batch.LoraBatch.build.__func__

        def build(cls, token_slots, device="cpu"):
            batch = original(cls, token_slots, device)
            self.num_builds += 1
            self.num_empty += not batch.segments
            if len(batch.segments) != len(set(token_slots) - {NO_SLOT}):
                self.unsorted.append(list(token_slots))
            return batch

        monkeypatch.setattr(lora_batch.LoraBatch, "build", classmethod(build))


def mixed_requests(rng: random.Random, count: int) -> list[EngineRequest]:
    names = [None, *RANDOM_ADAPTERS]
    return [EngineRequest([rng.randrange(3, 97) for _ in range(rng.choice((1, 3, 20, 40)))],
                          SamplingParams(max_new_tokens=rng.randint(1, 10)), adapter_id=names[i % len(names)],
                          request_id=f"s{i}") for i in range(count)]


def test_every_step_is_sorted_built_once_and_equal_to_each_alone(random_engine, rng, monkeypatch):
    requests = mixed_requests(rng, 20)
    alone = [random_engine.generate([r])[0] for r in requests]
    spy = BuildSpy(monkeypatch)
    steps_before = random_engine.num_steps
    together = random_engine.generate(requests, arrivals=[rng.randrange(12) for _ in requests])
    num_forward_steps = random_engine.num_steps - steps_before
    assert spy.unsorted == [], f"steps whose adapters were not one run each: {spy.unsorted[:3]}"
    assert spy.num_empty == 0, "a LoRA batch built for a step of base-only tokens"
    assert 0 < spy.num_builds <= num_forward_steps, "at most one LoRA batch per step, whatever the number of layers"
    for request, a, b in zip(requests, alone, together, strict=True):
        assert b.token_ids == a.token_ids, f"{request.request_id} ({request.adapter_id})"


def test_merged_steps_build_two_batches_and_change_no_output(random_engine, rng, monkeypatch):
    requests = mixed_requests(rng, 12)
    unmerged = random_engine.generate(requests)
    random_engine.merge_and_wait("r8")
    try:
        spy = BuildSpy(monkeypatch)
        steps_before = random_engine.num_steps
        merged = random_engine.generate(requests)
        num_steps = random_engine.num_steps - steps_before
        # Own terms + compensation per step; a step whose tokens are all the merged adapter's needs neither.
        assert spy.num_empty == 0 and num_steps < spy.num_builds <= 2 * num_steps, (spy.num_builds, num_steps)
        assert [r.token_ids for r in merged] == [r.token_ids for r in unmerged]
    finally:
        random_engine.merge.request_unmerge("default", "r8")
        random_engine.step()
