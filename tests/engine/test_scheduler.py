"""The scheduler against a fake residency and a fake model whose KV cache holds token ids.

The fake model writes each fed token into its cache entry and samples from the context it reads back through the
block table, so a wrong block table, a shared block or a bad recompute after preemption changes the output. The
oracle is a plain loop over the same sampling function, one request alone.
"""

from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_server.engine.adapters.keys import AdapterKey, PinnedAdapter
from lora_server.engine.scheduling.batch import ScheduledBatch
from lora_server.engine.scheduling.block_manager import BlockManager
from lora_server.engine.scheduling.scheduler import Scheduler, SchedulerConfig
from lora_server.engine.scheduling.sequence import Sequence, SequenceStatus

VOCAB = 50

# ---------------------------------------------------------------- fakes


def next_token(seq_id: int, context: list[int]) -> int:
    h = seq_id * 1_000_003 + 7
    for token in context:
        h = (h * 31 + token + 1) % (2**61 - 1)
    return h % VOCAB


def reference(seq: Sequence, max_model_len: int) -> tuple[list[int], str]:
    """What `seq` generates alone: its output tokens and finish reason."""
    tokens, out = list(seq.prompt_token_ids), []
    while True:
        token = next_token(seq.seq_id, tokens)
        out.append(token)
        tokens.append(token)
        if token in seq.eos_token_ids:
            return out, "stop"
        if len(out) >= seq.max_new_tokens or len(tokens) >= max_model_len:
            return out, "length"


def assert_matches_reference(seq: Sequence, max_model_len: int) -> None:
    """A finished sequence generated what it would alone: all of it when it ran to its end, a prefix otherwise."""
    expected, reason = reference(seq, max_model_len)
    if seq.finish_reason in ("stop", "length"):
        assert (seq.output_token_ids, seq.finish_reason) == (expected, reason)
    else:
        assert seq.output_token_ids == expected[:len(seq.output_token_ids)]


class FakeModel:
    def __init__(self, blocks: BlockManager) -> None:
        self.blocks = blocks
        self.cache: list[tuple[int, int, int] | None] = [None] * (blocks.num_blocks * blocks.block_size)

    def run(self, batch: ScheduledBatch) -> dict[int, int]:
        for chunk in batch.chunks:  # write every new token's K/V (here: the token) first, as a layer does
            start = chunk.start_position
            for position, index, token in zip(range(start, start + chunk.num_tokens),
                                              self.blocks.cache_indices(chunk.seq, start, start + chunk.num_tokens),
                                              chunk.token_ids, strict=True):
                self.cache[index] = (chunk.seq.seq_id, position, token)
        sampled = {}
        for chunk in batch.chunks:
            if chunk.is_sampled:
                seq, end = chunk.seq, chunk.start_position + chunk.num_tokens
                context = [self.cache[index] for index in self.blocks.cache_indices(seq, 0, end)]
                assert [c[:2] for c in context] == [(seq.seq_id, p) for p in range(end)], "the cache lost a token"
                sampled[seq.seq_id] = next_token(seq.seq_id, [c[2] for c in context])
        return sampled


class FakeResidency:
    """`num_slots` adapters on the device; a load takes `load_steps[adapter]` ticks; adapters in `failing` fail."""

    def __init__(self, num_slots: int = 4, load_steps: dict[str, int] | None = None,
                 failing: frozenset[str] = frozenset()) -> None:
        self.num_slots, self.load_steps, self.failing = num_slots, load_steps or {}, failing
        self.placed: dict[AdapterKey, int] = {}  # on the device or loading into it -> slot
        self.loading: dict[AdapterKey, tuple[int, Future]] = {}
        self.holds: Counter[AdapterKey] = Counter()
        self.prefetched: list[AdapterKey] = []
        self.num_acquires = self.num_releases = self.now = 0

    def is_ready(self, key: AdapterKey) -> bool:
        return key in self.placed and key not in self.loading

    def can_make_resident(self, adapter: PinnedAdapter) -> bool:
        return adapter.key in self.placed or len(self.placed) < self.num_slots or self._evictable() is not None

    def prefetch(self, key: AdapterKey) -> None:
        self.prefetched.append(key)

    def acquire(self, key: AdapterKey) -> Future:
        assert self.can_make_resident(PinnedAdapter(key, 8)), "acquired beyond the device budget"
        self.holds[key] += 1
        self.num_acquires += 1
        if key in self.loading:
            return self.loading[key][1]
        future: Future = Future()
        if key in self.placed:
            future.set_result(self.placed[key])
            return future
        if len(self.placed) == self.num_slots:
            del self.placed[self._evictable()]
        self.placed[key] = min(set(range(self.num_slots)) - set(self.placed.values()))
        self.loading[key] = (self.now + self.load_steps.get(key.adapter_id, 0), future)
        self.tick(0)
        return future

    def release(self, key: AdapterKey) -> None:
        assert self.holds[key] > 0, f"release of {key} without a hold"
        self.holds[key] -= 1
        self.num_releases += 1

    def tick(self, steps: int = 1) -> None:
        self.now += steps
        for key, (ready_at, future) in list(self.loading.items()):
            if ready_at <= self.now:
                del self.loading[key]
                if key.adapter_id in self.failing:
                    del self.placed[key]
                    future.set_exception(RuntimeError(f"adapter {key} is corrupt"))
                else:
                    future.set_result(self.placed[key])

    def _evictable(self) -> AdapterKey | None:
        return next((k for k in self.placed if self.holds[k] == 0 and k not in self.loading), None)


@dataclass
class Run:
    """What a driven workload did, step by step."""

    steps: int = 0
    first_admitted: dict[int, int] = field(default_factory=dict)  # seq_id -> step
    finished_at: dict[int, int] = field(default_factory=dict)
    recomputes: Counter = field(default_factory=Counter)  # seq_id -> times it was fed again from position 0


def drive(scheduler: Scheduler, residency: FakeResidency | None, seqs: list[Sequence],
          arrive_at: dict[int, int] | None = None, abort_at: dict[int, int] | None = None,
          model: "FakeModel | None" = None, max_steps: int = 5000,
          observe: Callable[[Scheduler], Callable[[], None]] | None = None) -> Run:
    """Add each sequence at its step, abort at its step, run until all finish, checking the limits every step.
    `observe` is called just before each schedule; what it returns, just after."""
    arrive_at, abort_at = arrive_at or {}, abort_at or {}
    config, blocks = scheduler.config, scheduler.block_manager
    model = model or FakeModel(blocks)  # the caller's, when it ran steps of its own
    run = Run()
    pending = sorted(seqs, key=lambda s: arrive_at.get(s.seq_id, 0))
    while pending or scheduler.has_unfinished():
        while pending and arrive_at.get(pending[0].seq_id, 0) <= run.steps:
            scheduler.add(pending.pop(0))
        for seq_id, step in abort_at.items():
            if step == run.steps:
                scheduler.abort(seq_id)
        after_schedule = observe(scheduler) if observe is not None else None
        batch = scheduler.schedule(now=float(run.steps))
        if after_schedule is not None:
            after_schedule()
        for seq in scheduler.running:
            run.first_admitted.setdefault(seq.seq_id, run.steps)
        assert len(scheduler.running) <= config.max_num_seqs
        if batch is not None:
            assert batch.num_tokens <= config.max_num_batched_tokens and batch.num_seqs <= config.max_num_seqs
            assert len({c.seq.seq_id for c in batch.chunks}) == batch.num_seqs
            for chunk in batch.chunks:
                seq, start = chunk.seq, chunk.start_position
                assert chunk.token_ids == seq.all_token_ids[start:start + chunk.num_tokens]
                assert chunk.num_tokens <= config.chunk_limit and seq.status is SequenceStatus.RUNNING
                assert residency is None or seq.adapter_key is None or residency.is_ready(seq.adapter_key)
                # The chunk carries the slot its adapter's hold gave: the runner never asks residency again.
                assert chunk.lora_slot == (None if seq.adapter_key is None else residency.placed[seq.adapter_key])
                if start == 0 and seq.num_tokens > seq.num_prompt_tokens:
                    run.recomputes[seq.seq_id] += 1
            scheduler.on_step_done(batch, model.run(batch))
        for seq in scheduler.pop_finished():
            run.finished_at[seq.seq_id] = run.steps
        blocks.check_invariants(scheduler.running + scheduler.waiting)
        assert all(not seq.block_table for seq in scheduler.waiting)
        if residency is not None:
            residency.tick()
        run.steps += 1
        assert run.steps < max_steps, "the workload did not finish"
    assert blocks.num_free_blocks == blocks.num_blocks, "blocks leaked"
    assert residency is None or (residency.num_acquires == residency.num_releases and not any(residency.holds.values()))
    return run


def pinned(adapter_id: str | None, tenant: str = "default", version: int = 1) -> PinnedAdapter | None:
    """What the engine pins when a request is submitted (None: the base model)."""
    return None if adapter_id is None else PinnedAdapter(AdapterKey(tenant, adapter_id, version), max_rank=8)


def make_seq(seq_id: int, num_prompt: int = 5, max_new_tokens: int = 6, adapter_id: str | None = None,
             adapter_version: int = 1, **kwargs) -> Sequence:
    prompt = [(seq_id * 7 + i) % VOCAB for i in range(num_prompt)]
    adapter = pinned(adapter_id, kwargs.get("tenant", "default"), adapter_version)
    return Sequence(seq_id=seq_id, prompt_token_ids=prompt, max_new_tokens=max_new_tokens, adapter=adapter, **kwargs)


def config(**kwargs) -> SchedulerConfig:
    defaults = dict(num_blocks=64, max_model_len=64, block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    return SchedulerConfig(**{**defaults, **kwargs})


def step(scheduler: Scheduler, model: FakeModel, now: float = 0.0) -> ScheduledBatch | None:
    batch = scheduler.schedule(now)
    if batch is not None:
        scheduler.on_step_done(batch, model.run(batch))
    return batch


# ---------------------------------------------------------------- limits and the basic loop


def test_config_refuses_what_cannot_work():
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        SchedulerConfig(num_blocks=2, block_size=4, max_model_len=9)
    with pytest.raises(ValueError, match="at least max_num_seqs"):
        SchedulerConfig(num_blocks=8, max_model_len=16, max_num_batched_tokens=4, max_num_seqs=8)
    with pytest.raises(ValueError, match="max_overtakes"):
        SchedulerConfig(num_blocks=8, max_model_len=16, max_overtakes=-1)
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        SchedulerConfig(num_blocks=8, max_model_len=16, prefill_chunk_size=0)


def test_add_refuses_bad_requests():
    # The engine checks requests where they enter (server.engine.request.check_request): here what slips past it
    # is a bug, an assertion.
    scheduler = Scheduler(config(max_model_len=8))
    with pytest.raises(AssertionError, match="prompt too long"):
        scheduler.add(make_seq(0, num_prompt=8))
    with pytest.raises(AssertionError, match="no adapters"):
        scheduler.add(make_seq(1, adapter_id="a"))
    scheduler.add(make_seq(2))
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add(make_seq(2))
    with pytest.raises(AssertionError, match="empty"):
        make_seq(3, num_prompt=0)


def test_mixed_adapters_share_steps_and_match_each_alone():
    residency = FakeResidency()
    seqs = [make_seq(i, num_prompt=3 + i, max_new_tokens=4 + i % 3, adapter_id=[None, "a", "b"][i % 3],
                     eos_token_ids=frozenset({0, 1, 2})) for i in range(9)]
    scheduler = Scheduler(config(), residency)
    model = FakeModel(scheduler.block_manager)
    for seq in seqs:
        scheduler.add(seq)
    first = step(scheduler, model)
    assert {c.seq.adapter_id for c in first.chunks} == {None, "a", "b"}  # no per-adapter batching
    drive(scheduler, residency, [], model=model)
    for seq in seqs:
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, 64)


def test_long_prompt_is_chunked_and_samples_only_at_its_end():
    scheduler = Scheduler(config(prefill_chunk_size=16, max_num_batched_tokens=20))
    model = FakeModel(scheduler.block_manager)
    long, short = make_seq(0, num_prompt=40, max_new_tokens=3), make_seq(1, num_prompt=3, max_new_tokens=3)
    scheduler.add(long)
    scheduler.add(short)
    shapes = []
    while scheduler.has_unfinished():
        batch = step(scheduler, model)
        shapes.append([(c.seq.seq_id, c.start_position, c.num_tokens, c.is_sampled) for c in batch.chunks])
    assert shapes[0] == [(0, 0, 16, False), (1, 0, 3, True)]
    assert shapes[1] == [(1, 3, 1, True), (0, 16, 16, False)]  # decodes first, then the rest of the prompt
    assert shapes[2] == [(1, 4, 1, True), (0, 32, 8, True)]
    assert shapes[3] == [(0, 40, 1, True)] and shapes[4] == [(0, 41, 1, True)]
    for seq in (long, short):
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, 64)


def test_new_requests_join_the_next_step_and_finished_ones_leave_at_once():
    scheduler = Scheduler(config())
    model = FakeModel(scheduler.block_manager)
    a = make_seq(0, num_prompt=4, max_new_tokens=2)
    scheduler.add(a)
    step(scheduler, model)
    b = make_seq(1, num_prompt=4, max_new_tokens=5)
    scheduler.add(b)
    batch = step(scheduler, model)
    assert [(c.seq.seq_id, c.num_tokens) for c in batch.chunks] == [(0, 1), (1, 4)]
    assert a.finish_reason == "length" and a not in scheduler.running and a.block_table == []
    assert scheduler.pop_finished() == [a] and scheduler.pop_finished() == []
    assert scheduler.block_manager.num_used_blocks == len(b.block_table) == 1


# ---------------------------------------------------------------- preemption


def test_forced_preemption_keeps_outputs_and_counts():
    # Six blocks of 4 for four requests that each grow to 22 tokens: decodes must preempt.
    scheduler = Scheduler(config(num_blocks=6, max_model_len=24, max_num_seqs=4, max_num_batched_tokens=32))
    seqs = [make_seq(i, num_prompt=8, max_new_tokens=14) for i in range(4)]
    run = drive(scheduler, None, seqs)
    assert scheduler.num_preemptions > 0
    assert scheduler.num_preemptions == sum(s.num_preemptions for s in seqs) == sum(run.recomputes.values())
    for seq in seqs:
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, 24)
    assert seqs[0].num_preemptions == 0  # the oldest always progresses


def test_preempted_sequence_is_reprefilled_with_prompt_and_generated_tokens():
    scheduler = Scheduler(config(num_blocks=4, max_model_len=16, max_num_seqs=2, prefill_chunk_size=4))
    model = FakeModel(scheduler.block_manager)
    old, young = make_seq(0, num_prompt=6, max_new_tokens=10), make_seq(1, num_prompt=6, max_new_tokens=10)
    scheduler.add(old)
    scheduler.add(young)
    while young.num_preemptions == 0:
        step(scheduler, model)
    assert young.status is SequenceStatus.WAITING and young.block_table == [] and young.num_computed_tokens == 0
    assert scheduler.waiting[0] is young and len(young.output_token_ids) > 0
    tokens_at_preemption, recompute = young.all_token_ids, []
    while len(young.all_token_ids) == len(tokens_at_preemption):
        batch = step(scheduler, model)
        for chunk in (c for c in batch.chunks if c.seq is young):
            recompute = [chunk] if chunk.start_position == 0 else recompute + [chunk]  # preempted again: restart
    # Fed again from position 0 in chunks of at most 4, prompt and generated tokens; only the last chunk samples.
    assert [t for c in recompute for t in c.token_ids] == tokens_at_preemption and len(recompute) >= 2
    assert [c.is_sampled for c in recompute] == [False] * (len(recompute) - 1) + [True]
    drive(scheduler, None, [], model=model)
    for seq in (old, young):
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, 16)


def test_prefill_never_preempts_a_sequence_already_in_the_batch():
    scheduler = Scheduler(config(num_blocks=4, max_model_len=16, max_num_seqs=2, prefill_chunk_size=4))
    model = FakeModel(scheduler.block_manager)
    old, young = make_seq(0, num_prompt=15, max_new_tokens=1), make_seq(1, num_prompt=4, max_new_tokens=8)
    scheduler.add(old)
    scheduler.add(young)
    step(scheduler, model)  # old [0, 4), young's whole prompt: a block each
    step(scheduler, model)  # young's decode takes a third block, old [4, 8) the last
    batch = step(scheduler, model)
    # The cache is full: old's next chunk cannot preempt young, whose decode is already scheduled; it waits.
    assert [(c.seq, c.num_tokens) for c in batch.chunks] == [(young, 1)] and scheduler.num_preemptions == 0
    drive(scheduler, None, [], model=model)
    assert young.num_preemptions == 1 and old.num_preemptions == 0  # young ran out first and gave way
    for seq in (old, young):
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, 16)


# ---------------------------------------------------------------- adapter-aware admission


def test_cold_adapter_does_not_block_ready_ones_and_is_prefetched():
    residency = FakeResidency(num_slots=1)
    scheduler = Scheduler(config(), residency)
    model = FakeModel(scheduler.block_manager)
    scheduler.add(make_seq(0, adapter_id="a", max_new_tokens=20))
    step(scheduler, model)  # "a" takes the only slot, held while seq 0 runs
    cold, ready, base = make_seq(1, adapter_id="b"), make_seq(2, adapter_id="a"), make_seq(3)
    for seq in (cold, ready, base):
        scheduler.add(seq)
    batch = step(scheduler, model)
    assert {c.seq.seq_id for c in batch.chunks} == {0, 2, 3}
    assert cold.status is SequenceStatus.WAITING and cold.num_times_overtaken == 2
    assert residency.prefetched == [cold.adapter_key]
    drive(scheduler, residency, [], model=model)
    assert cold.finish_reason == "length" and residency.prefetched == [cold.adapter_key]


def test_overtakes_are_bounded_and_then_the_head_blocks():
    residency = FakeResidency(num_slots=1)
    scheduler = Scheduler(config(max_overtakes=2), residency)
    model = FakeModel(scheduler.block_manager)
    scheduler.add(make_seq(0, adapter_id="a", max_new_tokens=8))
    step(scheduler, model)
    starving = make_seq(1, adapter_id="b")
    behind = [make_seq(i, adapter_id="a", max_new_tokens=8) for i in range(2, 6)]
    for seq in [starving, *behind]:
        scheduler.add(seq)
    step(scheduler, model)
    assert [s.status for s in behind] == [SequenceStatus.RUNNING] * 2 + [SequenceStatus.WAITING] * 2
    assert starving.num_times_overtaken == 2
    run = drive(scheduler, residency, [], model=model)
    assert starving.num_times_overtaken == 2  # nobody passed it again: it ran before seqs 4 and 5
    assert run.first_admitted[1] < run.first_admitted[4] <= run.first_admitted[5]


def test_loading_adapter_admits_and_runs_when_loaded():
    residency = FakeResidency(load_steps={"slow": 3})
    scheduler = Scheduler(config(), residency)
    model = FakeModel(scheduler.block_manager)
    slow, base = make_seq(0, adapter_id="slow"), make_seq(1)
    scheduler.add(slow)
    scheduler.add(base)
    for _ in range(3):
        batch = step(scheduler, model)
        assert slow.status is SequenceStatus.RUNNING and all(c.seq is base for c in batch.chunks)
        residency.tick()
    batch = step(scheduler, model)
    assert [c.seq for c in batch.chunks] == [base, slow]
    assert slow.num_times_overtaken == 0  # admitted at once: the load had room
    drive(scheduler, residency, [], model=model)
    assert (slow.output_token_ids, slow.finish_reason) == reference(slow, 64)


def test_failed_load_finishes_only_that_request():
    residency = FakeResidency(load_steps={"bad": 1}, failing=frozenset({"bad"}))
    scheduler = Scheduler(config(), residency)
    seqs = [make_seq(0, adapter_id="bad"), make_seq(1, adapter_id="bad"), make_seq(2, adapter_id="a")]
    drive(scheduler, residency, seqs)
    assert [s.finish_reason for s in seqs] == ["error", "error", "length"]
    assert "corrupt" in seqs[0].error and seqs[0].output_token_ids == [] and scheduler.num_errors == 2


class CompletesWhenAsked(Future):
    """A load that finishes on another thread at the worst moment: while the scheduler is looking at it. The
    `flip_at`-th call of done() still answers "no" but completes it (a slot, no error) for every later look."""

    def __init__(self, flip_at: int) -> None:
        super().__init__()
        self.calls, self.flip_at = 0, flip_at

    def done(self) -> bool:
        self.calls += 1
        was_done = super().done()
        if not was_done and self.calls >= self.flip_at:
            self.set_result(0)
        return was_done


@pytest.mark.parametrize("flip_at", range(1, 6))
def test_a_load_completing_mid_check_is_not_mistaken_for_a_failure(flip_at):
    residency = FakeResidency()
    racing = CompletesWhenAsked(flip_at)
    residency.acquire = lambda key: racing
    residency.release = lambda key: None
    scheduler = Scheduler(config(), residency)
    seq = make_seq(0, adapter_id="a")
    scheduler.add(seq)
    model = FakeModel(scheduler.block_manager)
    for _ in range(6):
        batch = scheduler.schedule(0.0)
        if batch is not None:
            scheduler.on_step_done(batch, model.run(batch))
    assert seq.finish_reason != "error", seq.error
    assert seq.output_token_ids


def test_each_sequence_runs_on_the_version_it_was_pinned_to():
    # The engine pins when a request is submitted (tests/engine/test_engine.py checks hot-swap end to end); the
    # scheduler holds, and feeds with, exactly that version.
    residency = FakeResidency()
    scheduler = Scheduler(config(), residency)
    seqs = [make_seq(0, adapter_id="a", adapter_version=3), make_seq(1, adapter_id="a", adapter_version=4),
            make_seq(2, adapter_id="a", adapter_version=2)]
    drive(scheduler, residency, seqs)
    assert [s.adapter_version for s in seqs] == [3, 4, 2]
    assert {k.version for k in residency.placed} == {2, 3, 4}


# ---------------------------------------------------------------- deadlines and cancellation


def test_deadline_times_out_running_and_waiting_requests_and_frees_at_once():
    residency = FakeResidency(num_slots=1)
    scheduler = Scheduler(config(), residency)
    model = FakeModel(scheduler.block_manager)
    running = make_seq(0, adapter_id="a", max_new_tokens=50, deadline=2.5)
    waiting = make_seq(1, adapter_id="b", deadline=1.5)  # cold: slot held by "a"
    scheduler.add(running)
    scheduler.add(waiting)
    for now in (0.0, 1.0):
        step(scheduler, model, now)
    assert running.block_table and waiting.status is SequenceStatus.WAITING
    scheduler.schedule(2.0)
    assert waiting.finish_reason == "timeout" and running.status is SequenceStatus.RUNNING
    scheduler.schedule(3.0)
    assert running.finish_reason == "timeout" and running.block_table == []
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
    assert scheduler.num_timeouts == 2 and not scheduler.has_unfinished()
    assert residency.num_acquires == residency.num_releases == 1  # the cold one never held its adapter
    assert scheduler.pop_finished() == [waiting, running]


def test_abort_frees_blocks_and_hold_at_once_even_during_a_step():
    residency = FakeResidency()
    scheduler = Scheduler(config(), residency)
    model = FakeModel(scheduler.block_manager)
    a, b = make_seq(0, adapter_id="a", num_prompt=9), make_seq(1, num_prompt=9)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler, model)
    assert scheduler.block_manager.num_used_blocks == 6
    assert scheduler.abort(0) and not scheduler.abort(0) and not scheduler.abort(99)
    assert a.finish_reason == "abort" and a.block_table == [] and scheduler.block_manager.num_used_blocks == 3
    assert residency.num_releases == 1
    batch = scheduler.schedule(0.0)
    sampled = model.run(batch)  # b's decode was in flight when it was cancelled
    scheduler.abort(1)
    scheduler.on_step_done(batch, sampled)
    assert b.output_token_ids == [reference(b, 64)[0][0]] and scheduler.block_manager.num_used_blocks == 0
    assert scheduler.num_aborted == 2 and not scheduler.has_unfinished()


# ---------------------------------------------------------------- random workloads


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([2, 4, 16]))
    max_model_len = draw(st.integers(8, 40))
    min_blocks = -(-max_model_len // block_size)
    cfg = SchedulerConfig(
        num_blocks=draw(st.integers(min_blocks, 2 * min_blocks)), max_model_len=max_model_len, block_size=block_size,
        max_num_seqs=(max_num_seqs := draw(st.integers(1, 6))),
        max_num_batched_tokens=draw(st.integers(max_num_seqs, 48)),
        prefill_chunk_size=draw(st.none() | st.integers(1, 24)), max_overtakes=draw(st.integers(0, 4)))
    residency = FakeResidency(num_slots=draw(st.integers(1, 3)), load_steps={"b": 2, "c": 9, "bad": 1},
                              failing=frozenset({"bad"}))
    seqs, arrive_at, abort_at = [], {}, {}
    for seq_id in range(draw(st.integers(1, 12))):
        arrival = draw(st.integers(0, 15))
        seqs.append(Sequence(
            seq_id=seq_id, prompt_token_ids=draw(st.lists(st.integers(0, VOCAB - 1), min_size=1,
                                                           max_size=max_model_len - 1)),
            max_new_tokens=draw(st.integers(1, 30)), eos_token_ids=frozenset(draw(st.sets(st.integers(0, 9)))),
            adapter=pinned(draw(st.sampled_from([None, "a", "b", "c", "bad"]))),
            deadline=draw(st.none() | st.integers(arrival + 1, arrival + 60).map(float))))
        arrive_at[seq_id] = arrival
        if draw(st.booleans()) and draw(st.booleans()):
            abort_at[seq_id] = draw(st.integers(arrival, arrival + 40))
    return cfg, residency, seqs, arrive_at, abort_at


@settings(max_examples=120, deadline=None)
@given(workloads())
def test_random_workloads_finish_without_leaks_or_starvation(workload):
    cfg, residency, seqs, arrive_at, abort_at = workload
    scheduler = Scheduler(cfg, residency)
    run = drive(scheduler, residency, seqs, arrive_at, abort_at)  # checks limits, leaks and holds as it goes
    for seq in seqs:
        assert seq.is_finished and run.finished_at[seq.seq_id] >= arrive_at[seq.seq_id]
        assert_matches_reference(seq, cfg.max_model_len)
        if seq.finish_reason == "error":
            assert seq.adapter_id == "bad" and seq.output_token_ids == []
        elif seq.finish_reason == "timeout":
            assert run.finished_at[seq.seq_id] > seq.deadline
        elif seq.finish_reason == "abort":
            assert run.finished_at[seq.seq_id] == abort_at[seq.seq_id]
        # Overtakes, counted from the outside: younger requests first admitted while this one waited.
        end = run.first_admitted.get(seq.seq_id, run.finished_at[seq.seq_id])
        overtakers = [o for o in seqs if o.arrival > seq.arrival and run.first_admitted.get(o.seq_id, end) < end]
        assert len(overtakers) == seq.num_times_overtaken <= cfg.max_overtakes
    assert scheduler.num_preemptions == sum(s.num_preemptions for s in seqs)
    assert scheduler.num_timeouts == sum(s.finish_reason == "timeout" for s in seqs)
