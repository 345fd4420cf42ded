"""HTTP/1.1 over a raw socket, for what an HTTP client library will not do: stop half-way through a request."""

import socket


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a socket timeout fails the test)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length, from a connection that stays open."""
    received = b""
    while True:
        _, separator, body = received.partition(b"\r\n\r\n")
        if separator and len(body) >= int(parse_response(received)[1].get("content-length", "0")):
            return received
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {received!r}"
        received += chunk


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def half_body_request(path: str = "/v1/generate") -> bytes:
    """Headers announcing a 100-byte JSON body, and only the first 10 bytes of it."""
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            '{"prompt":').encode()
