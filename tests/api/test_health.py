"""/health: green while the engine loop makes progress, red when it has not for `health_stall_s` (a hung step); and
the probes of a real server."""

from lora_server.api.routes_ops import health_of


class FakeEngine:
    def __init__(self, seconds_since_progress: float) -> None:
        self._idle = seconds_since_progress

    def seconds_since_progress(self) -> float:
        return self._idle


def test_a_loop_making_progress_is_healthy():
    status, body = health_of(FakeEngine(0.2), load_failed=False, stall_s=60)
    assert status == 200 and body == {"status": "ok", "seconds_since_progress": 0.2}


def test_a_hung_loop_turns_health_red():
    status, body = health_of(FakeEngine(61.0), load_failed=False, stall_s=60)
    assert status == 503 and "no progress for 61.0 s" in body["error"]["message"]


def test_loading_is_alive_and_a_failed_load_is_not():
    assert health_of(None, load_failed=False, stall_s=60) == (200, {"status": "loading"})
    assert health_of(None, load_failed=True, stall_s=60)[0] == 503


def test_a_real_idle_server_is_healthy_and_ready(anonymous):
    health = anonymous.get("/health")
    assert health.status_code == 200 and health.json()["seconds_since_progress"] < 5, "the idle loop heartbeats"
    assert anonymous.get("/ready").json() == {"status": "ready", "model": "demo"}
