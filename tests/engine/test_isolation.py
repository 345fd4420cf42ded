"""Failures stay with the request that caused them. In one batch with good requests of two tenants: an adapter whose
device weights are NaN (whatever a bad upload or a bad slot write could leave there) and a request whose draw
raises each end alone with an error naming the cause, and every good request gets exactly the tokens it gets without
them. A step that raises once is retried transparently; one that raises twice fails its batch, and the engine
carries on. No KV block leaks either way."""

import json
import math
import os
import random

import pytest
import torch

from lora_server.demo import tasks
from lora_server.demo.paths import demo_adapter_dirs
from lora_server.engine import sampler
from lora_server.engine.engine import Completion
from lora_server.engine.request import EngineRequest
from lora_server.engine.sampler import SamplingParams
from tests.engine.engine_helpers import ADAPTER_FILES, open_demo_engine, put_adapter_dir
from tests.reference import one_torch_thread

POISONED = "poisoned"  # acme's adapter whose slot rows are overwritten with NaN once on the device
FAILING_SEED = 666  # the request whose third draw raises
MAX_NEW = 8  # tokens per request: enough to cross several steps, few enough to keep the tests fast


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with one_torch_thread():  # tiny tensors: more threads only spin on a busy runner
        yield from _engine(tmp_path_factory)


def _engine(tmp_path_factory):
    engine = open_demo_engine(tmp_path_factory.mktemp("store"), max_num_seqs=16, max_num_batched_tokens=128,
                              prefill_chunk_size=32)
    for name in tasks.ADAPTER_NAMES:  # a second tenant, with adapters of the same names as the first's
        put_adapter_dir(engine.store, name, demo_adapter_dirs()[name], tenant="acme")
    put_poisoned(engine)
    yield engine
    engine.close()
    engine.store.close()


def put_poisoned(engine) -> None:
    """Store a copy of `reverse` marked as poisoned (by its config), and whenever the writer puts it in a device
    slot, overwrite its rows in every layer with NaN: what reaches the forward is what a bad slot would hold."""
    files = {name: (demo_adapter_dirs()["reverse"] / name).read_bytes() for name in ADAPTER_FILES}
    config = json.loads(files["adapter_config.json"])
    files["adapter_config.json"] = json.dumps({**config, "base_model_name_or_path": POISONED}).encode()
    engine.store.put("acme", POISONED, files)

    writer = engine.residency.writer
    write = writer.write

    def poisoning_write(slot, row_start, adapter):
        write(slot, row_start, adapter)
        if adapter.config.get("base_model_name_or_path") == POISONED:
            for linear in engine.model.lora_linears():
                rank = max(linear.slot_ranks[slot])
                linear.lora_bt[row_start:row_start + rank] = math.nan

    writer.write = poisoning_write


def fresh_rng() -> tuple[random.Random, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return random.Random(seed), seed


def good_requests(tokenizer, rng: random.Random) -> list[EngineRequest]:
    """Greedy requests of two tenants over the base and every adapter, and one seeded sampled request. Eight
    adapters of ranks 4 to 16 decode in the same steps: enough for the torch backend's gathered path too."""
    routes = [(tenant, adapter) for adapter in (None, *tasks.ADAPTER_NAMES) for tenant in ("default", "acme")]
    texts = tasks.held_out_texts(len(routes), rng.randrange(1 << 30))
    requests = [EngineRequest(tokenizer.encode(tasks.make_prompt(text)), SamplingParams(max_new_tokens=MAX_NEW),
                              adapter_id=adapter, tenant=tenant, request_id=f"good-{i}")
                for i, (text, (tenant, adapter)) in enumerate(zip(texts, routes, strict=True))]
    sampled = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 62))
    requests.append(EngineRequest(tokenizer.encode(tasks.make_prompt(texts[0])), sampled, adapter_id="rot13",
                                  tenant="acme", request_id="good-sampled"))
    return requests


def outputs(completions: list[Completion]) -> dict[str, tuple[list[int], str | None]]:
    return {c.request_id: (c.token_ids, c.finish_reason) for c in completions}


def check_no_leak(engine) -> None:
    scheduler = engine.scheduler
    assert not engine.has_unfinished()
    assert scheduler.block_manager.num_used_blocks == 0
    scheduler.block_manager.check_invariants(scheduler.running + scheduler.waiting)


def test_a_poisoned_adapter_and_a_failing_draw_end_alone(engine, monkeypatch):
    rng, seed = fresh_rng()
    good = good_requests(engine.tokenizer, rng)
    alone = outputs(engine.generate(good))
    assert all(reason in ("stop", "length") for _, reason in alone.values()), (seed, alone)

    draws = {"n": 0}
    draw_uniform = sampler._draw_uniform

    def failing_third_draw(params, generator):
        if params.seed == FAILING_SEED:
            draws["n"] += 1
            if draws["n"] == 3:
                raise RuntimeError("injected sampling fault")
        return draw_uniform(params, generator)

    monkeypatch.setattr(sampler, "_draw_uniform", failing_third_draw)
    prompt = engine.tokenizer.encode(tasks.make_prompt("poison"))
    bad = [EngineRequest(prompt, SamplingParams(max_new_tokens=MAX_NEW), adapter_id=POISONED, tenant="acme",
                         request_id="bad-adapter"),
           EngineRequest(prompt, SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, seed=FAILING_SEED),
                         adapter_id="upper", request_id="bad-draw")]
    mixed = engine.generate(bad[:1] + good[:4] + bad[1:] + good[4:], arrivals=[i // 3 for i in range(13)])
    by_id = {c.request_id: c for c in mixed}

    assert {rid: out for rid, out in outputs(mixed).items() if rid.startswith("good")} == alone, seed
    poisoned = by_id["bad-adapter"]
    assert poisoned.finish_reason == "error" and poisoned.token_ids == [], poisoned
    assert "non-finite logits" in poisoned.error and "'poisoned'" in poisoned.error, poisoned.error
    failed_draw = by_id["bad-draw"]
    assert failed_draw.finish_reason == "error" and len(failed_draw.token_ids) == 2, failed_draw
    assert "injected sampling fault" in failed_draw.error, failed_draw.error
    check_no_leak(engine)


def poison_unowned_rows(engine) -> None:
    """NaN into every pool row no loaded adapter reads, slice by slice: rows past a slot's rank for that slice (its
    own padding, or a neighbour's rows), and rows of no slot. Whatever sits there must never reach anyone's output."""
    for linear in engine.model.lora_linears():
        num_slices, total_rows = linear.lora_a.shape[0], linear.lora_a.shape[1]
        for k in range(num_slices):
            owned = torch.zeros(total_rows, dtype=torch.bool)
            for start, ranks in zip(linear.slot_row_starts, linear.slot_ranks, strict=True):
                owned[start:start + ranks[k]] = True
            lo, hi = linear.slice_offsets[k], linear.slice_offsets[k + 1]
            linear.lora_a[k, ~owned] = math.nan
            linear.lora_bt[~owned, lo:hi] = math.nan


def test_pool_rows_no_adapter_owns_never_reach_an_output(engine):
    rng, seed = fresh_rng()
    good = good_requests(engine.tokenizer, rng)  # mixed ranks (4, 8, 16) in the same decode steps
    alone = outputs(engine.generate(good))  # every adapter is resident from here on
    poison_unowned_rows(engine)
    assert outputs(engine.generate(good)) == alone, seed
    check_no_leak(engine)


def test_a_step_that_raises_once_is_retried_and_changes_nothing(engine, monkeypatch):
    rng, seed = fresh_rng()
    good = good_requests(engine.tokenizer, rng)
    alone = outputs(engine.generate(good))
    retries, failures = engine.num_step_retries, engine.num_step_failures

    # Raise after the forward pass wrote the step's K/V, so the retry has to rewrite them.
    calls, compute_logits = {"n": 0}, engine.model.compute_logits

    def failing_once(hidden):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected transient fault")
        return compute_logits(hidden)

    monkeypatch.setattr(engine.model, "compute_logits", failing_once)
    again = outputs(engine.generate(good, arrivals=[i // 2 for i in range(len(good))]))
    assert again == alone, seed
    assert (engine.num_step_retries, engine.num_step_failures) == (retries + 1, failures)
    assert engine.stats().num_step_retries == retries + 1
    check_no_leak(engine)


def test_a_step_that_raises_twice_fails_its_batch_and_the_next_request_works(engine, monkeypatch):
    rng, seed = fresh_rng()
    good = good_requests(engine.tokenizer, rng)[:4]
    alone = outputs(engine.generate(good))
    failures = engine.num_step_failures

    calls, compute_logits = {"n": 0}, engine.model.compute_logits

    def failing_twice(hidden):
        calls["n"] += 1
        if calls["n"] in (2, 3):  # the second step and its retry
            raise RuntimeError("injected persistent fault")
        return compute_logits(hidden)

    monkeypatch.setattr(engine.model, "compute_logits", failing_twice)
    failed = engine.generate(good)
    assert all(c.finish_reason == "error" and "injected persistent fault" in c.error for c in failed), failed
    assert engine.num_step_failures == failures + 1
    check_no_leak(engine)
    assert outputs(engine.generate(good)) == alone, seed
    check_no_leak(engine)
