"""The guarded HTTP protocol (server.connections) under a real uvicorn on 127.0.0.1, with a small ASGI
app, tight limits and raw sockets: stalled headers and bodies, oversized headers, the connection
bounds, idle keep-alive and a client that stops reading a stream. Fast: no model is loaded."""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from roofserve.server import connections
from roofserve.server.connections import GuardedHttpProtocol, Limits

LIMITS = Limits(header_timeout_s=1.0, body_timeout_s=1.0, slow_reader_timeout_s=1.0, max_connections=20,
                max_connections_per_client=20, max_header_bytes=8192, max_headers=20, send_buffer_bytes=4096)


class App:
    """POST /echo: the body's length. GET /hold: waits until released. GET /stream: 1 KB chunks until the
    client goes away (records that the stream saw it)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.stream_closed = threading.Event()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/early":  # answers without reading the body, as a 413 from Content-Length does
            body = b'{"error": "too big"}'
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})
            return
        if path == "/hold":
            while not self.release.is_set():
                await asyncio.sleep(0.02)
        if path == "/stream":
            gone = asyncio.Event()

            async def watch():
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()

            watcher = asyncio.get_running_loop().create_task(watch())
            await send({"type": "http.response.start", "status": 200, "headers": []})
            while not gone.is_set():
                await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
            self.stream_closed.set()
            watcher.cancel()
            return
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size, more = size + len(message.get("body", b"")), message.get("more_body", False)
        body = json.dumps({"bytes": size}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def served():
    app = App()
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_keep_alive=1,
                            http=functools.partial(GuardedHttpProtocol, limits=LIMITS), lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield app, f"http://127.0.0.1:{port}", port
    app.release.set()
    server.should_exit = True
    thread.join(10)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _closed(port: int) -> dict[str, int]:
    return {r: connections.REGISTRY.closed[r] for r in connections.CLOSE_REASONS}


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def test_stalled_headers_and_bodies_get_408_within_their_timeout(served):
    _, url, port = served
    headers = _connect(port)
    headers.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Le")
    body = _connect(port)
    body.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789")
    silent = _connect(port)  # connects and never sends a byte
    start = time.monotonic()
    answers = [_read_until_closed(s, 10) for s in (headers, body, silent)]
    assert time.monotonic() - start < 1.0 + 5
    assert [_status(a) for a in answers] == [408, 408, 408], answers
    assert b"request body stalled" in answers[1] and json.loads(answers[1].split(b"\r\n\r\n", 1)[1])["error"]
    assert httpx.post(url + "/echo", content=b"a" * 1000).json() == {"bytes": 1000}


def test_a_slow_body_that_keeps_progressing_is_not_cut(served):
    _, _, port = served
    sock = _connect(port)
    sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
    for byte in b"abcd":  # 2 s in all, more than the 1 s body timeout, but never 1 s without a byte
        time.sleep(0.5)
        sock.sendall(bytes([byte]))
    answer = _read_until_closed(sock, 1.5)  # keep-alive: the server closes it after 1 s idle
    assert _status(answer) == 200 and answer.endswith(b'{"bytes": 4}')


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n", 431),
    (b"GET /echo HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(5000)) + b"\r\n", 431),
    (b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Line: " + b"a" * 8200 + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
], ids=["200 KB header", "5000 headers", "one 8 KB header", "9 KB request line", "garbage"])
def test_oversized_or_malformed_requests_are_refused_with_our_error_body(served, request_bytes, status):
    _, url, port = served
    before = _closed(port)
    sock = _connect(port)
    try:
        sock.sendall(request_bytes)
    except (BrokenPipeError, ConnectionResetError):  # the server answered and closed before it had all of it
        pass
    answer = _read_until_closed(sock, 5)
    assert _status(answer) == status, answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == status
    reason = {431: "headers_too_large", 414: "request_line_too_long", 400: "bad_request"}[status]
    assert _closed(port)[reason] == before[reason] + 1
    assert httpx.get(url + "/echo").status_code == 200


def test_idle_keep_alive_connections_are_closed(served):
    _, _, port = served
    sock = _connect(port)
    sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    start = time.monotonic()
    answer = _read_until_closed(sock, 5)
    assert _status(answer) == 200 and 0.8 < time.monotonic() - start < 4


def test_at_the_bound_the_stalest_idle_connection_is_cut_and_when_all_are_busy_new_ones_get_503(served):
    app, url, port = served
    before = _closed(port)
    idle = [_connect(port) for _ in range(LIMITS.max_connections)]
    time.sleep(0.2)
    assert httpx.get(url + "/echo").status_code == 200  # takes the place of the stalest idle connection
    assert _closed(port)["cut_at_limit"] >= before["cut_at_limit"] + 1
    for sock in idle:
        sock.close()
    time.sleep(0.2)
    app.release.clear()
    holders = [_connect(port) for _ in range(LIMITS.max_connections)]
    for sock in holders:
        sock.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    start = time.monotonic()
    refused = httpx.get(url + "/echo", timeout=5)
    assert refused.status_code == 503 and time.monotonic() - start < 1
    assert "connection limit" in refused.json()["error"]["message"]
    app.release.set()
    assert all(_status(_read_until_closed(s, 5)) == 200 for s in holders)
    assert httpx.get(url + "/echo").status_code == 200


def test_a_client_that_stops_reading_a_stream_is_cut_and_the_app_sees_it_leave(served):
    app, url, port = served
    before = _closed(port)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    app.stream_closed.clear()
    sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
    assert app.stream_closed.wait(1.0 + 5), "the stream never ended"
    assert _closed(port)["slow_reader"] == before["slow_reader"] + 1
    client = sock.getsockname()
    sock.close()
    # the cut connection is no longer counted open (the gauge is the registry's size)
    assert not [c for c in list(connections.REGISTRY.open) if c.transport.get_extra_info("peername") == client]


def test_an_answer_before_the_body_is_read_closes_the_connection_without_losing_the_answer(served):
    _, url, port = served
    with httpx.Client(timeout=10) as client:  # a keep-alive client must not reuse the connection
        for _ in range(20):
            response = client.post(url + "/early", content=b"x" * 3_000_000)
            assert response.status_code == 413 and response.headers["connection"] == "close"
    sock = _connect(port)
    sock.sendall(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    sock.settimeout(5)
    answer = sock.recv(4096)
    assert _status(answer) == 413
    sock.sendall(b"x" * 5000)  # still sending: the server reads and drops it, then closes (no reset)
    sock.shutdown(socket.SHUT_WR)
    assert _read_until_closed(sock, 5) == b""
    # and nothing keeps the closed connections (and the bodies they buffered) in memory: a pending body
    # timer did, for 30 s each, until the soak's memory check caught it
    time.sleep(0.3)
    gc.collect()
    assert not [c for c in gc.get_objects() if type(c) is GuardedHttpProtocol and c.parser is None]
