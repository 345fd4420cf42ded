"""The async interface: concurrent submits stream their deltas from the step-loop thread, errors come at submit,
aborts and closed streams free blocks, draining and shutdown end everything, the heartbeat shows an idle loop."""

import asyncio

import pytest

from lora_server.adapters_store import AdapterNotFound
from lora_server.demo import tasks
from lora_server.engine.async_engine import AsyncEngine
from lora_server.engine.request import EngineRequest, EngineStoppedError, QueueFullError, RequestError
from lora_server.engine.sampler import SamplingParams
from tests.engine.engine_helpers import open_demo_engine


@pytest.fixture
def engine(tmp_path):
    loaded = open_demo_engine(tmp_path / "store", max_num_seqs=8)
    async_engine = AsyncEngine(loaded, max_pending=6)
    async_engine.start()
    yield async_engine
    async_engine.shutdown()
    loaded.close()
    loaded.store.close()


@pytest.fixture
def tenant_engine(tmp_path):
    loaded = open_demo_engine(tmp_path / "store", max_num_seqs=8)
    async_engine = AsyncEngine(loaded, max_pending=6, max_pending_per_tenant=3)
    async_engine.start()
    yield async_engine
    async_engine.shutdown()
    loaded.close()
    loaded.store.close()


def request(engine: AsyncEngine, text: str, adapter: str | None = None, max_new_tokens: int = 30,
            **kwargs) -> EngineRequest:
    prompt = engine.engine.tokenizer.encode(tasks.make_prompt(text))
    return EngineRequest(prompt, SamplingParams(max_new_tokens=max_new_tokens), adapter_id=adapter, **kwargs)


async def collect(stream):
    return [delta async for delta in stream]


def test_concurrent_requests_stream_their_own_deltas(engine):
    async def main():
        names = [None, *tasks.ADAPTER_NAMES]
        streams = [engine.submit(request(engine, "stream me", name)) for name in names]
        results = await asyncio.gather(*(collect(s) for s in streams))
        for name, deltas in zip(names, results, strict=True):
            assert "".join(d.text for d in deltas) == tasks.TRANSFORMS[name or "copy"]("stream me")
            assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])
            assert len(deltas) > 3, "tokens arrive as they are made, not all at the end"
            assert deltas[0].queue_time_s is not None and deltas[0].queue_time_s >= 0
            assert deltas[-1].num_generated_tokens == sum(len(d.token_ids) for d in deltas)

    asyncio.run(main())
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == stats.num_kv_blocks_used == 0
    assert stats.residency.loads == len(tasks.ADAPTER_NAMES)


def test_errors_come_at_submit(engine):
    async def main():
        with pytest.raises(AdapterNotFound):
            engine.submit(request(engine, "x", "missing"))
        with pytest.raises(RequestError):
            engine.submit(EngineRequest([]))
        streams = [engine.submit(request(engine, f"queue {i}", max_new_tokens=60)) for i in range(6)]
        with pytest.raises(QueueFullError):
            engine.submit(request(engine, "one too many"))
        for stream in streams:
            await stream.aclose()
        while engine.num_pending:
            await asyncio.sleep(0.01)
        assert engine.stats().num_kv_blocks_used == 0

    asyncio.run(main())


def test_a_tenant_at_its_bound_is_refused_while_others_still_get_in(tenant_engine):
    engine = tenant_engine

    async def main():
        held = [engine.submit(request(engine, f"acme {i}", max_new_tokens=60, tenant="acme")) for i in range(3)]
        with pytest.raises(QueueFullError, match="tenant 'acme'.*limit per tenant is 3"):
            engine.submit(request(engine, "one too many", tenant="acme"))
        other = engine.submit(request(engine, "globex", tenant="globex"))  # 4 of 6 in all: room for others
        assert "".join(d.text for d in await collect(other)) == "globex"
        for stream in held:
            await stream.aclose()
        while engine.num_pending:
            await asyncio.sleep(0.01)
        again = [engine.submit(request(engine, f"again {i}", tenant="acme")) for i in range(3)]  # counted down
        assert [(await collect(s))[-1].finish_reason for s in again] == ["stop"] * 3

    asyncio.run(main())


def test_closing_a_stream_aborts_the_request_and_frees_its_blocks(engine):
    async def main():
        stream = engine.submit(request(engine, "a long one", max_new_tokens=100))
        first = await stream.__anext__()
        assert first.token_ids
        await stream.aclose()
        while engine.num_pending:
            await asyncio.sleep(0.01)
        assert engine.stats().num_kv_blocks_used == 0
        other = engine.submit(request(engine, "still fine", "upper"))
        assert "".join(d.text for d in await collect(other)) == "STILL FINE"

    asyncio.run(main())


def test_abort_by_id_ends_the_stream_with_abort(engine):
    async def main():
        stream = engine.submit(request(engine, "abort me", max_new_tokens=100, request_id="to-abort"))
        await stream.__anext__()
        assert engine.abort("to-abort")
        rest = await collect(stream)
        assert rest[-1].finish_reason == "abort"
        assert not engine.abort("to-abort")

    asyncio.run(main())


def test_drain_finishes_in_flight_requests_and_refuses_new_ones(engine):
    async def main():
        stream = engine.submit(request(engine, "drain", max_new_tokens=20))
        consumer = asyncio.create_task(collect(stream))
        assert await engine.drain(timeout_s=30)
        deltas = await consumer
        assert deltas[-1].finish_reason == "stop"
        with pytest.raises(EngineStoppedError):
            engine.submit(request(engine, "late"))

    asyncio.run(main())


def test_shutdown_aborts_what_is_still_running(engine):
    async def main():
        stream = engine.submit(request(engine, "cut short", max_new_tokens=100))
        await stream.__anext__()
        engine.shutdown()
        rest = await collect(stream)
        assert rest[-1].finish_reason == "abort"

    asyncio.run(main())


def test_the_idle_loop_keeps_its_heartbeat(engine):
    async def main():
        await asyncio.sleep(0.6)
        assert engine.seconds_since_progress() < 0.5

    asyncio.run(main())
