"""Run a list of requests to completion on an Engine and collect each one's whole output: the offline command,
the tests and the benchmark use this; the API streams deltas instead."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from server.engine.adapter_key import AdapterKey
from server.engine.engine import Engine
from server.engine.request import EngineRequest, RequestDelta, TokenLogprob


@dataclass
class Completion:
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


def merge_and_wait(engine: Engine, adapter_id: str, tenant: str = "default") -> None:
    """Merge the adapter's newest version, stepping the engine until it is done (raises MergeRefused)."""
    key = AdapterKey(tenant, adapter_id, engine.adapters.latest_version(tenant, adapter_id))
    done = engine.merge.request_merge(key)
    while not done.done():
        engine.step()
    done.result()


def generate_all(engine: Engine, requests: Sequence[EngineRequest],
                 arrivals: Sequence[int] | None = None,
                 on_step: Callable[[Engine], None] | None = None) -> list[Completion]:
    """Completions in request order. `arrivals[i]` is the step before which request i is added (default: all at
    once), to exercise continuous batching; `on_step` is called after every step (tests use it to check invariants)."""
    arrivals = list(arrivals) if arrivals is not None else [0] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: arrivals[i])
    completions = {r.request_id: Completion(r.request_id) for r in requests}
    assert len(completions) == len(requests), "request ids must be unique"
    step, next_index = 0, 0
    while next_index < len(order) or engine.has_unfinished():
        while next_index < len(order) and arrivals[order[next_index]] <= step:
            engine.add_request(requests[order[next_index]])
            next_index += 1
        for delta in engine.step():
            completions[delta.request_id].add(delta)
        if on_step is not None:
            on_step(engine)
        step += 1
    return [completions[r.request_id] for r in requests]
