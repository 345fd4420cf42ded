"""The engine: requests in, deltas out, one step at a time. Single-threaded; AsyncEngine runs it on its own thread.

    engine.add_request(request)      # validates and pins the adapter version; raises RequestError, AdapterNotFound
    while engine.has_unfinished():
        for delta in engine.step():  # one scheduled batch through the model, then what each request produced
            ...

A step: the scheduler picks the batch (decodes, prefill chunks, admissions), the model runner runs it and samples,
the scheduler advances the sequences (EOS, length), then stop strings are checked on the new text. Requests that
finished for any reason (stop, length, timeout, abort, error) get their last delta.

Failures stay as small as they can: a request whose row cannot be sampled (non-finite logits from its adapter, a
draw that raises) ends alone with an error while the rest of its step goes on; a step that raises is run once more
before its requests end with an error, since a fault that cannot be pinned on one request may be transient.
"""

import logging
import time
from dataclasses import dataclass, field

from server.engine.adapter_gate import AdapterGate
from server.engine.merge_control import MergeControl
from server.engine.model_runner import MAX_LOGPROBS, ModelRunner, SampledToken, StepResult
from server.engine.request import EngineRequest, RequestDelta, RequestError, TokenLogprob, error_type_of
from server.engine.scheduled_batch import ScheduledBatch
from server.engine.scheduler import Scheduler
from server.engine.scheduler_config import SchedulerConfig
from server.engine.sequence import Sequence
from server.engine.stats import EngineStats
from server.engine.text_output import IncrementalText

logger = logging.getLogger(__name__)

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


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
                 adapters: AdapterGate | None = None, merge: MergeControl | None = None) -> None:
        self.runner = runner
        self.merge = merge  # None: never merged
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.adapters = adapters  # None: the base model only
        self.scheduler = Scheduler(config, adapters)
        self._requests: dict[str, _RequestState] = {}
        self._by_seq: dict[int, _RequestState] = {}
        self._num_logprobs: dict[int, int] = {}  # seq_id -> alternatives asked for, for requests that want logprobs
        self._next_seq_id = 0
        self.num_steps = 0
        self.num_prompt_tokens_total = 0
        self.num_generated_tokens_total = 0
        self.num_step_failures = 0  # steps that raised twice: their requests ended with an error
        self.num_step_retries = 0  # steps that raised and were run again

    # ---------------------------------------------------------------- requests in

    def add_request(self, request: EngineRequest) -> None:
        self.check_request(request)
        if request.request_id in self._requests:
            raise RequestError(f"request id {request.request_id!r} is already running")
        eos = frozenset(self.tokenizer.eos_token_ids)
        seq = Sequence(self._next_seq_id, list(request.prompt_token_ids), request.sampling.max_new_tokens, eos,
                       adapter_id=request.adapter_id, tenant=request.tenant,
                       adapter_version=request.adapter_version, sampling=request.sampling,
                       deadline=request.deadline)
        self.scheduler.add(seq)  # pins the adapter's newest version; AdapterNotFound for an unknown one
        self._next_seq_id += 1
        state = _RequestState(request, seq, IncrementalText(self.tokenizer.decode, request.stop), time.monotonic())
        self._requests[request.request_id] = state
        self._by_seq[seq.seq_id] = state
        if request.logprobs is not None:
            self._num_logprobs[seq.seq_id] = request.logprobs
        self.num_prompt_tokens_total += seq.num_prompt_tokens

    def check_request(self, request: EngineRequest) -> None:
        """Raise RequestError for what no step could run (checked before anything is queued)."""
        prompt, max_len = request.prompt_token_ids, self.config.max_model_len
        if not prompt:
            raise RequestError("the prompt is empty")
        if len(prompt) >= max_len:
            raise RequestError(f"the prompt has {len(prompt)} tokens; this model takes at most {max_len} tokens "
                               f"in all, so a prompt may have at most {max_len - 1}")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in prompt):
            raise RequestError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(request.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in request.stop):
            raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_STRING_CHARS} "
                               f"characters each")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
            raise RequestError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {request.logprobs}")

    def abort(self, request_id: str) -> bool:
        """Cancel: its blocks and adapter hold go at once; its last delta comes from the next step."""
        state = self._requests.get(request_id)
        return state is not None and self.scheduler.abort(state.seq.seq_id)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

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
            if state.text.update(state.seq.output_token_ids) and not state.seq.is_finished:
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
        batch's block tables and positions are the same, and the rerun rewrites the same KV cache slots."""
        try:
            return self.runner.run(batch, self._num_logprobs)
        except Exception as error:  # why: a fault that names no one request may be transient; one more try
            logger.warning("a model step of %d requests failed (%s: %s); running it again", batch.num_seqs,
                           type(error).__name__, error)
            self.num_step_retries += 1
        try:
            return self.runner.run(batch, self._num_logprobs)
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
            self._num_logprobs.pop(seq.seq_id, None)
            self.runner.forget(seq.seq_id)
        return delta

    # ---------------------------------------------------------------- observation

    def stats(self) -> EngineStats:
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
            residency=self.adapters.residency.counters() if self.adapters is not None else None,
            merge=self.merge.stats() if self.merge is not None else None,
        )
