"""The server's lifecycle without the model: a drain that runs out of time aborts what is left; a store that is
already open stops a second server with a clear message and exit status 1; a SIGTERM while the model loads stops it
with exit status 0."""

import asyncio
import os
import subprocess
import sys
import time

import httpx
import pytest

from lora_server.api.config import ApiConfig
from lora_server.api.state import Served, ServerState
from tests.api.server_process import ROOT, STARTUP_TIMEOUT_S, ServerProcess, free_port


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
    done = subprocess.run([sys.executable, "-m", "lora_server.api.serve", "--port", str(free_port()), "--store",
                           str(server.store_dir)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))
    assert done.returncode == 1
    assert f"adapter store {server.store_dir} is already open" in done.stderr
    assert "Traceback" not in done.stderr


def test_sigterm_while_the_model_loads_exits_0_saying_so(tmp_path):
    server = ServerProcess(tmp_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:  # the port opens before the model loads (the demo takes a few seconds): signal at the first 503
            assert server.process.poll() is None and time.monotonic() < deadline, server.log()
            try:
                status = httpx.get(f"{server.url}/ready", timeout=1).status_code
            except httpx.TransportError:
                time.sleep(0.01)
                continue
            if status == 200:
                pytest.skip("the model loaded before the port answered: nothing to interrupt")
            break
        server.terminate()
        returncode = server.process.wait(timeout=30)
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    if "ready: serving" in log:
        pytest.skip("the model finished loading before the signal took effect")
    assert returncode == 0, log
    assert "SIGTERM before the model was loaded: stopping now" in log and "stopped while loading the model" in log
    assert "loading the model failed" not in log and "Traceback" not in log, log
