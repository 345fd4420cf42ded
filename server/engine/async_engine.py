"""The engine's async interface for the API: submit a request, iterate its deltas, abort by id.

The step loop runs on its own thread so the event loop never waits on the model. The two sides meet in an inbox
(requests to add, ids to abort) guarded by one Condition; deltas go back to each request's asyncio queue through
`call_soon_threadsafe`. Only the loop thread changes the Engine (the scheduler is single-threaded by design);
`Engine.prepare`, which reads nothing the loop changes, runs on the submitter's thread.

    stream = engine.submit(request)   # raises RequestError, QueueFullError, EngineStoppedError, AdapterNotFound now
    async for delta in stream: ...    # the last delta has finish_reason; `await stream.aclose()` aborts early

`submit` prepares the request (Engine.prepare: its one check, and its adapter version pinned with one registry read)
on the caller's thread, so the step loop never waits on the store, not even while an upload commits.
"""

import asyncio
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future

from lora_server.adapters_store import LoraAdapter
from lora_server.engine.adapters.keys import AdapterKey
from lora_server.engine.engine import Engine, EngineStats
from lora_server.engine.merging.control import MergeRefused
from lora_server.engine.request import (
    EngineRequest,
    EngineStoppedError,
    PreparedRequest,
    QueueFullError,
    RequestDelta,
    error_type_of,
)

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.25  # the idle loop wakes this often, so /health can tell an idle engine from a hung one
ADAPTER_WAIT_S = 0.002  # nothing could run (adapter loads in flight): look again this soon
QUEUE_COUNT_S = 1.0  # the per-adapter queue in the stats snapshot is counted this often (scrapes are seconds apart)


class RequestStream:
    """Async iterator of one request's deltas; ends after the delta with a finish_reason."""

    def __init__(self, request_id: str, tenant: str, engine: "AsyncEngine") -> None:
        self.request_id = request_id
        self.tenant = tenant
        self._engine = engine
        self._queue: asyncio.Queue[RequestDelta] = asyncio.Queue()
        self._finished = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestDelta:
        if self._finished:
            raise StopAsyncIteration
        delta = await self._queue.get()
        self._finished = delta.is_finished
        return delta

    async def aclose(self) -> None:
        """Abort the request if it has not finished (a client went away)."""
        if not self._finished:
            self._finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: Engine, max_pending: int = 1024, max_pending_per_tenant: int | None = None) -> None:
        if max_pending < 1 or (max_pending_per_tenant is not None and max_pending_per_tenant < 1):
            raise ValueError(f"max_pending ({max_pending}) and max_pending_per_tenant ({max_pending_per_tenant}) "
                             f"must be positive")
        self.engine = engine
        self.max_pending = max_pending  # unfinished requests, queued and running; more is a QueueFullError
        # The same, counted per tenant (None: max_pending), so one tenant's burst cannot take every slot.
        self.max_pending_per_tenant = min(max_pending_per_tenant or max_pending, max_pending)
        self._lock = threading.Condition()
        self._inbox: list[tuple[str, object]] = []  # ("add", PreparedRequest) | ("abort", request_id) | ("call", ...)
        self._streams: dict[str, tuple[RequestStream, asyncio.AbstractEventLoop]] = {}
        self._num_pending_by_tenant: Counter[str] = Counter()  # the unfinished requests in _streams, per tenant
        self._accepting = True
        self._stopping = False
        self._heartbeat = time.monotonic()
        self._stats = engine.stats()
        self._queue_counted_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)

    # ---------------------------------------------------------------- the API's side (event loop thread)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: EngineRequest) -> RequestStream:
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down and takes no new requests")
        # Here, not on the loop thread: a bad request or an unknown adapter fails at once (a 4xx), the version is the
        # newest at submission, and the step loop never reads the store.
        prepared = self.engine.prepare(request)
        with self._lock:
            if len(self._streams) >= self.max_pending:
                raise QueueFullError(f"{len(self._streams)} requests are already waiting or running "
                                     f"(the limit is {self.max_pending}); retry shortly")
            if self._num_pending_by_tenant[request.tenant] >= self.max_pending_per_tenant:
                raise QueueFullError(f"tenant {request.tenant!r} already has {self.max_pending_per_tenant} requests "
                                     f"waiting or running (the limit per tenant is {self.max_pending_per_tenant}); "
                                     f"retry shortly")
            if request.request_id in self._streams:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            stream = RequestStream(request.request_id, request.tenant, self)
            self._streams[request.request_id] = (stream, asyncio.get_running_loop())
            self._num_pending_by_tenant[request.tenant] += 1
            self._inbox.append(("add", prepared))
            self._lock.notify()
        return stream

    def abort(self, request_id: str) -> bool:
        with self._lock:
            if request_id not in self._streams:
                return False
            self._inbox.append(("abort", request_id))
            self._lock.notify()
        return True

    def stop_accepting(self) -> None:
        self._accepting = False

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._streams)

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting; wait until every submitted request has finished. False if time ran out first."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout_s
        while self.num_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.num_pending == 0

    def shutdown(self) -> None:
        """Stop the step loop; requests still running end with "abort"."""
        self._accepting = False
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            streams, self._streams = self._streams, {}
            self._num_pending_by_tenant.clear()
        for request_id, (stream, loop) in streams.items():
            self._deliver(stream, loop, RequestDelta(request_id, [], "", None, finish_reason="abort",
                                                     error="the server shut down"))

    def stats(self) -> EngineStats:
        """As of the last step (the loop thread takes the snapshot, so it is never torn)."""
        return self._stats

    def seconds_since_progress(self) -> float:
        """Since the step loop last finished a step or an idle wait; grows without bound if a step hangs."""
        return time.monotonic() - self._heartbeat

    def retire_adapter(self, tenant: str, adapter_id: str) -> None:
        if self.engine.residency is not None:
            self.engine.residency.retire_lineage(tenant, adapter_id)

    def put_uploaded_adapter(self, key: AdapterKey, adapter: LoraAdapter) -> None:
        """An upload stored `key`, parsing `adapter` to validate it: keep it in the host cache, so the first request
        for the new version does not parse its files again."""
        if self.engine.residency is not None:
            self.engine.residency.put_on_host(key, adapter)

    def request_merge(self, tenant: str, adapter_id: str) -> Future:
        """Merge the adapter's newest version at a step boundary (manual merge policy). A concurrent Future: None
        once merged, or MergeRefused; AdapterNotFound is raised at once."""
        if self.engine.merge is None or self.engine.adapter_catalog is None:
            raise MergeRefused("this engine serves no adapters")
        key = self.engine.adapter_catalog.pin(tenant, adapter_id).key  # on this thread: the loop never reads the store
        return self._call_on_loop_thread(lambda: self.engine.merge.request_merge(key), chain=True)

    def request_unmerge(self, tenant: str, adapter_id: str) -> Future:
        """Unmerge at the next step boundary; a concurrent Future: None, or MergeRefused."""
        if self.engine.merge is None:
            raise MergeRefused("this engine serves no adapters")
        return self._call_on_loop_thread(lambda: self.engine.merge.request_unmerge(tenant, adapter_id))

    def _call_on_loop_thread(self, call, chain: bool = False) -> Future:
        """Run `call` on the step-loop thread between steps; its result (or, with chain, the result of the Future it
        returns) completes the returned Future."""
        result: Future = Future()
        with self._lock:
            self._inbox.append(("call", (call, result, chain)))
            self._lock.notify()
        return result

    def adapter_tier(self, tenant: str, adapter_id: str) -> str:
        if self.engine.residency is None:
            return "disk"
        return self.engine.residency.tier_of(tenant, adapter_id)

    # ---------------------------------------------------------------- the step loop (its own thread)

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._lock:
                while not self._inbox and not self._has_work() and not self._stopping:
                    self._lock.wait(HEARTBEAT_S)
                    self._heartbeat = time.monotonic()
                if self._stopping:
                    return
                inbox, self._inbox = self._inbox, []
            deltas = [delta for op, arg in inbox if (delta := self._apply(op, arg)) is not None]
            if self._has_work():
                steps_before = engine.num_steps
                try:
                    deltas += engine.step()
                except Exception:  # a bug, not a bad request: keep serving, but say so loudly
                    logger.exception("the engine step raised; the loop carries on")
                if engine.num_steps == steps_before and not deltas:
                    with self._lock:
                        self._lock.wait(ADAPTER_WAIT_S)
            now = time.monotonic()
            if now - self._queue_counted_at >= QUEUE_COUNT_S:
                self._stats, self._queue_counted_at = engine.stats(), now
            else:  # the O(1) numbers every step; the per-adapter queue as last counted
                self._stats = engine.stats(queue_by_adapter=self._stats.queue_by_adapter)
            self._heartbeat = now
            self._dispatch(deltas)

    def _has_work(self) -> bool:
        # A pending merge needs steps too: it is carried out at a step boundary, and an idle engine has none.
        merge = self.engine.merge
        return self.engine.has_unfinished() or (merge is not None and merge.has_pending_merge)

    def _apply(self, op: str, arg: object) -> RequestDelta | None:
        if op == "abort":
            self.engine.abort(arg)  # its last delta comes from the next step
            return None
        if op == "call":
            call, result, chain = arg
            try:
                value = call()
            except Exception as error:
                result.set_exception(error)
                return None
            if chain:
                value.add_done_callback(lambda done: _copy_outcome(done, result))
            else:
                result.set_result(value)
            return None
        prepared: PreparedRequest = arg
        try:
            self.engine.add(prepared)
        except Exception as error:  # a bug (submit checked the request): end this request, not the loop
            logger.exception("request %s could not be queued", prepared.request_id)
            return RequestDelta(prepared.request_id, [], "", None, finish_reason="error", error=str(error),
                                error_type=error_type_of(error))
        return None

    def _dispatch(self, deltas: list[RequestDelta]) -> None:
        for delta in deltas:
            with self._lock:
                entry = self._streams.pop(delta.request_id) if delta.is_finished else \
                    self._streams.get(delta.request_id)
                if delta.is_finished:
                    self._forget_pending(entry[0].tenant)
            if entry is not None:
                self._deliver(*entry, delta)

    def _forget_pending(self, tenant: str) -> None:
        """One of `tenant`'s requests finished (called under the lock)."""
        self._num_pending_by_tenant[tenant] -= 1
        if not self._num_pending_by_tenant[tenant]:
            del self._num_pending_by_tenant[tenant]  # why: tenants come and go; the counter stays small

    @staticmethod
    def _deliver(stream: RequestStream, loop: asyncio.AbstractEventLoop, delta: RequestDelta) -> None:
        try:
            loop.call_soon_threadsafe(stream._queue.put_nowait, delta)
        except RuntimeError:  # its event loop is closed: nobody is listening any more
            pass


def _copy_outcome(source: Future, target: Future) -> None:
    if source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())
