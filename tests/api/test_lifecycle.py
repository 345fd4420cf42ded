"""The server's lifecycle without the model: a drain that runs out of time aborts what is left; a store that is
already open stops a second server with a clear message and exit status 1."""

import asyncio
import os
import subprocess
import sys

from server.api.config import ApiConfig
from server.api.state import Served, ServerState
from tests.api.server_process import ROOT, free_port


class FakeEngine:
    def __init__(self, state: ServerState) -> None:
        self.state, self.calls = state, []

    def stop_accepting(self) -> None:
        self.calls.append("stop_accepting")

    def shutdown(self) -> None:  # every stream gets its last delta: the responses in flight end
        self.calls.append("shutdown")
        self.state.num_in_flight = 0


def test_a_drain_that_runs_out_of_time_aborts_what_is_left():
    state = ServerState(ApiConfig(), None, loader=lambda: None)
    engine = FakeEngine(state)
    state.served = Served(engine, None, None)
    state.num_in_flight = 2
    assert asyncio.run(state.drain(timeout_s=0.05)) is False
    assert engine.calls == ["stop_accepting", "shutdown"] and state.draining and not state.is_ready


def test_a_drain_with_nothing_in_flight_is_immediate():
    state = ServerState(ApiConfig(), None, loader=lambda: None)
    engine = FakeEngine(state)
    state.served = Served(engine, None, None)
    assert asyncio.run(state.drain(timeout_s=30)) is True and engine.calls == ["stop_accepting"]


def test_a_second_server_on_an_open_store_exits_1_saying_why(server):
    done = subprocess.run([sys.executable, "-m", "server.api.serve", "--port", str(free_port()), "--store",
                           str(server.store_dir)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1
    assert f"adapter store {server.store_dir} is already open" in done.stderr
    assert "Traceback" not in done.stderr
