"""Fairness between tenants: one tenant's backlog or long prompts hold another tenant's request back for a step or
two at most, admission is a round robin of FCFS queues, memory and slots are taken from the tenant running the most,
and random multi-tenant workloads finish with every block returned and no tenant starved longer than the policy
allows.

The fakes and the single-request oracle are test_scheduler's: a model whose KV cache holds token ids.
"""

from collections import Counter
from collections.abc import Callable
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from lora_server.engine.scheduling.batch import ScheduledBatch
from lora_server.engine.scheduling.scheduler import Scheduler, SchedulerConfig
from lora_server.engine.scheduling.sequence import Sequence, SequenceStatus
from tests.engine.test_scheduler import (
    VOCAB,
    FakeModel,
    FakeResidency,
    assert_matches_reference,
    config,
    drive,
    make_seq,
    pinned,
    reference,
    step,
)


def steps_until(scheduler: Scheduler, model: FakeModel, done: Callable[[], bool],
                limit: int = 200) -> list[ScheduledBatch]:
    """Step until done() holds; the batches of those steps."""
    batches = []
    while not done():
        assert len(batches) < limit, "it never happened"
        batches.append(step(scheduler, model))
    return batches


def fill(scheduler: Scheduler, model: FakeModel, seqs: list[Sequence]) -> None:
    """Add `seqs` and step until they take every sequence slot, each past its prompt."""
    for seq in seqs:
        scheduler.add(seq)
    steps_until(scheduler, model, lambda: len(scheduler.running) == scheduler.config.max_num_seqs and
                all(s.output_token_ids for s in scheduler.running))


def a_tokens(seqs: list[Sequence]) -> int:
    return sum(len(s.output_token_ids) for s in seqs)


# ---------------------------------------------------------------- a newcomer behind another tenant's work


def test_a_new_tenant_gets_its_first_token_within_two_steps_behind_hundreds_of_queued_requests():
    budget, max_num_seqs, prompt = 64, 8, 40
    scheduler = Scheduler(config(max_model_len=128, num_blocks=max_num_seqs * 32, max_num_batched_tokens=budget,
                                 max_num_seqs=max_num_seqs))
    model = FakeModel(scheduler.block_manager)
    backlog = [make_seq(i, num_prompt=60, max_new_tokens=60, tenant="a") for i in range(300)]
    fill(scheduler, model, backlog)
    assert len(scheduler.waiting) > 280
    youngest, before = scheduler.running[-1], a_tokens(backlog)

    newcomer = make_seq(1000, num_prompt=prompt, max_new_tokens=3, tenant="b")
    scheduler.add(newcomer)
    batches = steps_until(scheduler, model, lambda: bool(newcomer.output_token_ids))
    # It takes the slot of a's youngest at once; the decodes leave at least budget - (max_num_seqs - 1) tokens, of
    # which a's prefills take at most half, so its prompt is fed within ceil(prompt / that half) steps.
    assert len(batches) <= -(-prompt // ((budget - max_num_seqs + 1) // 2)) == 2
    assert youngest.num_preemptions == 1 and scheduler.num_preemptions == 1
    assert all(any(c.seq.tenant == "a" for c in batch.chunks) for batch in batches), "a kept running meanwhile"
    steps_until(scheduler, model, lambda: newcomer.is_finished)
    assert a_tokens(backlog) > before
    assert (newcomer.output_token_ids, newcomer.finish_reason) == reference(newcomer, 128)


def test_long_running_prefills_of_one_tenant_share_the_budget_with_a_new_prompt():
    budget = 32
    scheduler = Scheduler(config(max_model_len=256, num_blocks=8 * 64, max_num_batched_tokens=budget))
    model = FakeModel(scheduler.block_manager)
    long_ones = [make_seq(i, num_prompt=200, max_new_tokens=4, tenant="a") for i in range(4)]
    for seq in long_ones:
        scheduler.add(seq)
    for _ in range(2):
        batch = step(scheduler, model)
        assert batch.num_tokens == budget  # a's prompts alone take every token
    short = make_seq(100, num_prompt=10, max_new_tokens=2, tenant="b")
    scheduler.add(short)
    batch = step(scheduler, model)
    # Two tenants with prompt tokens to feed: a's running prefill stops at half the budget, b's whole prompt fits in
    # the other half, and what b leaves goes back to a: the step is still full.
    assert short.output_token_ids and batch.num_tokens == budget
    assert [(c.seq.seq_id, c.num_tokens) for c in batch.chunks][:2] == [(0, budget // 2), (100, 10)]
    drive(scheduler, None, [], model=model)
    for seq in [*long_ones, short]:
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, 256)


def test_one_tenant_alone_keeps_the_whole_budget_for_its_oldest_prompt():
    scheduler = Scheduler(config(max_model_len=256, num_blocks=8 * 64, max_num_batched_tokens=32))
    model = FakeModel(scheduler.block_manager)
    for i in range(3):
        scheduler.add(make_seq(i, num_prompt=100, max_new_tokens=2, tenant="a"))
    shapes = [[(c.seq.seq_id, c.num_tokens) for c in step(scheduler, model).chunks] for _ in range(4)]
    assert shapes == [[(0, 32)], [(0, 32)], [(0, 32)], [(0, 4), (1, 28)]]  # FCFS, chunked: no share cuts in


# ---------------------------------------------------------------- admission order


def test_admission_is_a_round_robin_over_the_tenants_queues():
    scheduler = Scheduler(config(max_num_seqs=4))
    model = FakeModel(scheduler.block_manager)
    a = [make_seq(i, max_new_tokens=10, tenant="a") for i in range(6)]  # a queued all of its requests first
    b = [make_seq(10 + i, max_new_tokens=10, tenant="b") for i in range(6)]
    for seq in a + b:
        scheduler.add(seq)
    batch = step(scheduler, model)
    assert [c.seq.seq_id for c in batch.chunks] == [0, 10, 1, 11]
    run = drive(scheduler, None, [], model=model)
    assert all(run.first_admitted[s.seq_id] <= run.first_admitted[t.seq_id] for s, t in pairwise(a))  # FCFS
    for seq in a + b:
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, 64)


def test_a_freed_slot_goes_to_the_tenant_running_the_fewest():
    scheduler = Scheduler(config(max_num_seqs=4))
    model = FakeModel(scheduler.block_manager)
    first_done = make_seq(0, max_new_tokens=3, tenant="a")
    fill(scheduler, model, [first_done, *(make_seq(i, max_new_tokens=40, tenant="a") for i in (1, 2)),
                            make_seq(3, max_new_tokens=40, tenant="b")])
    older, younger = make_seq(4, tenant="a"), make_seq(5, tenant="b")
    scheduler.add(older)
    scheduler.add(younger)
    steps_until(scheduler, model, lambda: first_done.is_finished)
    step(scheduler, model)
    # a runs two, b one: the slot a's first request left goes to b's request, ahead of a's older one.
    assert younger.status is SequenceStatus.RUNNING and older.status is SequenceStatus.WAITING
    drive(scheduler, None, [], model=model)
    assert (older.output_token_ids, older.finish_reason) == reference(older, 64)


def test_a_newcomer_takes_one_slot_and_a_tenants_only_sequence_is_never_taken():
    scheduler = Scheduler(config(max_num_seqs=4))
    model = FakeModel(scheduler.block_manager)
    fill(scheduler, model, [make_seq(i, max_new_tokens=40, tenant="a") for i in range(4)])
    newcomers = [make_seq(10 + i, max_new_tokens=40, tenant="b") for i in range(3)]
    for seq in newcomers:
        scheduler.add(seq)
    for _ in range(10):
        step(scheduler, model)
    # One slot for b: once it runs something it waits for slots to free like everyone (no churn).
    assert scheduler.num_preemptions == 1 and [s.status for s in newcomers] == \
        [SequenceStatus.RUNNING, SequenceStatus.WAITING, SequenceStatus.WAITING]

    scheduler = Scheduler(config(max_num_seqs=2))
    model = FakeModel(scheduler.block_manager)
    fill(scheduler, model, [make_seq(0, max_new_tokens=30, tenant="a"), make_seq(1, max_new_tokens=20, tenant="c")])
    late = make_seq(2, tenant="b")
    scheduler.add(late)
    steps_until(scheduler, model, lambda: late.status is SequenceStatus.RUNNING)
    assert scheduler.num_preemptions == 0, "a and c run one each: taking either's would only swap who waits"
    assert [s.finish_reason for s in scheduler.pop_finished()] == ["length"]  # c's ended first and freed its slot


# ---------------------------------------------------------------- memory


def test_a_decode_short_of_memory_preempts_from_the_tenant_running_the_most():
    scheduler = Scheduler(config(num_blocks=4, max_model_len=16, max_num_seqs=4, max_num_batched_tokens=16))
    model = FakeModel(scheduler.block_manager)
    # a0's first decode needs a second block; the rest fit in their first. b's is the youngest.
    seqs = [make_seq(0, num_prompt=4, max_new_tokens=8, tenant="a"),
            *(make_seq(i, num_prompt=2, max_new_tokens=8, tenant="a") for i in (1, 2)),
            make_seq(3, num_prompt=2, max_new_tokens=8, tenant="b")]
    for seq in seqs:
        scheduler.add(seq)
    step(scheduler, model)
    assert scheduler.block_manager.num_free_blocks == 0
    step(scheduler, model)
    assert [s.num_preemptions for s in seqs] == [0, 0, 1, 0]  # a's youngest, not b's only (and younger) one
    drive(scheduler, None, [], model=model)
    for seq in seqs:
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, 16)


# ---------------------------------------------------------------- random workloads


TENANTS = ("t0", "t1", "t2", "t3")


@st.composite
def multi_tenant_workloads(draw):
    num_tenants = draw(st.integers(2, len(TENANTS)))
    # Roomy: KV blocks for every slot at full length, every adapter placeable and a slot for each tenant; then no
    # request waits for memory or an adapter, and only the tenant policy decides who goes first.
    roomy = draw(st.booleans())
    block_size = draw(st.sampled_from([2, 4, 16]))
    max_model_len = draw(st.integers(8, 40))
    blocks_per_seq = -(-max_model_len // block_size)
    max_num_seqs = draw(st.integers(num_tenants if roomy else 1, 6))
    cfg = SchedulerConfig(
        num_blocks=max_num_seqs * blocks_per_seq if roomy else draw(st.integers(blocks_per_seq, 2 * blocks_per_seq)),
        max_model_len=max_model_len, block_size=block_size, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=draw(st.integers(max_num_seqs, 48)),
        prefill_chunk_size=draw(st.none() | st.integers(1, 24)), max_overtakes=draw(st.integers(0, 4)))
    residency = FakeResidency(num_slots=4 * num_tenants if roomy else draw(st.integers(1, 3)),
                              load_steps={"b": 2, "c": 9, "bad": 1}, failing=frozenset({"bad"}))
    seqs, arrive_at, abort_at = [], {}, {}
    for seq_id in range(draw(st.integers(1, 16))):
        arrival = draw(st.integers(0, 15))
        prompt = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=max_model_len - 1))
        max_new_tokens, eos = draw(st.integers(1, 30)), frozenset(draw(st.sets(st.integers(0, 9))))
        adapter_id = draw(st.sampled_from([None, "a", "b", "c", "bad"]))
        tenant = draw(st.sampled_from(TENANTS[:num_tenants]))
        seqs.append(Sequence(
            seq_id=seq_id, prompt_token_ids=prompt, max_new_tokens=max_new_tokens, eos_token_ids=eos,
            adapter=pinned(adapter_id, tenant), tenant=tenant,
            deadline=draw(st.none() | st.integers(arrival + 1, arrival + 60).map(float))))
        arrive_at[seq_id] = arrival
        if draw(st.booleans()) and draw(st.booleans()):
            abort_at[seq_id] = draw(st.integers(arrival, arrival + 40))
    return num_tenants, roomy, cfg, residency, seqs, arrive_at, abort_at


class StarvationWatch:
    """Per tenant, the longest run of steps it had requests waiting and nothing running, and none was admitted."""

    def __init__(self) -> None:
        self.streaks: Counter[str] = Counter()
        self.longest = 0

    def __call__(self, scheduler: Scheduler) -> Callable[[], None]:
        running = {s.tenant for s in scheduler.running}
        idle_with_work = {s.tenant for s in scheduler.waiting} - running
        was_waiting = set(scheduler.waiting)

        def after_schedule() -> None:
            admitted = {s.tenant for s in scheduler.running if s in was_waiting}
            still_waiting = {s.tenant for s in scheduler.waiting}
            for tenant in TENANTS:
                starved = tenant in idle_with_work and tenant not in admitted and tenant in still_waiting
                self.streaks[tenant] = self.streaks[tenant] + 1 if starved else 0
            self.longest = max(self.longest, *self.streaks.values())

        return after_schedule


@settings(max_examples=150, deadline=None)
@given(multi_tenant_workloads())
def test_random_multi_tenant_workloads_finish_without_leaks_or_starved_tenants(workload):
    num_tenants, roomy, cfg, residency, seqs, arrive_at, abort_at = workload
    scheduler = Scheduler(cfg, residency)
    watch = StarvationWatch()
    run = drive(scheduler, residency, seqs, arrive_at, abort_at, observe=watch)  # limits, leaks and holds
    for seq in seqs:
        assert seq.is_finished and run.finished_at[seq.seq_id] >= arrive_at[seq.seq_id]
        assert_matches_reference(seq, cfg.max_model_len)
        assert seq.num_times_overtaken <= cfg.max_overtakes
    assert scheduler.num_preemptions == sum(s.num_preemptions for s in seqs)
    if roomy:
        # A tenant with work and nothing running gets a slot in the step (from a tenant running two or more, which
        # roomy workloads always have when the slots are full), and at least one such tenant is admitted every step,
        # the one admitted least recently first. So each other tenant goes ahead of it at most once.
        assert watch.longest <= num_tenants - 1


def test_a_stopped_cold_request_does_not_stop_the_preempted_holder_of_its_room():
    """Found by the property test above: one adapter slot, max_overtakes 0. Tenant t1's request runs on adapter b
    (holding the slot), is preempted for lack of KV blocks and keeps its hold, as preemption does. Tenant t0's next
    request wants adapter a: cold, since b holds the only slot, and never to be overtaken. If admission stopped at it
    for everyone, b's holder would never run again to free the slot: every request must still finish."""
    cfg = SchedulerConfig(num_blocks=4, max_model_len=8, block_size=2, max_num_batched_tokens=4, max_num_seqs=4,
                          max_overtakes=0)
    residency = FakeResidency(num_slots=1, load_steps={"b": 2})
    spec = [(0, "t0", None, 1), (1, "t0", None, 1), (2, "t1", None, 5), (3, "t0", "a", 1), (4, "t0", None, 1),
            (5, "t0", None, 1), (6, "t1", "b", 3)]  # (seq_id, tenant, adapter, max_new_tokens), one-token prompts
    seqs = [Sequence(seq_id=i, prompt_token_ids=[0], max_new_tokens=n, eos_token_ids=frozenset(),
                     adapter=pinned(adapter, tenant), tenant=tenant) for i, tenant, adapter, n in spec]
    scheduler = Scheduler(cfg, residency)
    drive(scheduler, residency, seqs, {seq.seq_id: 0 for seq in seqs}, {})
    assert all(seq.is_finished for seq in seqs)
    assert seqs[6].num_preemptions >= 1, "the scenario needs the holder of the slot preempted"
    assert all(seq.num_times_overtaken <= cfg.max_overtakes for seq in seqs)
