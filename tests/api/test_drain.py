"""SIGTERM drains: new requests get 503 and /ready turns red at once, requests in flight run to their end, and the
process exits 0."""

import threading

import httpx

from tests.api.helpers import LONG_MAX_NEW_TOKENS, LONG_PROMPT, error_of, num_unfinished, wait_for

NUM_IN_FLIGHT = 3  # one running, two queued behind it (the drain server runs one sequence at a time)


def test_sigterm_drains_in_flight_requests_then_exits_0(drain_server):
    client = httpx.Client(base_url=drain_server.url, timeout=60)
    results: list[httpx.Response] = []

    def long_request() -> None:
        with httpx.Client(base_url=drain_server.url, timeout=60) as own:
            results.append(own.post("/v1/generate", json={"prompt": LONG_PROMPT,
                                                          "max_new_tokens": LONG_MAX_NEW_TOKENS}))

    threads = [threading.Thread(target=long_request) for _ in range(NUM_IN_FLIGHT)]
    for thread in threads:
        thread.start()
    wait_for(lambda: num_unfinished(client) == NUM_IN_FLIGHT)

    drain_server.terminate()
    wait_for(lambda: client.get("/ready").status_code == 503)
    refused = client.post("/v1/generate", json={"prompt": "x => "})
    assert refused.status_code == 503 and error_of(refused)["type"] == "service_unavailable"
    assert refused.headers["connection"] == "close"
    assert client.get("/health").status_code == 200, "draining is not dying"

    for thread in threads:
        thread.join()
    assert [r.status_code for r in results] == [200] * NUM_IN_FLIGHT
    assert [r.json()["usage"]["completion_tokens"] for r in results] == [LONG_MAX_NEW_TOKENS] * NUM_IN_FLIGHT
    assert drain_server.process.wait(timeout=30) == 0, drain_server.log()
    client.close()

