"""The engine: requests in, deltas out, one step at a time. Single-threaded; AsyncEngine runs it on its own thread.

    prepared = engine.prepare(request)  # checks it and pins its adapter version; RequestError, AdapterNotFound
    engine.add(prepared)                # queues it (engine.add_request(request) does both)
    while engine.has_unfinished():
        for delta in engine.step():     # one scheduled batch through the model, then what each request produced
            ...

`prepare` is where requests enter: the one check of a request and the one registry read for its adapter happen there,
on the caller's thread, so a step never reads the store. A step: the scheduler picks the batch (decodes, prefill
chunks, admissions), the model runner runs it and samples, the scheduler advances the sequences (stop tokens: EOS
unless ignore_eos, and stop_token_ids; length), then stop strings are checked on the new text (after min_tokens).
Requests that finished for any reason (stop, length, timeout, abort, error) get their last delta. `generate` runs a
list of requests to completion (the offline command, tests, benchmark).

Failures stay as small as they can: a request whose row cannot be sampled (non-finite logits from its adapter, a
draw that raises) ends alone with an error while the rest of its step goes on; a step that raises is run once more
before its requests end with an error, since a fault that cannot be pinned on one request may be transient.
"""

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from lora_server.adapters_store import AdapterNotFound
from lora_server.engine.adapters.catalog import AdapterCatalog
from lora_server.engine.adapters.keys import PinnedAdapter
from lora_server.engine.adapters.residency import Residency, ResidencyCounters
from lora_server.engine.merging.control import MergeControl, MergeStats
from lora_server.engine.model_runner import ModelRunner, SampledToken, StepResult
from lora_server.engine.request import (
    EngineRequest,
    PreparedRequest,
    RequestDelta,
    RequestError,
    TokenLogprob,
    check_request,
    error_type_of,
)
from lora_server.engine.sampler import make_generator
from lora_server.engine.scheduling.batch import ScheduledBatch
from lora_server.engine.scheduling.scheduler import Scheduler, SchedulerConfig
from lora_server.engine.scheduling.sequence import Sequence
from lora_server.engine.text_output import IncrementalText

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine for metrics and health: plain numbers, taken between steps."""

    num_running: int  # admitted: running, loading their adapter, or between prefill chunks
    num_waiting: int  # queued, or preempted and waiting to recompute
    num_kv_blocks: int
    num_kv_blocks_used: int
    num_preemptions: int  # since start
    num_steps: int
    num_prompt_tokens_total: int
    num_generated_tokens_total: int
    num_step_failures: int  # steps that raised on their retry too (their requests ended with an error)
    num_step_retries: int  # steps that raised once and were run again
    residency: ResidencyCounters | None = None  # None when the engine serves no adapters
    merge: MergeStats | None = None
    # (tenant, adapter id), or None for the base model -> (running, waiting) requests: the per-adapter queue.
    queue_by_adapter: dict[tuple[str, str] | None, tuple[int, int]] = field(default_factory=dict)

    @property
    def kv_cache_usage(self) -> float:
        return self.num_kv_blocks_used / self.num_kv_blocks


@dataclass
class Completion:
    """One request's whole output, as `Engine.generate` collects it from its deltas."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    error: str | None = None
    num_deltas: int = 0

    def add(self, delta: RequestDelta) -> None:
        self.token_ids += delta.token_ids
        self.text += delta.text
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.finish_reason, self.error = delta.finish_reason, delta.error
        self.num_deltas += 1


@dataclass
class _RequestState:
    request: EngineRequest
    seq: Sequence
    text: IncrementalText
    arrival: float
    first_scheduled: float | None = None
    num_tokens_sent: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)


class Engine:
    def __init__(self, runner: ModelRunner, config: SchedulerConfig, tokenizer, vocab_size: int,
                 adapter_catalog: AdapterCatalog | None = None, residency: Residency | None = None,
                 merge: MergeControl | None = None) -> None:
        assert (adapter_catalog is None) == (residency is None), "adapters need both a catalog and residency"
        self.runner = runner
        self.merge = merge  # None: never merged
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.adapter_catalog = adapter_catalog  # None: the base model only
        self.residency = residency
        self.scheduler = Scheduler(config, residency)
        self._requests: dict[str, _RequestState] = {}
        self._by_seq: dict[int, _RequestState] = {}
        self._next_seq_id = 0
        self.num_steps = 0
        self.num_prompt_tokens_total = 0
        self.num_generated_tokens_total = 0
        self.num_step_failures = 0  # steps that raised twice: their requests ended with an error
        self.num_step_retries = 0  # steps that raised and were run again

    # ---------------------------------------------------------------- requests in

    def prepare(self, request: EngineRequest) -> PreparedRequest:
        """Check `request` and pin its adapter version: where requests enter the engine. Raises RequestError for what
        no step could run, AdapterNotFound / AdapterUnusable for its adapter. Reads the registry when it names an
        adapter, so call it on the submitter's thread (AsyncEngine.submit does), never on the step loop's."""
        check_request(request, self.config.max_model_len, self.vocab_size)
        return PreparedRequest(request, self._pin(request))

    def add(self, prepared: PreparedRequest) -> None:
        """Queue a prepared request; it joins the next step. No store read and no check but its id."""
        request = prepared.request
        if request.request_id in self._requests:
            raise RequestError(f"request id {request.request_id!r} is already running")
        sampling = request.sampling
        # The sequence's stop tokens: the scheduler ends it on any of them, and the sampler keeps them from being
        # drawn before min_tokens.
        eos = frozenset() if sampling.ignore_eos else frozenset(self.tokenizer.eos_token_ids)
        seq = Sequence(self._next_seq_id, list(request.prompt_token_ids), sampling.max_new_tokens,
                       eos | frozenset(sampling.stop_token_ids), tenant=request.tenant, adapter=prepared.adapter,
                       sampling=sampling, generator=make_generator(sampling),
                       num_logprobs=request.logprobs, deadline=request.deadline)
        self.scheduler.add(seq)
        self._next_seq_id += 1
        text = IncrementalText(self.tokenizer.decode, request.stop, sampling.include_stop_str_in_output,
                               sampling.min_tokens)
        state = _RequestState(request, seq, text, time.monotonic())
        self._requests[request.request_id] = state
        self._by_seq[seq.seq_id] = state
        self.num_prompt_tokens_total += seq.num_prompt_tokens

    def add_request(self, request: EngineRequest) -> None:
        """prepare, then add: for callers on the step loop's own thread (offline generation, tests)."""
        self.add(self.prepare(request))

    def abort(self, request_id: str) -> bool:
        """Cancel: its blocks and adapter hold go at once; its last delta comes from the next step."""
        state = self._requests.get(request_id)
        return state is not None and self.scheduler.abort(state.seq.seq_id)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def _pin(self, request: EngineRequest) -> PinnedAdapter | None:
        if request.adapter_id is None:
            return None
        if self.adapter_catalog is None:
            raise AdapterNotFound(f"adapter {request.adapter_id!r}: this server serves the base model only")
        return self.adapter_catalog.pin(request.tenant, request.adapter_id, request.adapter_version)

    # ---------------------------------------------------------------- one step

    def step(self) -> list[RequestDelta]:
        batch = self.scheduler.schedule(time.monotonic())
        sampled = self._run(batch) if batch is not None else {}
        if self.merge is not None:  # a switch happens here, between two steps
            self.merge.after_step(batch)
        self.num_generated_tokens_total += len(sampled)

        for seq_id, token in sampled.items():
            state = self._by_seq[seq_id]
            if token.logprob is not None:
                state.pending_logprobs.append(token.logprob)
            output = state.seq.output_token_ids
            # Finished with "stop" before the text is read: a stop token ended it, whose text goes (as vLLM's) unless
            # include_stop_str_in_output.
            keep_stop_token = state.seq.finish_reason != "stop" or state.request.sampling.include_stop_str_in_output
            if state.text.update(output, len(output) - (not keep_stop_token)) and not state.seq.is_finished:
                self.scheduler.finish(seq_id, "stop")

        deltas = []
        finished = {seq.seq_id for seq in self.scheduler.pop_finished()}
        for seq_id in sampled.keys() | finished:
            deltas.append(self._delta(self._by_seq[seq_id], final=seq_id in finished))
        return deltas

    def _run(self, batch: ScheduledBatch) -> dict[int, SampledToken]:
        now = time.monotonic()
        for chunk in batch.chunks:
            state = self._by_seq[chunk.seq.seq_id]
            if state.first_scheduled is None:
                state.first_scheduled = now
        self.num_steps += 1
        result = self._run_with_retry(batch)
        if result is None:
            return {}
        for seq_id, why in result.failed.items():  # before on_step_done, which then skips them
            logger.warning("request %s ended with an error: %s", self._by_seq[seq_id].request.request_id, why)
            self.scheduler.finish(seq_id, "error", why)
        self.scheduler.on_step_done(batch, {seq_id: s.token_id for seq_id, s in result.sampled.items()})
        return result.sampled

    def _run_with_retry(self, batch: ScheduledBatch) -> StepResult | None:
        """The runner's result; None when it raised twice and the batch's requests were ended with an error.

        A rerun is safe (see ModelRunner.run): nothing between the two attempts touches the scheduler, so the
        batch's block tables and positions are the same, and the rerun rewrites the same KV cache entries."""
        try:
            return self.runner.run(batch)
        except Exception as error:  # why: a fault that names no one request may be transient; one more try
            logger.warning("a model step of %d requests failed (%s: %s); running it again", batch.num_seqs,
                           type(error).__name__, error)
            self.num_step_retries += 1
        try:
            return self.runner.run(batch)
        except Exception as error:  # why: one bad step must fail its own requests, not the server
            logger.exception("a model step failed twice; finishing its %d requests with an error", batch.num_seqs)
            self.num_step_failures += 1
            for chunk in batch.chunks:
                self.scheduler.finish(chunk.seq.seq_id, "error", f"the model step failed: {error}")
            return None

    def _delta(self, state: _RequestState, final: bool) -> RequestDelta:
        seq = state.seq
        new_tokens = seq.output_token_ids[state.num_tokens_sent:]
        first_tokens = state.num_tokens_sent == 0 and bool(new_tokens)
        state.num_tokens_sent = len(seq.output_token_ids)
        logprobs = state.pending_logprobs if state.request.logprobs is not None else None
        state.pending_logprobs = []
        delta = RequestDelta(
            request_id=state.request.request_id,
            token_ids=new_tokens,
            text=state.text.take_delta(final),
            logprobs=logprobs,
            finish_reason=seq.finish_reason if final else None,
            error=seq.error if final else None,
            error_type=error_type_of(seq.error_cause) if final and seq.finish_reason == "error" else None,
            adapter_version=seq.adapter_version,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=len(seq.output_token_ids),
            queue_time_s=(state.first_scheduled - state.arrival) if first_tokens and state.first_scheduled else None,
        )
        if final:
            del self._requests[state.request.request_id]
            del self._by_seq[seq.seq_id]
        return delta

    # ---------------------------------------------------------------- whole runs (offline, tests, benchmark)

    def generate(self, requests: list[EngineRequest | PreparedRequest], arrivals: list[int] | None = None,
                 on_step: Callable[["Engine"], None] | None = None) -> list[Completion]:
        """Run `requests` to completion; their whole outputs, in request order. `arrivals[i]` is the step before which
        request i is added (default: all at once), to exercise continuous batching; `on_step` is called after every
        step (tests use it to check invariants). The API streams deltas instead."""
        arrivals = list(arrivals) if arrivals is not None else [0] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: arrivals[i])
        completions = {r.request_id: Completion(r.request_id) for r in requests}
        assert len(completions) == len(requests), "request ids must be unique"
        step, next_index = 0, 0
        while next_index < len(order) or self.has_unfinished():
            while next_index < len(order) and arrivals[order[next_index]] <= step:
                request = requests[order[next_index]]
                self.add(request if isinstance(request, PreparedRequest) else self.prepare(request))
                next_index += 1
            for delta in self.step():
                completions[delta.request_id].add(delta)
            if on_step is not None:
                on_step(self)
            step += 1
        return [completions[r.request_id] for r in requests]

    def merge_and_wait(self, adapter_id: str, tenant: str = "default") -> None:
        """Merge the adapter's newest version, stepping the engine until it is done (raises MergeRefused)."""
        assert self.merge is not None and self.adapter_catalog is not None, "this engine serves no adapters"
        done = self.merge.request_merge(self.adapter_catalog.pin(tenant, adapter_id).key)
        while not done.done():
            self.step()
        done.result()

    # ---------------------------------------------------------------- observation

    def stats(self, queue_by_adapter: dict[tuple[str, str] | None, tuple[int, int]] | None = None) -> EngineStats:
        """`queue_by_adapter`: an earlier count to carry over instead of counting now (a walk over every running and
        waiting request, which the async engine does at most once a second rather than every step)."""
        blocks = self.scheduler.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_kv_blocks=blocks.num_blocks,
            num_kv_blocks_used=blocks.num_used_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
            num_prompt_tokens_total=self.num_prompt_tokens_total,
            num_generated_tokens_total=self.num_generated_tokens_total,
            num_step_failures=self.num_step_failures,
            num_step_retries=self.num_step_retries,
            residency=self.residency.counters() if self.residency is not None else None,
            merge=self.merge.stats() if self.merge is not None else None,
            queue_by_adapter=self._queue_by_adapter() if queue_by_adapter is None else queue_by_adapter,
        )

    def _queue_by_adapter(self) -> dict[tuple[str, str] | None, tuple[int, int]]:
        def lineage(seq: Sequence) -> tuple[str, str] | None:
            return None if seq.adapter_id is None else (seq.tenant, seq.adapter_id)

        running = Counter(map(lineage, self.scheduler.running))
        waiting = Counter(map(lineage, self.scheduler.waiting))
        return {key: (running[key], waiting[key]) for key in running.keys() | waiting.keys()}
