"""Iteration-level scheduling: each step is one batch of running decodes, prefill chunks and new admissions.

The step loop (single-threaded):

    batch = scheduler.schedule(now)                  # None when nothing can run (e.g. only adapter loads pending)
    if batch is not None:
        sampled = runner.run(batch)                  # {seq_id: token} for every chunk with is_sampled
        scheduler.on_step_done(batch, sampled)
    for seq in scheduler.pop_finished(): ...         # stop, length, timeout, abort, error

`abort` and `finish` free blocks at once, so call them between steps, or mid-step only once the runner has read the
batch's block tables; on_step_done skips what finished meanwhile.

Policies:
- Order within a step: running decodes (oldest first), then running prefill chunks (oldest first), then admissions
  in admission order, then the rest of the budget to prefill chunks held to their tenant's share (below). Age is
  arrival order (`Scheduler.add`), kept across preemption.
- Tenants: the queue is one FCFS queue per tenant (preempted requests first, then by arrival). Admission considers
  next the tenant running the fewest sequences (ties: round robin, the one admitted least recently first, then
  whose next request queued first), so one tenant's backlog never stands in front of another tenant's request.
  With one tenant this is exactly first come, first served.
- Admission goes in that order, limited by step budget, sequence count and KV blocks: the first waiting request
  that does not fit stops admission. A request whose adapter is neither resident nor placeable within the device
  budget is skipped (its adapter is prefetched once) and those after it in admission order may be admitted, from
  its tenant or another; each such admission counts as one overtake, and once it has been overtaken
  `max_overtakes` times admission stops at it until it is admitted, except for requests that already hold their
  adapter (preempted ones: the room it waits for may be theirs). A request whose adapter can be made resident
  is admitted at once (its hold starts the load) and runs when the load completes; a failed load finishes it alone
  with "error".
- A new tenant gets in at once: while max_num_seqs sequences are admitted, a tenant with requests waiting and nothing
  running takes the place of the youngest sequence of the tenant running the most (if that tenant runs two or more,
  and the newcomer's request could be admitted now), which is preempted as below. One preemption per newcomer.
- Prefill budget: while several tenants have prompt tokens to feed (running prefills or waiting requests), each
  tenant's running prefill chunks take at most an equal share of what the decodes left; admission comes next, and
  what is still left goes back to the prefills held to their share, oldest first (nothing is wasted). So another
  tenant's long prompts cannot take a step whole: the share of a tenant whose requests all wait is left to
  admission, and a newcomer's prompt, once admitted, is fed at least its share every step. With one tenant the
  share is the whole budget.
- Hot-swap pinning: a sequence arrives pinned to one adapter version (the engine pins it when the request is
  submitted) and runs on it, whatever is stored while it waits or runs. Admission asks residency with the pinned
  facts (max rank), so no step ever reads the store.
- Holds: `acquire` at admission, `release` exactly once when the request finishes for any reason. The hold is kept
  across preemption, so a preempted request resumes with the version it started on, without reloading it. The
  hold's future gives the adapter's slot, stable while held: each chunk carries it to the model runner.
- Preemption by recompute: a decode that finds no free block preempts a running sequence younger than itself and
  not in this step's batch (itself when there is none): the youngest of the tenant running the most, which with one
  tenant is simply the youngest; a prefill chunk preempts younger ones only, else shrinks. The victim's blocks are
  freed and it rejoins the front of its tenant's queue to recompute its prompt and generated tokens. No admissions
  happen in a step that preempted for memory. The oldest running sequence can always progress.
"""

import bisect
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from lora_server.engine.adapters.keys import AdapterKey, PinnedAdapter
from lora_server.engine.scheduling.batch import ScheduledBatch, ScheduledChunk
from lora_server.engine.scheduling.block_manager import BlockManager
from lora_server.engine.scheduling.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's limits, validated once at construction."""

    num_blocks: int  # KV cache blocks on the device
    max_model_len: int  # the most tokens (prompt + generated) one sequence may reach
    block_size: int = 16
    max_num_batched_tokens: int = 2048  # tokens fed through the model in one step, all sequences together
    max_num_seqs: int = 64  # sequences admitted at once (running, loading their adapter, or between chunks)
    max_overtakes: int = 8  # younger requests admitted ahead of one waiting for its adapter before admission stops
    prefill_chunk_size: int | None = None  # the most prompt tokens one sequence feeds per step; None: the step budget

    def __post_init__(self) -> None:
        if min(self.num_blocks, self.block_size, self.max_model_len, self.max_num_seqs) < 1:
            raise ValueError(f"num_blocks ({self.num_blocks}), block_size ({self.block_size}), max_model_len "
                             f"({self.max_model_len}) and max_num_seqs ({self.max_num_seqs}) must be positive")
        if self.max_model_len > self.num_blocks * self.block_size:
            # Why: a lone sequence must always fit, or preemption could not guarantee progress.
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the KV cache's "
                             f"{self.num_blocks} x {self.block_size} = {self.num_blocks * self.block_size} tokens")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Why: every admitted sequence must be able to decode in the same step.
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({self.max_num_seqs})")
        if self.max_overtakes < 0:
            raise ValueError(f"max_overtakes must be 0 (strict FCFS) or more, got {self.max_overtakes}")
        if self.prefill_chunk_size is not None and self.prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be positive or None, got {self.prefill_chunk_size}")

    @property
    def chunk_limit(self) -> int:
        """The most tokens one sequence feeds in one step."""
        return min(self.prefill_chunk_size or self.max_num_batched_tokens, self.max_num_batched_tokens)


class AdapterResidency(Protocol):
    """What the scheduler asks of adapter residency (server.engine.adapters.residency.Residency). Must not block: the
    step loop calls it."""

    def can_make_resident(self, adapter: PinnedAdapter) -> bool: ...  # on the device now, or room without waiting

    def prefetch(self, key: AdapterKey) -> object: ...  # advisory, no hold

    def acquire(self, key: AdapterKey) -> Future[int]: ...  # hold; the future gives its slot or the load's error

    def release(self, key: AdapterKey) -> None: ...  # once per acquire, whatever the outcome


class Scheduler:
    def __init__(self, config: SchedulerConfig, residency: AdapterResidency | None = None) -> None:
        self.config = config
        self.residency = residency  # None: the base model only
        self.block_manager = BlockManager(config.num_blocks, config.block_size)
        self.waiting: list[Sequence] = []  # queue order: preempted ones first, then by arrival (all tenants)
        self.running: list[Sequence] = []  # admitted, by arrival
        self._seqs: dict[int, Sequence] = {}  # every unfinished sequence
        self._holds: dict[int, Future[int]] = {}  # seq_id -> its adapter acquire, from admission to finish
        self._prefetched: set[int] = set()
        self._finished: list[Sequence] = []
        self._num_added = 0
        self._num_admitted = 0
        self._last_admitted: dict[str, int] = {}  # tenant -> serial of its latest admission, for the round robin
        self._num_unfinished: Counter[str] = Counter()  # tenant -> its unfinished sequences
        self.num_preemptions = self.num_timeouts = self.num_aborted = self.num_errors = 0

    # ---------------------------------------------------------------- requests in and out

    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence {seq.seq_id} is already scheduled")
        if seq.is_finished or seq.output_token_ids or seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} has already run")
        # The engine's entry checked the request (server.engine.request.check_request) and pinned its adapter.
        assert seq.num_prompt_tokens < self.config.max_model_len, f"sequence {seq.seq_id}: prompt too long"
        assert seq.adapter is None or self.residency is not None, f"sequence {seq.seq_id}: no adapters served here"
        seq.arrival, self._num_added = self._num_added, self._num_added + 1
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._seqs[seq.seq_id] = seq
        self._num_unfinished[seq.tenant] += 1

    def abort(self, seq_id: int) -> bool:
        """Cancel: blocks and adapter hold go at once. False if the sequence is unknown or already finished."""
        return self.finish(seq_id, "abort")

    def finish(self, seq_id: int, reason: FinishReason, error: str | None = None) -> bool:
        """End a sequence from outside (a stop string, a cancel); False if it is unknown or already finished."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            return False
        self._finish(seq, reason, error)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def pop_finished(self) -> list[Sequence]:
        """Sequences finished since the last call, for any reason."""
        finished, self._finished = self._finished, []
        return finished

    # ---------------------------------------------------------------- one step

    def schedule(self, now: float) -> ScheduledBatch | None:
        self._reap(now)
        self._make_room_for_new_tenants()
        config, blocks = self.config, self.block_manager
        budget = config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[Sequence] = set()
        num_preempted = self.num_preemptions

        for seq in list(self.running):  # decodes, oldest first
            if seq.status is not SequenceStatus.RUNNING or seq.num_computed_tokens == 0 or \
                    seq.num_uncomputed_tokens != 1:
                continue
            while not blocks.can_allocate(seq, 1):
                victim = self._preemption_victim(seq, scheduled) or seq
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                budget -= self._schedule_chunk(seq, 1, chunks, scheduled)

        # Prefill chunks (new prompts, the rest of long ones, recomputes), each tenant's up to its share.
        share = self._prefill_share(budget, scheduled)
        num_fed: Counter[str] = Counter()  # tenant -> prefill tokens scheduled this step
        held_back: list[Sequence] = []  # cut short by their tenant's share: first to get what is left at the end
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq in scheduled or not self._is_adapter_ready(seq):
                continue
            wanted = min(seq.num_uncomputed_tokens, config.chunk_limit, budget)
            num_tokens = min(wanted, share - num_fed[seq.tenant])
            if num_tokens < wanted:
                held_back.append(seq)
            if num_tokens == 0:
                continue
            while not blocks.can_allocate(seq, num_tokens) and (victim := self._preemption_victim(seq, scheduled)):
                self._preempt(victim)
            num_tokens = min(num_tokens, blocks.num_allocatable_tokens(seq))
            if num_tokens > 0:
                budget -= self._schedule_chunk(seq, num_tokens, chunks, scheduled)
                num_fed[seq.tenant] += num_tokens

        if self.num_preemptions == num_preempted:  # why: memory is short; what was preempted must not churn back
            budget -= self._admit(budget, chunks, scheduled)
        self._feed_held_back(held_back, budget, chunks, scheduled)
        return ScheduledBatch(tuple(chunks)) if chunks else None

    def on_step_done(self, batch: ScheduledBatch, sampled_token_ids: Mapping[int, int]) -> None:
        """Advance every chunk of `batch`, append the sampled tokens, finish on EOS or length."""
        for chunk in batch.chunks:
            seq = chunk.seq
            if seq.is_finished:  # aborted while the step ran
                continue
            assert seq.num_computed_tokens == chunk.start_position, f"sequence {seq.seq_id} moved during the step"
            seq.num_computed_tokens += chunk.num_tokens
            if not chunk.is_sampled:
                continue
            token = sampled_token_ids[seq.seq_id]
            seq.output_token_ids.append(token)
            if token in seq.eos_token_ids:
                self._finish(seq, "stop")
            elif len(seq.output_token_ids) >= seq.max_new_tokens or seq.num_tokens >= self.config.max_model_len:
                self._finish(seq, "length")

    # ---------------------------------------------------------------- admission

    def _admit(self, budget: int, chunks: list[ScheduledChunk], scheduled: set[Sequence]) -> int:
        """Admit waiting requests in admission order, scheduling the first chunk of those whose adapter is ready;
        the tokens scheduled."""
        config, used, skipped = self.config, 0, []
        stopped = False  # admission stopped at a request overtaken max_overtakes times, waiting for its adapter
        for seq in self._admission_order():
            if len(self.running) >= config.max_num_seqs:
                break
            if stopped and seq.seq_id not in self._holds:
                # Why requests that hold their adapter still go (preempted ones keep their hold): the device room
                # the stopped request waits for may be theirs, so stopping them too would wait forever.
                continue
            num_tokens = min(seq.num_uncomputed_tokens, config.chunk_limit, budget - used)
            if num_tokens == 0 or not self.block_manager.can_allocate(seq, num_tokens):
                break  # first come, first served on memory and budget
            state = self._claim_adapter(seq)
            if state == "cold":
                skipped.append(seq)
                # why: it has waited long enough; nobody else goes first (but those holding their adapter, above)
                stopped = stopped or seq.num_times_overtaken >= config.max_overtakes
                continue
            if state == "failed":
                continue  # _claim_adapter finished it
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            self._last_admitted[seq.tenant], self._num_admitted = self._num_admitted, self._num_admitted + 1
            if state == "ready":
                used += self._schedule_chunk(seq, num_tokens, chunks, scheduled)
            if not stopped:
                for overtaken in skipped:
                    overtaken.num_times_overtaken += 1
                stopped = any(s.num_times_overtaken >= config.max_overtakes for s in skipped)
        return used

    def _admission_order(self) -> Iterator[Sequence]:
        """The waiting requests, each tenant's in queue order, the next always from the tenant running the fewest
        sequences, counting those admitted meanwhile (ties: the tenant admitted least recently, then whose next
        request queued first). One tenant: its queue."""
        queues: dict[str, deque[tuple[int, Sequence]]] = {}
        for position, seq in enumerate(self.waiting):
            queues.setdefault(seq.tenant, deque()).append((position, seq))
        num_running = Counter(seq.tenant for seq in self.running)
        while queues:
            tenant = min(queues, key=lambda t: (num_running[t], self._last_admitted.get(t, -1), queues[t][0][0]))
            _, seq = queues[tenant].popleft()
            if not queues[tenant]:
                del queues[tenant]
            yield seq
            num_running[tenant] += seq.status is SequenceStatus.RUNNING  # admitted while the caller looked

    def _make_room_for_new_tenants(self) -> None:
        """While max_num_seqs are admitted, give a tenant running nothing the place of the youngest sequence of the
        tenant running the most, so its request starts now rather than after someone else's long ones end."""
        config = self.config
        num_free_places = config.max_num_seqs - len(self.running)
        if num_free_places > 0 and len(self.waiting) <= num_free_places:
            return  # why: the common case, and every waiting request has a place anyway
        num_running = Counter(seq.tenant for seq in self.running)
        heads: dict[str, Sequence] = {}  # tenant running nothing -> its first waiting request, in queue order
        for seq in self.waiting:
            if seq.tenant not in num_running:
                heads.setdefault(seq.tenant, seq)
        for head in heads.values():
            if not self._could_start_now(head):
                continue
            if num_free_places > 0:  # admission will give it a free place first: it runs the fewest
                num_free_places -= 1
                continue
            heaviest = max(num_running, key=lambda t: num_running[t], default=None)
            if heaviest is None or num_running[heaviest] < 2:
                return  # why: nobody runs more than one; taking someone's only sequence would just swap who waits
            victim = next(seq for seq in reversed(self.running) if seq.tenant == heaviest)
            blocks_needed = self.block_manager.num_blocks_needed(head, min(head.num_uncomputed_tokens,
                                                                           config.chunk_limit))
            if blocks_needed > self.block_manager.num_free_blocks + len(victim.block_table):
                continue  # short of memory, not of places: preempting would not let it in
            self._preempt(victim)
            num_running[heaviest] -= 1

    def _could_start_now(self, seq: Sequence) -> bool:
        """Whether admission would take `seq` given a place: its adapter held, resident or placeable now."""
        return seq.adapter is None or seq.seq_id in self._holds or (self.residency is not None and
                                                                    self.residency.can_make_resident(seq.adapter))

    def _claim_adapter(self, seq: Sequence) -> str:
        """'ready', 'loading' (held, load under way), 'cold' (no hold: not placeable now) or 'failed' (finished)."""
        if seq.adapter is None:
            return "ready"
        assert self.residency is not None
        if seq.seq_id not in self._holds:
            if not self.residency.can_make_resident(seq.adapter):
                if seq.seq_id not in self._prefetched:
                    self._prefetched.add(seq.seq_id)
                    self.residency.prefetch(seq.adapter.key)
                return "cold"
            self._holds[seq.seq_id] = self.residency.acquire(seq.adapter.key)
        hold = self._holds[seq.seq_id]
        if not hold.done():
            return "loading"
        if hold.exception() is not None:
            self._finish(seq, "error", str(hold.exception()), hold.exception())
            return "failed"
        return "ready"

    def _is_adapter_ready(self, seq: Sequence) -> bool:
        hold = self._holds.get(seq.seq_id)
        return hold is None or (hold.done() and hold.exception() is None)

    # ---------------------------------------------------------------- helpers

    def _prefill_share(self, budget: int, scheduled: set[Sequence]) -> int:
        """The most prefill tokens one tenant's running sequences get before admission: all of `budget` while one
        tenant has prompt tokens to feed, else an equal share among the tenants that do."""
        tenants = {seq.tenant for seq in self.waiting}
        tenants.update(seq.tenant for seq in self.running if seq not in scheduled)
        return budget if len(tenants) <= 1 else budget // len(tenants)

    def _feed_held_back(self, seqs: list[Sequence], budget: int, chunks: list[ScheduledChunk],
                        scheduled: set[Sequence]) -> None:
        """Give what is left of the budget to prefills cut short by their tenant's share, oldest first: a chunk
        grows (one chunk per sequence per step) or, for one that got nothing, starts."""
        config, blocks = self.config, self.block_manager
        for seq in seqs:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted by an older prefill since
            index = next((i for i, chunk in enumerate(chunks) if chunk.seq is seq), None)
            num_fed = 0 if index is None else chunks[index].num_tokens
            num_tokens = min(seq.num_uncomputed_tokens, config.chunk_limit, num_fed + budget,
                             blocks.num_allocatable_tokens(seq))
            if num_tokens <= num_fed:
                continue
            if index is None:
                budget -= self._schedule_chunk(seq, num_tokens, chunks, scheduled)
            else:
                blocks.allocate(seq, num_tokens)
                chunks[index] = self._chunk(seq, num_tokens)
                budget -= num_tokens - num_fed

    def _schedule_chunk(self, seq: Sequence, num_tokens: int, chunks: list[ScheduledChunk],
                        scheduled: set[Sequence]) -> int:
        self.block_manager.allocate(seq, num_tokens)
        chunks.append(self._chunk(seq, num_tokens))
        scheduled.add(seq)
        return num_tokens

    def _chunk(self, seq: Sequence, num_tokens: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        return ScheduledChunk(seq, start, seq.token_ids(start, start + num_tokens),
                              is_sampled=start + num_tokens == seq.num_tokens, lora_slot=self._lora_slot(seq))

    def _lora_slot(self, seq: Sequence) -> int | None:
        """The slot of the adapter `seq` holds (None: the base model), from its hold: only ready sequences are
        scheduled, and a held adapter's slot never changes, so nobody asks residency for it again."""
        if seq.adapter is None:
            return None
        hold = self._holds[seq.seq_id]
        assert hold.done() and hold.exception() is None, f"sequence {seq.seq_id} scheduled before its adapter is ready"
        return hold.result()

    def _preemption_victim(self, seq: Sequence, scheduled: set[Sequence]) -> Sequence | None:
        """A running sequence younger than `seq`, holding blocks, not in this step's batch: the youngest of the
        tenant running the most (one tenant: the youngest)."""
        candidates = []
        for other in reversed(self.running):
            if other.arrival <= seq.arrival:
                break
            if other.block_table and other not in scheduled:
                candidates.append(other)
        if len({other.tenant for other in candidates}) <= 1:
            return candidates[0] if candidates else None
        num_running = Counter(other.tenant for other in self.running)
        return max(candidates, key=lambda other: (num_running[other.tenant], other.arrival))

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        # Preempted sequences queue first, among themselves by arrival: they were admitted before anything behind.
        i = 0
        while i < len(self.waiting) and self.waiting[i].num_preemptions > 0 and self.waiting[i].arrival < seq.arrival:
            i += 1
        self.waiting.insert(i, seq)

    def _reap(self, now: float) -> None:
        """Finish what timed out, and running requests whose adapter failed to load."""
        for seq in list(self._seqs.values()):
            if seq.deadline is not None and seq.deadline < now:
                self._finish(seq, "timeout")
            elif seq.status is SequenceStatus.RUNNING and (hold := self._holds.get(seq.seq_id)) is not None:
                # Read the future once: the loader thread may complete it at any moment (a load that ends between
                # "not ready" and "done" would otherwise read as a failure with no exception).
                if hold.done() and (error := hold.exception()) is not None:
                    self._finish(seq, "error", str(error), error)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None,
                cause: BaseException | None = None) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        hold = self._holds.pop(seq.seq_id, None)
        if hold is not None:
            assert self.residency is not None and seq.adapter is not None
            self.residency.release(seq.adapter.key)
        self._prefetched.discard(seq.seq_id)
        del self._seqs[seq.seq_id]
        self._num_unfinished[seq.tenant] -= 1
        if not self._num_unfinished[seq.tenant]:  # why: forget tenants that went away; the maps stay bounded
            del self._num_unfinished[seq.tenant]
            self._last_admitted.pop(seq.tenant, None)
        seq.status, seq.finish_reason, seq.error, seq.error_cause = SequenceStatus.FINISHED, reason, error, cause
        self.num_timeouts += reason == "timeout"
        self.num_aborted += reason == "abort"
        self.num_errors += reason == "error"
        self._finished.append(seq)
