"""Slow clients cannot hold the server: headers slower than --header-timeout and bodies slower than --body-timeout get
a JSON 408 and a closed connection, and a request waiting on its client for its body is not in flight (a drain does
not wait for it; when the drain ends, the body is cut short with a 503)."""

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import pytest

from lora_server.api.config import ApiConfig
from lora_server.api.middleware import AccountingMiddleware, BodyCut, BodyTimeout
from lora_server.api.state import ServerState
from tests.api.raw_http import half_body_request, parse_response, read_response, read_until_closed
from tests.api.server_process import ServerProcess

TIMEOUT_S = 1.0  # the slow-client server's --header-timeout and --body-timeout
ANSWER_WITHIN_S = 15  # a socket read that takes longer means the server never answered


@pytest.fixture(scope="module")
def slow_client_server(api_root) -> Iterator[ServerProcess]:
    server = ServerProcess(api_root / "slow-clients", "--header-timeout", str(TIMEOUT_S), "--body-timeout",
                           str(TIMEOUT_S))
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=ANSWER_WITHIN_S)


# ---------------------------------------------------------------- the real server


def test_a_body_slower_than_the_body_timeout_gets_a_json_408_and_is_closed(slow_client_server):
    with connect(slow_client_server) as sock:
        sent_at = time.monotonic()
        sock.sendall(half_body_request())
        status, headers, body = parse_response(read_until_closed(sock))
        waited = time.monotonic() - sent_at
    assert status == 408 and headers["connection"] == "close", (status, headers)
    error = json.loads(body)["error"]
    assert "--body-timeout" in error["message"] and error["type"] == "invalid_request_error", error
    assert waited >= TIMEOUT_S


@pytest.mark.parametrize("sent", [b"POST /v1/generate HTTP/1.1\r\nHost: te", b"GE"])
def test_headers_slower_than_the_header_timeout_get_a_json_408_and_are_closed(slow_client_server, sent):
    with connect(slow_client_server) as sock:
        sock.sendall(sent)
        status, headers, body = parse_response(read_until_closed(sock))
    assert status == 408 and headers["connection"] == "close" and headers["content-type"] == "application/json"
    assert "--header-timeout" in json.loads(body)["error"]["message"]


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(slow_client_server):
    with connect(slow_client_server) as sock:
        assert read_until_closed(sock) == b""


def test_the_header_timeout_counts_from_a_requests_first_byte_on_a_kept_alive_connection(slow_client_server):
    request = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"
    with connect(slow_client_server) as sock:
        for _ in range(2):
            sock.sendall(request)
            response = read_response(sock)
            assert response.startswith(b"HTTP/1.1 200"), response
            time.sleep(TIMEOUT_S * 1.5)  # idle longer than the header timeout, shorter than uvicorn's keep-alive (5 s)


# ---------------------------------------------------------------- in flight, in process


class Client:
    """A request's client, as the ASGI app sees it: body chunks when the test sends them."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[dict] = asyncio.Queue()

    def send_chunk(self, data: bytes, more: bool) -> None:
        self.messages.put_nowait({"type": "http.request", "body": data, "more_body": more})

    async def receive(self) -> dict:
        return await self.messages.get()


async def read_body_then_wait(scope, receive, send, finish: asyncio.Event) -> None:
    while (await receive()).get("more_body"):
        pass
    await finish.wait()  # the request's work, after its body
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def http_scope(content_length: int) -> dict:
    return {"type": "http", "path": "/v1/generate", "headers": [(b"content-length", str(content_length).encode())]}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_request_is_in_flight_only_while_it_is_not_waiting_on_its_client():
    async def main() -> None:
        state = ServerState(ApiConfig(body_timeout_s=60), None, loader=lambda: None)
        finish, client, sent = asyncio.Event(), Client(), []

        async def app(scope, receive, send):
            await read_body_then_wait(scope, receive, send, finish)

        async def send(message):
            sent.append(message)

        request = asyncio.ensure_future(AccountingMiddleware(app, state, routes=[])(http_scope(8), client.receive,
                                                                                   send))
        await settle()
        assert state.num_in_flight == 0, "waiting for its body"
        client.send_chunk(b"1234", more=True)
        await settle()
        assert state.num_in_flight == 0, "waiting for the rest of its body"
        client.send_chunk(b"5678", more=False)
        await settle()
        assert state.num_in_flight == 1, "its body is in: now it is work"
        finish.set()
        await request
        assert state.num_in_flight == 0 and sent[0]["status"] == 200

    asyncio.run(main())


def test_a_drain_does_not_wait_for_a_half_sent_body_and_then_cuts_it():
    async def main() -> None:
        state = ServerState(ApiConfig(body_timeout_s=60), None, loader=lambda: None)
        client, sent = Client(), []

        async def app(scope, receive, send):
            await read_body_then_wait(scope, receive, send, asyncio.Event())

        async def send(message):
            sent.append(message)

        client.send_chunk(b"1234", more=True)
        request = asyncio.ensure_future(AccountingMiddleware(app, state, routes=[])(http_scope(8), client.receive,
                                                                                   send))
        await settle()
        assert await asyncio.wait_for(state.drain(timeout_s=60), timeout=10) is True
        with pytest.raises(BodyCut) as cut:
            await asyncio.wait_for(request, timeout=10)
        assert cut.value.status_code == 503 and state.num_in_flight == 0

    asyncio.run(main())


def test_a_body_slower_than_the_body_timeout_raises_408():
    async def main() -> None:
        state = ServerState(ApiConfig(body_timeout_s=0.05), None, loader=lambda: None)
        client = Client()

        async def app(scope, receive, send):
            await read_body_then_wait(scope, receive, send, asyncio.Event())

        async def send(message):
            raise AssertionError(f"nothing is sent before the body: {message}")

        client.send_chunk(b"1234", more=True)
        with pytest.raises(BodyTimeout) as timeout:
            await asyncio.wait_for(AccountingMiddleware(app, state, routes=[])(http_scope(8), client.receive, send),
                                   timeout=10)
        assert timeout.value.status_code == 408 and state.num_in_flight == 0

    asyncio.run(main())
