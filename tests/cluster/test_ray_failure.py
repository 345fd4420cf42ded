"""A replica killed (SIGKILL) mid-stream, on the local Ray cluster: its streaming request ends with an error event,
its requests that had sent nothing yet are retried on the other replica, new requests are served by the other, Ray
restarts the killed one, and no adapter is lost. Runs after test_ray_cluster.py (same session cluster)."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.helpers import LONG_MAX_NEW_TOKENS, LONG_PROMPT, expected, generate, upload

REPLICA_HEADER = "x-lora-replica"
REPLICA_LABEL = "replica"
RESTART_TIMEOUT_S = 120
NUM_WAITING = 4  # non-streaming requests in flight on the replica when it dies: they have sent nothing yet


def replicas(client: httpx.Client) -> set[str]:
    """The replicas the ingress's /metrics has heard from."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return {sample.labels[REPLICA_LABEL] for family in text_string_to_metric_families(response.text)
            for sample in family.samples if REPLICA_LABEL in sample.labels}


def replicas_once(client: httpx.Client, done, what: str) -> set[str]:
    """replicas(client), read until `done` of it holds (bounded)."""
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while not done(found := replicas(client)):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {found}"
        time.sleep(0.5)
    return found


def pid_of(replica: str) -> int:
    """The process of a replica: the one holding its cache directory open (named after it; see app.py)."""
    marker = f"lora-server-replica-{replica}-"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(marker in os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return int(pid)
        except OSError:
            continue  # another user's process, or one that just exited
    raise AssertionError(f"no process holds replica {replica}'s cache open")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds replica processes through /proc")
def test_a_replica_killed_mid_stream(cluster):
    with httpx.Client(base_url=cluster.url, timeout=120) as client:
        uploaded = {"kill-up": "upper", "kill-rev": "reverse"}
        for adapter_id, demo in uploaded.items():
            assert upload(client, adapter_id, demo).status_code == 201
        names = replicas_once(client, lambda found: len(found) == 2, "two replicas' metrics")
        pids = {name: pid_of(name) for name in names}

        # In flight at once: requests that send nothing until they finish, and one stream that has sent tokens.
        waiting: list[httpx.Response] = []
        body = {"prompt": LONG_PROMPT, "max_new_tokens": LONG_MAX_NEW_TOKENS}

        def post_waiting() -> None:
            with httpx.Client(base_url=cluster.url, timeout=120) as own:  # one connection each, like clients
                waiting.append(own.post("/v1/generate", json=body))

        threads = [threading.Thread(target=post_waiting) for _ in range(NUM_WAITING)]
        for thread in threads:
            thread.start()
        long_stream = {"model": "demo", "prompt": LONG_PROMPT, "max_tokens": LONG_MAX_NEW_TOKENS, "stream": True}
        with client.stream("POST", "/v1/completions", json=long_stream) as stream:
            assert stream.status_code == 200  # sent once the first token exists
            victim = stream.headers[REPLICA_HEADER]
            os.kill(pids[victim], signal.SIGKILL)
            events = [line[len("data: "):] for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] != "[DONE]", "the stream finished before the replica died: nothing was tested"
        assert json.loads(events[-1])["error"]["code"] == "replica_failed", events[-3:]
        assert all("error" not in json.loads(event) for event in events[:-1])
        for thread in threads:
            thread.join()
        survivor = (names - {victim}).pop()
        # Those that had sent nothing were retried: every one answered, by a replica alive now.
        assert [response.status_code for response in waiting] == [200] * NUM_WAITING, [r.text for r in waiting]
        assert {response.headers[REPLICA_HEADER] for response in waiting} <= {victim, survivor}

        for adapter_id, demo in uploaded.items():  # new requests: the other replica serves them, the restart or not
            response = generate(client, adapter=adapter_id)
            assert response.status_code == 200 and response.json()["text"] == expected(demo), response.text
            assert response.headers[REPLICA_HEADER] != victim

        # Ray restarts it (a new replica, a new name); the killed one's metrics drop out.
        now = replicas_once(client, lambda found: len(found) == 2 and victim not in found,
                            "Ray to restart the killed replica")
        (restarted,) = now - {survivor}
        assert pid_of(restarted) != pids[victim]

        # No adapter lost: every adapter uploaded is listed and served, also by the restarted replica (empty cache).
        listed = {adapter["id"] for adapter in client.get("/v1/adapters").json()["data"]}
        assert set(uploaded) <= listed
        served_by = set()
        for _ in range(20):
            for adapter_id in sorted(listed):
                response = generate(client, adapter=adapter_id)
                assert response.status_code == 200, response.text
                served_by.add(response.headers[REPLICA_HEADER])
            if restarted in served_by:
                break
        assert restarted in served_by, served_by
