"""The engine end to end on CPU: continuous batching with arrivals spread over time gives every request exactly the
greedy tokens it gets alone, on the demo and on a random model with random PEFT adapters; preemption, cancellation,
deadlines, stop strings, logprobs, seeded sampling, hot-swap pinning and a failing step."""

import os
import random
import threading
import time

import pytest
import torch
import transformers
from peft import PeftModel

from lora_server.adapters_store import AdapterNotFound, load_peft_adapter
from lora_server.demo import tasks
from lora_server.demo.paths import DEMO_MODEL_DIR, demo_adapter_dirs
from lora_server.engine.request import EngineRequest, RequestError
from lora_server.engine.sampler import SamplingParams
from tests.engine.engine_helpers import (
    RANDOM_ADAPTERS,
    open_demo_engine,
    open_random_engine,
    put_adapter_dir,
    write_random_checkpoint,
)
from tests.engine.offline_reference import GenerationRequest, generate

KV_BYTES_PER_TOKEN_DEMO = 2 * 4 * 2 * 32 * 4  # K and V x layers x kv heads x head_dim x fp32


def fresh_rng() -> tuple[random.Random, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return random.Random(seed), seed


def check_invariants(engine) -> None:
    scheduler = engine.scheduler
    scheduler.block_manager.check_invariants(scheduler.running + scheduler.waiting)


def record_batches(engine) -> list[set]:
    """Wrap the runner so each step's set of adapters (None for base) is recorded."""
    seen, run = [], engine.runner.run

    def recording_run(batch, *args, **kwargs):
        seen.append({chunk.seq.adapter_id for chunk in batch.chunks})
        return run(batch, *args, **kwargs)

    engine.runner.run = recording_run
    return seen


def demo_requests(tokenizer, rng: random.Random, num: int, prefix: str = "") -> list[EngineRequest]:
    texts = tasks.held_out_texts(num, rng.randrange(1 << 30))
    return [EngineRequest(tokenizer.encode(tasks.make_prompt(text)),
                          SamplingParams(max_new_tokens=rng.randint(2, tasks.MAX_TEXT_CHARS + 2)),
                          adapter_id=rng.choice([None, *tasks.ADAPTER_NAMES]), request_id=f"{prefix}{i}")
            for i, text in enumerate(texts)]


def alone(engine, request: EngineRequest):
    return engine.generate([request])[0]


# ---------------------------------------------------------------------------- continuous batching == alone


def test_demo_continuous_batching_with_arrivals_equals_each_alone(demo_engine):
    rng, seed = fresh_rng()
    requests = demo_requests(demo_engine.tokenizer, rng, 30)
    arrivals = [rng.randrange(40) for _ in requests]
    batches = record_batches(demo_engine)
    together = demo_engine.generate(requests, arrivals, on_step=check_invariants)
    demo_engine.runner.run = type(demo_engine.runner).run.__get__(demo_engine.runner)
    assert max(len(adapters) for adapters in batches) >= 3, f"seed {seed}: batches never mixed adapters"
    for request, result in zip(requests, together, strict=True):
        reference = alone(demo_engine, request)
        assert result.token_ids == reference.token_ids, f"seed {seed}, request {request.request_id}"
        assert result.finish_reason == reference.finish_reason and result.text == reference.text
    assert demo_engine.scheduler.block_manager.num_used_blocks == 0


def test_demo_engine_transforms_as_trained(demo_engine):
    prompt = demo_engine.tokenizer.encode(tasks.make_prompt("hello world"))
    requests = [EngineRequest(prompt, SamplingParams(max_new_tokens=20), adapter_id=name, request_id=str(name))
                for name in (None, *tasks.ADAPTER_NAMES)]
    for request, result in zip(requests, demo_engine.generate(requests), strict=True):
        assert result.text == tasks.TRANSFORMS[request.adapter_id or "copy"]("hello world")
        assert result.finish_reason == "stop" and result.token_ids[-1] in demo_engine.tokenizer.eos_token_ids


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("random")).parent


def test_random_model_continuous_batching_equals_alone_and_the_reference_loop(random_checkpoint, tmp_path):
    engine = open_random_engine(random_checkpoint, tmp_path / "store", max_num_seqs=8, max_num_batched_tokens=48,
                                prefill_chunk_size=16)
    try:
        rng, seed = fresh_rng()
        requests = [EngineRequest([rng.randrange(3, 97) for _ in range(rng.randint(1, 40))],
                                  SamplingParams(max_new_tokens=rng.randint(1, 24)),
                                  adapter_id=rng.choice([None, *RANDOM_ADAPTERS]), request_id=str(i))
                    for i in range(20)]
        arrivals = [rng.randrange(30) for _ in requests]
        together = engine.generate(requests, arrivals, on_step=check_invariants)
        for request, result in zip(requests, together, strict=True):
            assert result.token_ids == alone(engine, request).token_ids, f"seed {seed}, request {request.request_id}"

        # The contiguous-cache loop (no paging, no scheduler) is an independent reference for the same math.
        adapters = {name: load_peft_adapter(random_checkpoint / name, engine.base) for name in RANDOM_ADAPTERS}
        offline = generate(engine.model, [GenerationRequest(r.prompt_token_ids, r.adapter_id, r.sampling)
                                          for r in requests], adapters, engine.tokenizer.eos_token_ids)
        assert [r.token_ids for r in together] == [o.token_ids for o in offline], f"seed {seed}"
    finally:
        engine.close()
        engine.store.close()


# ---------------------------------------------------------------------------- preemption


def test_forced_preemption_gives_identical_outputs(tmp_path):
    # 12 blocks of 16 tokens for 12 requests of up to ~50 tokens each: decodes must preempt.
    engine = open_demo_engine(tmp_path / "store", max_num_seqs=12, kv_cache_bytes=12 * 16 * KV_BYTES_PER_TOKEN_DEMO)
    try:
        rng, seed = fresh_rng()
        requests = demo_requests(engine.tokenizer, rng, 12)
        requests = [EngineRequest(r.prompt_token_ids, SamplingParams(max_new_tokens=tasks.MAX_TEXT_CHARS + 2),
                                  adapter_id=r.adapter_id, request_id=r.request_id) for r in requests]
        # A seeded sampled request too: its stream must survive being preempted and recomputed.
        requests.append(EngineRequest(requests[0].prompt_token_ids, SamplingParams(max_new_tokens=30, temperature=1.0,
                                                                                   seed=seed), request_id="sampled"))
        preemptions: dict[int, int] = {}

        def observe(engine):
            check_invariants(engine)
            for seq in engine.scheduler.running + engine.scheduler.waiting:
                preemptions[seq.seq_id] = seq.num_preemptions

        together = engine.generate(requests, on_step=observe)
        assert engine.stats().num_preemptions > 0, "the cache was meant to be too small"
        assert sum(preemptions.values()) == engine.stats().num_preemptions
        for request, result in zip(requests, together, strict=True):
            assert result.token_ids == alone(engine, request).token_ids, f"seed {seed}, request {request.request_id}"
        assert engine.scheduler.block_manager.num_used_blocks == 0
    finally:
        engine.close()
        engine.store.close()


# ---------------------------------------------------------------------------- ending early


def test_abort_frees_blocks_at_once_and_ends_with_abort(demo_engine):
    tokenizer = demo_engine.tokenizer
    rng, _ = fresh_rng()
    requests = demo_requests(tokenizer, rng, 6, prefix="abort-")
    for request in requests:
        demo_engine.add_request(request)
    for _ in range(3):
        demo_engine.step()
    used_before = demo_engine.scheduler.block_manager.num_used_blocks
    victim = next(s for s in demo_engine.scheduler.running if s.block_table)
    victim_id = next(r for r, st in demo_engine._requests.items() if st.seq is victim)
    victim_blocks = len(victim.block_table)
    assert demo_engine.abort(victim_id)
    assert demo_engine.scheduler.block_manager.num_used_blocks == used_before - victim_blocks, "freed at once"
    deltas = demo_engine.step()
    final = [d for d in deltas if d.request_id == victim_id]
    assert final and final[0].finish_reason == "abort"
    for request in requests:
        demo_engine.abort(request.request_id)
    while demo_engine.has_unfinished():
        demo_engine.step()
    assert demo_engine.scheduler.block_manager.num_used_blocks == 0
    assert not demo_engine.abort(victim_id), "a finished request cannot be aborted again"


def test_deadline_times_out_waiting_and_running_requests(demo_engine):
    prompt = demo_engine.tokenizer.encode(tasks.make_prompt("deadline"))
    expired = EngineRequest(prompt, deadline=time.monotonic() - 1, request_id="expired")
    soon = EngineRequest(prompt, SamplingParams(max_new_tokens=500), deadline=time.monotonic() + 0.25,
                         request_id="soon")
    results = demo_engine.generate([expired, soon], on_step=lambda e: time.sleep(0.1))  # EOS needs 9 steps
    assert results[0].finish_reason == "timeout" and results[0].token_ids == []
    assert results[1].finish_reason == "timeout" and 0 < len(results[1].token_ids) < 9
    assert demo_engine.scheduler.block_manager.num_used_blocks == 0


# ---------------------------------------------------------------------------- text and logprobs


def test_stop_strings_cut_the_text_and_stream_nothing_of_them(demo_engine):
    prompt = demo_engine.tokenizer.encode(tasks.make_prompt("hello world"))
    request = EngineRequest(prompt, SamplingParams(max_new_tokens=20), stop=("zzz", "o w"), request_id="stop")
    deltas = []
    demo_engine.add_request(request)
    while demo_engine.has_unfinished():
        deltas += demo_engine.step()
    text = "".join(d.text for d in deltas)
    assert text == "hell" and deltas[-1].finish_reason == "stop"
    assert all("o w" not in d.text for d in deltas) and len([d for d in deltas if d.text]) > 1, "it streamed"
    upper = EngineRequest(prompt, SamplingParams(max_new_tokens=20), adapter_id="upper", stop=("WOR",),
                          request_id="stop-upper")
    assert demo_engine.generate([upper])[0].text == "HELLO "


def test_logprobs_match_transformers_and_peft(demo_engine):
    prompt = demo_engine.tokenizer.encode(tasks.make_prompt("log probs"))
    request = EngineRequest(prompt, SamplingParams(max_new_tokens=12), adapter_id="upper", logprobs=3,
                            request_id="logprobs")
    result = demo_engine.generate([request])[0]
    assert len(result.logprobs) == len(result.token_ids)
    hf = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR),
                                   demo_adapter_dirs()["upper"]).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + result.token_ids])).logits[0].float()
    expected = torch.log_softmax(logits[len(prompt) - 1: -1], dim=-1)  # the distribution each token was drawn from
    for i, (token, lp) in enumerate(zip(result.token_ids, result.logprobs, strict=True)):
        assert lp.token_id == token and abs(lp.logprob - expected[i, token].item()) < 1e-4
        assert len(lp.top) == 3 and lp.top[0][0] == token, "greedy picks the most likely token"
        top_ids = expected[i].topk(3).indices.tolist()
        assert [t for t, _ in lp.top] == top_ids


# ---------------------------------------------------------------------------- sampling


def test_seeded_sampling_does_not_depend_on_the_batch(demo_engine):
    rng, seed = fresh_rng()
    prompt = demo_engine.tokenizer.encode(tasks.make_prompt("seeded"))
    seeded = EngineRequest(prompt, SamplingParams(max_new_tokens=16, temperature=1.3, top_p=0.95, top_k=20,
                                                  seed=seed), adapter_id="rot13", request_id="seeded")
    first = alone(demo_engine, seeded).token_ids
    crowd = demo_requests(demo_engine.tokenizer, rng, 10, prefix="crowd-")
    crowd += [EngineRequest(prompt, SamplingParams(max_new_tokens=16, temperature=1.0), request_id=f"unseeded-{i}")
              for i in range(3)]
    results = demo_engine.generate([*crowd, seeded], arrivals=[0] * len(crowd) + [3])
    assert results[-1].token_ids == first, f"seed {seed}"


# ---------------------------------------------------------------------------- adapters


def test_unknown_or_foreign_adapter_is_refused_at_once(demo_engine):
    prompt = demo_engine.tokenizer.encode("abc")
    with pytest.raises(AdapterNotFound):
        demo_engine.add_request(EngineRequest(prompt, adapter_id="nope"))
    with pytest.raises(AdapterNotFound):
        demo_engine.add_request(EngineRequest(prompt, adapter_id="upper", tenant="someone-else"))
    assert not demo_engine.has_unfinished()


@pytest.mark.parametrize("request_kwargs, message", [
    (dict(prompt_token_ids=[]), "empty"),
    (dict(prompt_token_ids=[5] * 128), "at most 127"),
    (dict(prompt_token_ids=[1, 10_000]), "token ids"),
    (dict(prompt_token_ids=[1], logprobs=99), "logprobs"),
    (dict(prompt_token_ids=[1], stop=("x" * 300,)), "stop strings"),
])
def test_bad_requests_are_refused_with_a_reason(demo_engine, request_kwargs, message):
    with pytest.raises(RequestError, match=message):
        demo_engine.add_request(EngineRequest(**request_kwargs))


def test_hot_swap_pins_running_requests_to_their_version(demo_engine):
    store, tokenizer = demo_engine.store, demo_engine.tokenizer
    put_adapter_dir(store, "swap", demo_adapter_dirs()["upper"])
    prompt = tokenizer.encode(tasks.make_prompt("hot swap"))
    first = EngineRequest(prompt, SamplingParams(max_new_tokens=20), adapter_id="swap", request_id="v1")
    demo_engine.add_request(first)
    deltas = demo_engine.step() + demo_engine.step()
    put_adapter_dir(store, "swap", demo_adapter_dirs()["reverse"])  # a new version while v1 runs
    second = EngineRequest(prompt, SamplingParams(max_new_tokens=20), adapter_id="swap", request_id="v2")
    demo_engine.add_request(second)
    while demo_engine.has_unfinished():
        deltas += demo_engine.step()
    text = {rid: "".join(d.text for d in deltas if d.request_id == rid) for rid in ("v1", "v2")}
    assert text == {"v1": "HOT SWAP", "v2": "paws toh"}
    versions = {d.request_id: d.adapter_version for d in deltas}
    assert versions["v2"] == versions["v1"] + 1


def test_a_failing_step_fails_its_requests_and_the_engine_carries_on(demo_engine, monkeypatch):
    prompt = demo_engine.tokenizer.encode(tasks.make_prompt("fail"))
    runner = demo_engine.runner
    original = runner.run
    calls = {"n": 0}

    def failing_twice(batch, *args, **kwargs):  # the engine retries a failed step once
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("injected device error")
        return original(batch, *args, **kwargs)

    monkeypatch.setattr(runner, "run", failing_twice)
    failed = demo_engine.generate([EngineRequest(prompt, request_id="doomed")])[0]
    assert failed.finish_reason == "error" and "injected device error" in failed.error
    ok = demo_engine.generate([EngineRequest(prompt, SamplingParams(max_new_tokens=10), request_id="ok")])[0]
    assert ok.text == "fail" and ok.finish_reason == "stop"
    assert demo_engine.scheduler.block_manager.num_used_blocks == 0


def test_an_adapter_deleted_after_pinning_ends_its_request_as_not_found(demo_engine):
    store = demo_engine.store
    put_adapter_dir(store, "short-lived", demo_adapter_dirs()["upper"])
    prompt = demo_engine.tokenizer.encode(tasks.make_prompt("gone"))
    request = EngineRequest(prompt, adapter_id="short-lived", request_id="gone")
    demo_engine.add_request(request)  # pinned to version 1, not loaded yet
    store.delete("default", "short-lived")
    deltas = []
    while demo_engine.has_unfinished():
        deltas += demo_engine.step()
    assert deltas[-1].finish_reason == "error" and deltas[-1].token_ids == []
    assert deltas[-1].error_type == "adapter_not_found", deltas[-1].error


# ---------------------------------------------------------------------------- where requests enter, and what they carry


def test_steps_go_on_while_an_upload_holds_the_registry(tmp_path):
    """A request's adapter facts are read once, when it is submitted: with the registry locked as an upload's fsynced
    commit locks it, steps keep running for requests already submitted. Only the cold adapter's load (on the loader
    thread) waits for the store, and with it only its own request."""
    engine = open_demo_engine(tmp_path / "store", max_num_seqs=8)
    try:
        tokenizer = engine.tokenizer
        words = ("locked one", "locked two", "locked six")
        base = [EngineRequest(tokenizer.encode(tasks.make_prompt(text)), SamplingParams(max_new_tokens=20),
                              request_id=text) for text in words]
        cold = EngineRequest(tokenizer.encode(tasks.make_prompt("cold start")), SamplingParams(max_new_tokens=20),
                             adapter_id="upper", request_id="cold")  # not loaded yet: admission must place it
        for request in [*base, cold]:
            engine.add_request(request)  # submitted (pinned) before the lock; no step has run yet
        finished: dict[str, str] = {}
        texts: dict[str, str] = {}
        base_done = threading.Event()

        def step_loop() -> None:
            while engine.has_unfinished():
                deltas = engine.step()
                for delta in deltas:
                    texts[delta.request_id] = texts.get(delta.request_id, "") + delta.text
                    if delta.is_finished:
                        finished[delta.request_id] = delta.finish_reason
                if all(r.request_id in finished for r in base):
                    base_done.set()
                if not deltas:
                    time.sleep(0.001)  # only a load in flight: let the loader thread run

        loop = threading.Thread(target=step_loop, name="test-step-loop")
        with engine.store._registry._transaction():  # the lock an upload's commit holds, and its SQLite write lock
            loop.start()
            ran_while_locked = base_done.wait(timeout=60)  # a failsafe: unlocked, these finish in well under a second
            cold_waited = "cold" not in finished
        loop.join(timeout=60)
        assert ran_while_locked, "a step waited for the registry"
        assert cold_waited, "the cold adapter was loaded without reading the store"
        assert finished == {**{r.request_id: "stop" for r in base}, "cold": "stop"}
        assert texts == {**{text: text for text in words}, "cold": "COLD START"}
    finally:
        engine.close()
        engine.store.close()


def test_a_requests_sampling_state_lives_on_its_sequence(demo_engine):
    prompt = demo_engine.tokenizer.encode(tasks.make_prompt("state"))
    seeded = EngineRequest(prompt, SamplingParams(max_new_tokens=4, temperature=1.0, seed=3), logprobs=2,
                           request_id="seeded-state")
    greedy = EngineRequest(prompt, SamplingParams(max_new_tokens=4), request_id="greedy-state")
    demo_engine.add_request(seeded)
    demo_engine.add_request(greedy)
    seqs = {request_id: state.seq for request_id, state in demo_engine._requests.items()}
    assert isinstance(seqs["seeded-state"].generator, torch.Generator) and seqs["seeded-state"].num_logprobs == 2
    assert seqs["greedy-state"].generator is None and seqs["greedy-state"].num_logprobs is None
    while demo_engine.has_unfinished():
        demo_engine.step()


def test_an_over_long_prompt_is_refused_where_requests_enter_naming_its_field(demo_engine):
    with pytest.raises(RequestError, match="at most 128 tokens") as raised:
        demo_engine.prepare(EngineRequest([5] * 128))
    assert (raised.value.field, raised.value.code) == ("prompt", "context_length_exceeded")
    assert not demo_engine.has_unfinished()


def test_stats_count_running_and_waiting_requests_per_adapter(demo_engine):
    """EngineStats.queue_by_adapter: (running, waiting) per (tenant, adapter), None for the base model."""
    prompt = demo_engine.tokenizer.encode(tasks.make_prompt("queue"))
    adapters = [None, "upper", "upper", "rot13", None, None]
    for i, adapter in enumerate(adapters):
        demo_engine.add_request(EngineRequest(prompt, SamplingParams(max_new_tokens=4), adapter_id=adapter,
                                              request_id=f"queued-{i}"))
    assert demo_engine.stats().queue_by_adapter == {None: (0, 3), ("default", "upper"): (0, 2),
                                                    ("default", "rot13"): (0, 1)}
    demo_engine.step()  # admits all six (16 places)
    counted = demo_engine.stats().queue_by_adapter
    assert {key: running + waiting for key, (running, waiting) in counted.items()} == {
        None: 3, ("default", "upper"): 2, ("default", "rot13"): 1} and sum(r for r, _ in counted.values()) == 6
    while demo_engine.has_unfinished():
        demo_engine.step()
    assert demo_engine.stats().queue_by_adapter == {}
