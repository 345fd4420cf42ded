"""SIGTERM drains: new requests get 503 and /ready turns red at once, requests in flight run to their end, and the
process exits 0. A client still sending its body does not hold the drain: it gets a JSON 503 when the drain ends."""

import json
import socket
import threading

import httpx

from tests.api.helpers import LONG_MAX_NEW_TOKENS, LONG_PROMPT, error_of, num_unfinished, wait_for
from tests.api.raw_http import half_body_request, parse_response, read_until_closed

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
    # The drain server's --drain-timeout is 60 s and its --body-timeout 30 s: if this client held the drain, the
    # process could not exit within the 30 s the test waits below.
    half_sent = socket.create_connection(("127.0.0.1", drain_server.port), timeout=30)
    half_sent.sendall(half_body_request())

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
    with half_sent:
        status, headers, body = parse_response(read_until_closed(half_sent))
    assert status == 503 and headers["connection"] == "close", (status, headers, body)
    assert json.loads(body)["error"]["type"] == "service_unavailable"
    assert drain_server.process.wait(timeout=30) == 0, drain_server.log()
    assert "Traceback" not in drain_server.log(), drain_server.log()
    client.close()

