"""The connection layer both servers share: uvicorn's httptools protocol plus the limits a server
needs when clients reach it without a proxy in front (what nginx calls client_header_timeout,
client_body_timeout, large_client_header_buffers, keepalive_timeout and worker_connections).

Every connection is in one phase: IDLE (new, or between requests), HEADERS (the request has begun,
its headers are not all in), BODY (headers in, body arriving), APP (the request is complete and the
app has it). Timers close a connection that stays in HEADERS longer than `header_timeout_s` or in
BODY without a byte for `body_timeout_s` (both answered 408 first); uvicorn closes one IDLE for
`keep_alive_s` after a response. A response whose writes stay paused (the client does not read)
for `slow_reader_timeout_s` is cut; the handler sees a client that left and stops its generation.

Open connections are bounded in all and per client address. At a bound, a new connection takes the
place of the one that made progress longest ago among those not in APP (a stalled upload, stalled
headers, an idle keep-alive); when every open connection is in APP, the new one gets 503 at once.
Requests are admitted (count against max_queued_requests) only once their body is in (server.lit).

Counts live in this module (one HTTP process per server) and are rendered at /metrics.
"""

from __future__ import annotations

import json
import logging
import socket
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from roofserve.server.http import error_body

log = logging.getLogger(__name__)

IDLE, HEADERS, BODY, APP = "idle", "headers", "body", "app"
LINGER_S = 2.0  # how long a refused client may go on sending before we close
CLOSE_REASONS = ("header_timeout", "body_timeout", "idle_timeout", "slow_reader", "headers_too_large",
                 "request_line_too_long", "bad_request", "cut_at_limit", "refused_at_limit")


@dataclass(frozen=True)
class Limits:
    """The connection knobs of a ServerConfig (their defaults and help live there)."""

    header_timeout_s: float
    body_timeout_s: float
    slow_reader_timeout_s: float
    max_connections: int
    max_connections_per_client: int
    max_header_bytes: int
    max_headers: int
    send_buffer_bytes: int
    max_line_bytes: int = 8190  # request line, and each header line (gunicorn's limits)


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a request that breaks a limit."""


class Registry:
    """The open connections of this HTTP process, and why the ones we closed were closed."""

    def __init__(self) -> None:
        self.open: dict[GuardedHttpProtocol, None] = {}  # insertion-ordered set
        self.per_client: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()

    def admit(self, conn: GuardedHttpProtocol) -> bool:
        """Register conn, first cutting the stalest cuttable connection at a bound; False: refuse it."""
        limits = conn.limits
        while self.per_client[conn.address] >= limits.max_connections_per_client:
            if not self._cut_stalest([c for c in self.open if c.address == conn.address]):
                return False
        while len(self.open) >= limits.max_connections:
            if not self._cut_stalest(self.open):
                return False
        self.open[conn] = None
        self.per_client[conn.address] += 1
        return True

    def _cut_stalest(self, pool) -> bool:
        candidates = [c for c in pool if c.phase != APP]
        if not candidates:
            return False
        victim = min(candidates, key=lambda c: c.progress_at)
        if victim.phase == IDLE:  # nothing asked: nothing to answer
            victim.cut("cut_at_limit")
        else:
            victim.cut("cut_at_limit", 503, "server at its connection limit: this stalled request was closed")
        return True

    def forget(self, conn: GuardedHttpProtocol) -> None:
        if self.open.pop(conn, False) is None:
            self.per_client[conn.address] -= 1
            if not self.per_client[conn.address]:
                del self.per_client[conn.address]

    def metrics_lines(self) -> list[str]:
        lines = ["# TYPE roofserve_connections_open gauge", f"roofserve_connections_open {len(self.open)}",
                 "# TYPE roofserve_connections_closed_total counter"]
        return lines + [f'roofserve_connections_closed_total{{reason="{r}"}} {self.closed[r]}' for r in CLOSE_REASONS]


REGISTRY = Registry()


def _raw_response(status: int, message: str) -> bytes:
    body = json.dumps(error_body(status, message)).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class _CycleTransport:
    """The transport as one request's uvicorn cycle sees it: closing goes through the protocol."""

    def __init__(self, protocol: GuardedHttpProtocol, cycle) -> None:
        self._protocol, self._cycle, self._transport = protocol, cycle, protocol.transport

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.close_after_response(self._cycle)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the phases, timers and bounds described in the module doc.
    uvicorn builds one per connection: `functools.partial(GuardedHttpProtocol, limits=...)`."""

    def __init__(self, *args, limits: Limits, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.phase = IDLE
        self.progress_at = 0.0  # loop time of the last progress (bytes of a request, or a response done)
        self.address = ""
        self._closed = False
        self._deadline = 0.0
        self._reason: str | None = None  # what the phase timer enforces; None: nothing
        self._timer = None
        self._write_timer = None
        self._header_count = self._header_bytes = self._raw_header_bytes = 0
        self._refusal: tuple[str, int, str] | None = None

    # --- timers -------------------------------------------------------------------------
    def _arm(self, seconds: float, reason: str) -> None:
        self._deadline, self._reason = self.loop.time() + seconds, reason
        if self._timer is not None and self._timer.when() > self._deadline:
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = self.loop.call_at(self._deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._reason is None or self._closed:
            return
        if self._deadline > self.loop.time() + 1e-3:  # pushed back by progress since it was armed
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
        elif self._reason == "header_timeout":
            self.cut("header_timeout", 408, f"request headers not complete within {self.limits.header_timeout_s:g} s")
        else:
            self.cut("body_timeout", 408, f"request body stalled: no bytes for {self.limits.body_timeout_s:g} s")

    def cut(self, reason: str, status: int | None = None, message: str = "", linger: bool = False) -> None:
        """Close this connection for `reason`, answering `status` first if no response has started.
        linger: the client may still be sending; see _linger."""
        if self._closed:
            return
        self._release()
        REGISTRY.closed[reason] += 1
        cycle = self.cycle
        if status is not None and not (cycle is not None and cycle.response_started and not cycle.response_complete):
            self.transport.write(_raw_response(status, message))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() sees http.disconnect, its send() is dropped
            cycle.message_event.set()
        self.flow.resume_writing()  # a send waiting for the client to read returns
        if linger:
            self._linger()
        else:
            self.transport.close()

    def _release(self) -> None:
        """Leave the registry and stop the timers: a pending timer would hold this connection (and the
        request body its cycle buffers) in memory until it fires."""
        self._closed = True
        REGISTRY.forget(self)
        self._reason = None
        for timer in (self._timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._write_timer = None

    def _linger(self) -> None:
        """Send FIN after the answer and discard what still comes, closing at the client's FIN or after
        LINGER_S: closing a socket with unread bytes sends a reset, which can destroy the answer before
        the client reads it (nginx's lingering_close)."""
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    # --- connection ---------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.address = self.client[0] if self.client else ""
        self.progress_at = self.loop.time()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.send_buffer_bytes)
        transport.set_write_buffer_limits(high=self.limits.send_buffer_bytes)
        if not REGISTRY.admit(self):
            self._closed = True  # never registered, no timer yet
            REGISTRY.closed["refused_at_limit"] += 1
            transport.write(_raw_response(503, "server at its connection limit; retry shortly"))
            self._linger()
            return
        self._arm(self.limits.header_timeout_s, "header_timeout")  # a connection that never sends a request

    def connection_lost(self, exc) -> None:
        self._release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        super().data_received(data)
        if self.phase == HEADERS and not self._closed:  # headers not complete: httptools holds them unparsed
            self._raw_header_bytes += len(data)
            if self._raw_header_bytes > self.limits.max_header_bytes:
                self.cut("headers_too_large", 431, f"request headers over {self.limits.max_header_bytes} bytes",
                         linger=True)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error; a callback of ours that refused a request raised it."""
        reason, status, message = self._refusal or ("bad_request", 400, "malformed HTTP request")
        self.cut(reason, status, message, linger=True)

    def _refuse(self, reason: str, status: int, message: str) -> None:
        self._refusal = (reason, status, message)
        raise _Refused(message)

    # --- parser callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.phase = HEADERS
        self.progress_at = self.loop.time()
        self._header_count = self._header_bytes = self._raw_header_bytes = 0
        self._arm(self.limits.header_timeout_s, "header_timeout")

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_line_bytes:
            self._refuse("request_line_too_long", 414, f"request line over {self.limits.max_line_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        if self._header_count > self.limits.max_headers:
            self._refuse("headers_too_large", 431, f"over {self.limits.max_headers} request headers")
        if len(name) + len(value) + 2 > self.limits.max_line_bytes:
            self._refuse("headers_too_large", 431, f"a request header over {self.limits.max_line_bytes} bytes")
        if self._header_bytes > self.limits.max_header_bytes:
            self._refuse("headers_too_large", 431, f"request headers over {self.limits.max_header_bytes} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.phase = BODY
        self.progress_at = self.loop.time()
        self._arm(self.limits.body_timeout_s, "body_timeout")
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None or self._closed:
            return
        # An answer sent before the body is all in (413, 401, ...) says `connection: close`, and the close
        # lingers: a client that reused the connection, or one still sending, must not lose the answer.
        cycle.transport = _CycleTransport(self, cycle)
        send = cycle.send

        async def send_closing_if_body_unread(message) -> None:
            if message["type"] == "http.response.start" and cycle.more_body:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        cycle.send = send_closing_if_body_unread

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self.progress_at = self._deadline = self.loop.time()
        self._deadline += self.limits.body_timeout_s

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.phase = APP
        self._reason = None

    def on_response_complete(self) -> None:
        if self.phase == APP:
            self.phase = IDLE
            self.progress_at = self.loop.time()
        super().on_response_complete()

    def close_after_response(self, cycle) -> None:
        """uvicorn closes after a `connection: close` answer: at once, or lingering if the body is unread."""
        if not cycle.more_body or self._closed:
            self.transport.close()
            return
        self._release()
        self._linger()

    def timeout_keep_alive_handler(self) -> None:
        if not self._closed:
            self.cut("idle_timeout")

    # --- writes -------------------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None and not self._closed:
            self._write_timer = self.loop.call_later(self.limits.slow_reader_timeout_s, self._slow_reader)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _slow_reader(self) -> None:
        self._write_timer = None
        if self.flow.write_paused:
            log.info("closing a connection from %s: it read nothing for %g s", self.address,
                     self.limits.slow_reader_timeout_s)
            self.cut("slow_reader")
