"""Merged mode in the engine: the same greedy tokens merged and unmerged for the merged adapter, other adapters and
base-only requests in one batch, a switch in the middle of generation changes no one's output, the auto policy merges
a dominant adapter and unmerges on a uniform mix, and the base weights come back bit for bit."""

import asyncio
import random

import pytest
import torch

from lora_server.demo import tasks
from lora_server.engine.adapters.keys import AdapterKey
from lora_server.engine.async_engine import AsyncEngine
from lora_server.engine.merging.control import MergeRefused
from lora_server.engine.request import EngineRequest
from lora_server.engine.sampler import SamplingParams
from tests.engine.engine_helpers import RANDOM_ADAPTERS, open_demo_engine, open_random_engine, write_random_checkpoint


def mixed_requests(tokenizer, rng: random.Random, num: int, names: list, prefix: str) -> list[EngineRequest]:
    texts = tasks.held_out_texts(num, rng.randrange(1 << 30))
    return [EngineRequest(tokenizer.encode(tasks.make_prompt(text)), SamplingParams(max_new_tokens=26),
                          adapter_id=names[i % len(names)], request_id=f"{prefix}{i}") for i, text in enumerate(texts)]


def base_weights(engine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.model.named_parameters() if ".base." in name}


@pytest.fixture
def demo_engine(tmp_path):
    engine = open_demo_engine(tmp_path / "store", max_num_seqs=16, merge_policy="manual")
    yield engine
    engine.close()
    engine.store.close()


def test_merged_mode_gives_every_request_the_same_tokens(demo_engine, rng):
    before = base_weights(demo_engine)
    requests = mixed_requests(demo_engine.tokenizer, rng, 20, [None, *tasks.ADAPTER_NAMES], "r")
    unmerged = demo_engine.generate(requests)
    demo_engine.merge_and_wait("upper")
    assert demo_engine.merge.merged_key.adapter_id == "upper"
    assert any(not torch.equal(before[n], p) for n, p in base_weights(demo_engine).items()), "nothing was merged"
    merged = demo_engine.generate(requests)
    for request, a, b in zip(requests, unmerged, merged, strict=True):
        assert a.token_ids == b.token_ids, f"{request.adapter_id}: {a.text!r} unmerged, {b.text!r} merged"
    demo_engine.merge.request_unmerge("default", "upper")
    after = base_weights(demo_engine)
    assert all(torch.equal(before[n], after[n]) for n in before), "unmerge must restore every base weight exactly"
    stats = demo_engine.stats().merge
    assert stats.num_switches == 2 and stats.merged is None and stats.seconds_merged > 0


def test_switching_mid_generation_changes_no_output(demo_engine, rng):
    requests = mixed_requests(demo_engine.tokenizer, rng, 12, [None, "upper", "rot13", "upper"], "m")
    reference = demo_engine.generate(requests)
    key = demo_engine.adapter_catalog.pin("default", "upper").key

    steps = iter(range(1000))

    def switch_midway(engine):
        step = next(steps)
        if step == 5:
            engine.merge.request_merge(key)
        elif step == 14:
            engine.merge.request_unmerge("default", "upper")

    switched = demo_engine.generate(requests, on_step=switch_midway)
    assert [r.token_ids for r in switched] == [r.token_ids for r in reference]
    assert demo_engine.stats().merge.num_switches == 2


def test_random_adapters_merged_equal_unmerged(tmp_path, rng):
    root = write_random_checkpoint(tmp_path / "ckpt").parent
    engine = open_random_engine(root, tmp_path / "store", max_num_seqs=8, merge_policy="manual")
    try:
        names = [None, *RANDOM_ADAPTERS]
        requests = [EngineRequest([rng.randrange(3, 97) for _ in range(rng.randint(2, 30))],
                                  SamplingParams(max_new_tokens=12), adapter_id=names[i % len(names)],
                                  request_id=str(i)) for i in range(15)]
        unmerged = engine.generate(requests)
        for merged_name in ("r2-rslora", "r16-patterned"):
            engine.merge_and_wait(merged_name)
            merged = engine.generate(requests)
            assert [r.token_ids for r in merged] == [r.token_ids for r in unmerged], f"merged {merged_name}"
    finally:
        engine.close()
        engine.store.close()


def test_auto_policy_merges_a_dominant_adapter_then_unmerges_on_a_uniform_mix(tmp_path, rng):
    engine = open_demo_engine(tmp_path / "store", max_num_seqs=16, merge_policy="auto", merge_window_steps=8,
                              merge_min_steps_between_switches=8, merge_share=0.85, unmerge_share=0.5)
    reference = open_demo_engine(tmp_path / "reference-store", max_num_seqs=16, merge_policy="off")
    try:
        skewed = mixed_requests(engine.tokenizer, rng, 40, ["upper"] * 19 + ["rot13"], "s")
        uniform = mixed_requests(engine.tokenizer, rng, 40, [None, *tasks.ADAPTER_NAMES], "u")
        merged_steps = []
        skewed_results = engine.generate(skewed, on_step=lambda e: merged_steps.append(e.merge.merged_key))
        assert any(k is not None and k.adapter_id == "upper" for k in merged_steps), "the skew never merged upper"
        uniform_steps = []
        uniform_results = engine.generate(uniform, on_step=lambda e: uniform_steps.append(e.merge.merged_key))
        unmerged_at = next((i for i, k in enumerate(uniform_steps) if k is None), None)
        assert unmerged_at is not None, "a uniform mix never unmerged upper"
        # As the last requests of a phase drain, one adapter may hold the whole window and get merged (that is the
        # policy), so each phase may end with one more merge and unmerge; anything beyond is thrashing.
        switches = engine.stats().merge.num_switches
        assert 2 <= switches <= 6, f"{switches} switches: thrashing"
        # Every output is what an engine that never merges gives.
        assert all(r.finish_reason != "error" for r in skewed_results + uniform_results), \
            [r.error for r in skewed_results + uniform_results if r.error]
        assert [r.token_ids for r in skewed_results] == [r.token_ids for r in reference.generate(skewed)]
        assert [r.token_ids for r in uniform_results] == [r.token_ids for r in reference.generate(uniform)]
    finally:
        for e in (engine, reference):
            e.close()
            e.store.close()


def test_manual_merge_is_refused_when_the_policy_is_off(tmp_path):
    engine = open_demo_engine(tmp_path / "store", merge_policy="off")
    try:
        key = AdapterKey("default", "upper", 1)
        with pytest.raises(MergeRefused, match="manual"):
            engine.merge.request_merge(key).result()
        with pytest.raises(MergeRefused, match="manual"):
            engine.merge.request_unmerge("default", "upper")
    finally:
        engine.close()
        engine.store.close()


def test_async_merge_requests_go_through_the_step_loop(demo_engine):
    async def main():
        engine = AsyncEngine(demo_engine)
        engine.start()
        try:
            await asyncio.wrap_future(engine.request_merge("default", "title"))
            assert demo_engine.merge.merged_key.adapter_id == "title"
            stream = engine.submit(EngineRequest(demo_engine.tokenizer.encode(tasks.make_prompt("merged mode")),
                                                 SamplingParams(max_new_tokens=20), adapter_id="title"))
            assert "".join([d.text async for d in stream]) == "Merged Mode"
            with pytest.raises(MergeRefused, match="not merged"):
                await asyncio.wrap_future(engine.request_unmerge("default", "upper"))
            await asyncio.wrap_future(engine.request_unmerge("default", "title"))
            assert demo_engine.merge.merged_key is None
        finally:
            engine.shutdown()

    asyncio.run(main())
