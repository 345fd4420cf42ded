"""The engine with decode graphs: every pure-decode step that fits a bucket goes through DecodeGraphs (uncaptured on
CPU: the same step function a CUDA graph captures), and every request gets the tokens it gets without them, mixed
adapters and base-only rows in one batch, and while an adapter is merged (two LoRA batches per step)."""

import random

import pytest

from lora_server.demo import tasks
from lora_server.model.cuda_graphs import DecodeGraphs
from tests.engine.engine_helpers import open_demo_engine
from tests.engine.test_engine_merge import mixed_requests


@pytest.fixture
def engine(tmp_path):
    engine = open_demo_engine(tmp_path / "store", max_num_seqs=16, merge_policy="manual", cuda_graphs="off")
    yield engine
    engine.close()
    engine.store.close()


def install_graphs(engine) -> list[int]:
    """Uncaptured decode graphs in the engine's runner; returns the list of LoRA-batch counts of the steps they ran."""
    runner = engine.runner
    graphs = DecodeGraphs(engine.model, runner.kv_cache, 16, -(-engine.max_model_len // runner.kv_cache.block_size),
                          64, capture=False, num_lora_batches=(0, 1, 2))
    used: list[int] = []
    run = graphs.run
    graphs.run = lambda ids, chunks, slot_lists: used.append(len(slot_lists)) or run(ids, chunks, slot_lists)
    runner.decode_graphs = graphs
    return used


def test_decode_graph_steps_give_every_request_its_own_tokens(engine):
    rng = random.Random(11)
    requests = mixed_requests(engine.tokenizer, rng, 20, [None, *tasks.ADAPTER_NAMES], "g")
    plain = engine.generate(requests)
    used = install_graphs(engine)
    with_graphs = engine.generate(requests)
    for request, a, b in zip(requests, plain, with_graphs, strict=True):
        assert a.token_ids == b.token_ids, f"{request.adapter_id}: {a.text!r} plain, {b.text!r} through graphs"
    assert used.count(1) >= 10, used  # 20 requests of 26 tokens in batches of 16: most steps are decodes

    engine.merge_and_wait("upper")
    used.clear()
    merged = engine.generate(requests)
    assert [r.token_ids for r in merged] == [r.token_ids for r in plain]
    assert used.count(2) >= 10, used  # own terms and the merged adapter's compensation


def test_base_only_decode_steps_run_without_lora_launches(engine):
    requests = mixed_requests(engine.tokenizer, random.Random(12), 4, [None], "b")
    plain = engine.generate(requests)
    used = install_graphs(engine)
    assert [r.token_ids for r in engine.generate(requests)] == [r.token_ids for r in plain]
    assert used and set(used) == {0}, used
