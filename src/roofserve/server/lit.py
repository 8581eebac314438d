"""Everything roofserve takes from LitServe's private internals, in one module.

LitServe 0.2.19 offers no public hooks for what our servers need, so this module subclasses its
request handler and its server and overrides private methods. Names used here and nowhere else:
`litserve.server.RegularRequestHandler` (`_submit_request`, `_handle_error_response`),
`litserve.loops.base.LitLoop` (`get_request`, `put_response`, the `run` signature),
`litserve.utils.LitAPIStatus`, `LoopResponseType`, `ResponseBufferItem` (`event`, `response`, `response_queue`,
`worker_id`), `WorkerSetupStatus`; on `LitServer`: `response_buffer`, `data_streamer`,
`workers_setup_status`, `_shutdown_event`, `_transport`, `_init_manager`, `monitor_internal`,
`uvicorn_graceful_timeout`, `healthcheck_path`, `lifespan`, `_start_server`, `_start_worker_monitoring`,
`_perform_graceful_shutdown`, `_register_api_endpoints`, `setup_auth`.
tests/unit/test_litserve_contract.py pins each of them, so that an upgrade fails there first.

What the subclasses add: bodies read by us (bounded) and handed to the API's `read_payload`;
Rejections (4xx) that never fail a whole batch; the admission bound (503) and deadline (504);
fast 503s for the requests a dead worker held; a graceful SIGTERM; a server that stops when its
HTTP process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import multiprocessing as mp
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

import litserve as ls
from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from litserve.loops.base import LitLoop
from litserve.server import RegularRequestHandler
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem, WorkerSetupStatus

from roofserve.server import connections
from roofserve.server.http import (
    FAILED_MID_ANSWER,
    Rejection,
    error_response,
    http_exception,
    overloaded,
    read_body,
    validation_exception,
)
from roofserve.server.metrics import Metrics, MetricsMiddleware
from roofserve.server.transport import PipeTransport

log = logging.getLogger(__name__)


class StepLoop(LitLoop):
    """A worker loop for APIs that advance many streaming requests per step (continuous batching).

    The API implements `admit(uid, request) -> [item, ...]` (the first items of a new request: a start
    item, or a Rejection and None), `step() -> [(uid, item), ...]` and `busy() -> bool`; an item None
    means that request is done. Between steps the loop takes every request that has arrived; when the API has
    nothing to do it blocks on the queue instead of spinning. While busy it reads the queue (a round trip to
    LitServe's manager process) only when `arrivals`, a shared count that the HTTP process moves after each
    request it submits, has moved since the queue was last found empty. Items go to the
    HTTP process as LitServe's streaming loop sends them (START, then OK per item, then FINISH_STREAMING),
    so the same handler serves them. LitServe 0.2.19's ContinuousBatchingLoop is not used: its event loop spins a core while
    idle, it prefills inside its scheduling task, and its API has no per-request cancel.
    """

    def __init__(self):
        super().__init__()
        self.arrivals = mp.get_context("spawn").Array("q", 1, lock=False)  # moved by the one HTTP process

    def run(self, lit_api, device, worker_id, request_queue, transport, workers_setup_status, callback_runner):
        queues: dict[str, int] = {}  # uid -> the response queue of the HTTP process that holds it

        def send(uid: str, item, status=LitAPIStatus.OK) -> None:
            self.put_response(transport, queues[uid], uid, item, status, LoopResponseType.STREAMING)

        seen = -1
        while True:
            if not lit_api.busy():
                request = self.get_request(request_queue, block=True, timeout=1.0)
            elif self.arrivals[0] != seen:
                seen = self.arrivals[0]  # read before the queue: a request put after it moves the count again
                request = self.get_request(request_queue, block=False)
            else:  # nothing submitted since the queue was last found empty: no round trip to the manager
                request = None
            while request is not None:
                queue_id, uid, _timestamp, payload = request
                queues[uid] = queue_id
                send(uid, (), LitAPIStatus.START)
                try:
                    for item in lit_api.admit(uid, payload):
                        if item is None:
                            send(uid, "", LitAPIStatus.FINISH_STREAMING)
                            del queues[uid]
                        else:
                            send(uid, item)
                except Exception:  # this request only: a 500 for it, the others go on
                    log.exception("admitting request %s failed", uid)
                    send(uid, Rejection(500, "the worker failed on this request"))
                    send(uid, "", LitAPIStatus.FINISH_STREAMING)
                    del queues[uid]
                request = self.get_request(request_queue, block=False)
            try:
                outputs = lit_api.step()
            except Exception:  # the batch's state is unknown: fail its requests, and let LitServe restart us
                log.exception("a batch step failed; failing its %d requests and restarting the worker", len(queues))
                for uid in list(queues):
                    send(uid, Rejection(500, "the worker failed on this request"))
                    send(uid, "", LitAPIStatus.FINISH_STREAMING)
                raise
            for uid, item in outputs:
                if item is None:
                    send(uid, "", LitAPIStatus.FINISH_STREAMING)
                    del queues[uid]
                else:
                    send(uid, item)


class PayloadHandler(RegularRequestHandler):
    """Reads the body itself (bounded) and hands the API's `read_payload` the bytes; answers Rejections as 4xx.

    Bounds the admitted requests (503 beyond) and the time to answer (504 past the deadline, also
    while the worker is busy with it: the late answer is dropped).
    """

    async def handle_request(self, request: Request, request_type=None) -> Response:
        body = await read_body(request, self.server.max_payload_bytes)  # admitted only once its body is in
        if busy := overloaded(self.server):
            return busy
        try:
            return await self._handle(request, body)
        finally:
            self.server.metrics.in_flight -= 1

    async def _handle(self, request: Request, body: bytes) -> Response:
        payload = await self.lit_api.read_payload(request, body)
        uid, _ = await self._submit_request(payload)
        event = asyncio.Event()
        self.server.response_buffer[uid] = ResponseBufferItem(event)
        try:
            await asyncio.wait_for(event.wait(), self.server.deadline_s)
        except asyncio.TimeoutError:
            self.server.response_buffer.pop(uid, None)
            return error_response(504, f"no answer within the deadline of {self.server.deadline_s:g} s")
        response, status = self.server.response_buffer.pop(uid).response
        if status == LitAPIStatus.ERROR:
            self._handle_error_response(response)
        if isinstance(response, Rejection):
            return error_response(response.status, response.message)
        return JSONResponse(response)


class StreamingPayloadHandler(RegularRequestHandler):
    """For streaming APIs: waits for the worker's first item, so that a Rejection still becomes a
    plain 4xx; then the API's `respond(payload, first, items, close)` builds the response."""

    async def handle_request(self, request: Request, request_type=None) -> Response:
        body = await read_body(request, self.server.max_payload_bytes)  # admitted only once its body is in
        if busy := overloaded(self.server):
            return busy
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.server.metrics.in_flight -= 1

        try:
            return await self._handle(request, body, release)
        except BaseException:
            release()
            raise

    async def _handle(self, request: Request, body: bytes, release) -> Response:
        started = time.perf_counter()
        payload = await self.lit_api.read_payload(request, body)
        payload["deadline"] = time.time() + self.server.deadline_s  # checked by the worker between tokens
        uid, _ = await self._submit_request(payload)
        if isinstance(loop := self.lit_api.loop, StepLoop):
            loop.arrivals[0] += 1  # after the put (a manager round trip): a worker that sees the count finds the request
        queue, event = deque(), asyncio.Event()
        self.server.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=queue)
        items = self.server.data_streamer(queue, data_available=event, send_status=True)

        def close() -> None:
            self.server.response_buffer.pop(uid, None)
            release()

        answer = asyncio.ensure_future(self._answer(payload, items, close, started))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if answer in done:
            return answer.result()
        # The client left before the answer was whole (a stream's own response notices that by itself):
        # stop its generation and free its place.
        answer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await answer
        self.lit_api.cancel(payload["request_id"])
        close()
        return error_response(499, "the client closed the connection")

    async def _answer(self, payload: dict, items: AsyncIterator, close, started: float) -> Response:
        try:
            first, status = await asyncio.wait_for(items.__anext__(), self.server.deadline_s)
        except asyncio.TimeoutError:
            close()
            return error_response(504, f"not started within the deadline of {self.server.deadline_s:g} s")
        except StopAsyncIteration:
            close()
            return error_response(500, "the worker ended the request without an answer")
        if status == LitAPIStatus.ERROR:
            close()
            self._handle_error_response(first)
        if isinstance(first, Rejection):
            close()
            return error_response(first.status, first.message)
        return await self.lit_api.respond(payload, first, _failures_as_rejections(items), close, started,
                                          self.server.metrics)


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the body is read: receive() then waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # not expected after the body; never spin


async def _failures_as_rejections(items: AsyncIterator) -> AsyncIterator:
    """A worker that raised after an answer began sends its exception with status ERROR (and LitServe's
    data_streamer ends there): pass it on as a 500 Rejection, which the API answers in its error shape."""
    async for item, status in items:
        if status == LitAPIStatus.ERROR:
            log.error("a worker failed while answering: %r", item)
            yield FAILED_MID_ANSWER, status
            return
        yield item, status


class DrainMiddleware:
    """Pure ASGI: once SIGTERM has begun the drain, /health answers 503 while every other route still
    serves, so that a balancer checking health stops sending before the port closes."""

    def __init__(self, app, health_path: str, draining):
        self.app, self.health_path, self.draining = app, health_path, draining

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.draining.value and scope["path"] == self.health_path:
            return await error_response(503, "draining: this server is stopping")(scope, receive, send)
        return await self.app(scope, receive, send)


class RoofServer(ls.LitServer):
    """LitServer with bounded bodies, our error shape, and raw/multipart/JSON bodies for plain APIs.

    An API without a spec must define `async read_payload(request, body) -> picklable` that runs in
    the HTTP process; what it returns is what the worker's decode_request receives. Its optional
    `extra_paths` are more POST routes to the same handler and workers (read_payload tells them apart
    by `request.url.path`).

    Faults: LitServe's monitor restarts a worker that dies (its `/health` is 503 until the new one is
    warm); our watchdog in the HTTP process answers 503 at once to the requests the dead worker held,
    which LitServe would leave waiting. If the HTTP process itself dies, nothing answers on the port:
    the server stops with exit code 1, so that whatever supervises it starts a new one (see
    `_watch_http`). SIGTERM drains: see `begin_shutdown`.
    """

    http_died: str | None = None  # why the server stopped on its own, if its HTTP process died
    _stopping = False

    def __init__(self, lit_api: ls.LitAPI, *, max_payload_bytes: int, max_queued_requests: int, timeout: float,
                 grace_s: float, drain_s: float = 0.0, api_key: str | None = None, transport: str = "pipe",
                 **kwargs):
        self.transport = transport
        self.drain_s = drain_s
        self._draining = mp.get_context("fork").RawValue("b", 0)  # shared with the HTTP process, forked later
        self.max_payload_bytes = max_payload_bytes
        self.max_queued_requests = max_queued_requests
        self.deadline_s = timeout
        self.api_key = api_key
        super().__init__(lit_api, timeout=timeout, restart_workers=True, **kwargs)
        self.monitor_internal = 0.2  # seconds between LitServe's worker liveness checks (its spelling)
        self.uvicorn_graceful_timeout = grace_s
        self.app.add_exception_handler(HTTPException, http_exception)
        self.app.add_exception_handler(RequestValidationError, validation_exception)
        self.metrics = Metrics((lit_api.api_path, *getattr(lit_api, "extra_paths", ()), self.healthcheck_path,
                                "/metrics", "/v1/models", self.info_path, "/tokenize", "/detokenize", "/version"))
        self.app.add_middleware(DrainMiddleware, health_path=self.healthcheck_path, draining=self._draining)
        self.app.add_middleware(MetricsMiddleware, metrics=self.metrics)

        async def metrics() -> Response:
            lines = getattr(lit_api, "metrics_lines", list)()  # what only the API knows (from its workers)
            lines += connections.REGISTRY.metrics_lines()
            return Response(self.metrics.render(lines), media_type="text/plain; version=0.0.4")

        self.app.add_api_route("/metrics", metrics, methods=["GET"], dependencies=[Depends(self.setup_auth())])

    def _init_manager(self, num_api_servers: int):
        """LitServe's manager, and with transport "pipe" our PipeTransport for the answers (see server.transport)."""
        manager = super()._init_manager(num_api_servers)
        if self.transport == "pipe":
            self._transport = PipeTransport(num_api_servers)
        return manager

    def _deliver(self, answer) -> None:
        """An answer from a worker, into its request's buffer item: what LitServe's consumer task
        (`response_queue_to_buffer`) does with each message, done as the pipe is read (PipeTransport.deliver)."""
        uid, (*response, _response_type, worker_id) = answer
        item = self.response_buffer.get(uid)
        if item is None:  # answered already (504, a dead worker) or its client left
            return
        if response[1] == LitAPIStatus.START:
            item.worker_id = int(worker_id)
            return
        if item.response_queue is not None:  # a streaming request
            item.response_queue.append(response)
        else:
            item.response = response
        item.event.set()

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """LitServe's lifespan (it moves answers from the workers to the handlers) plus our watchdog;
        with our pipe transport, answers reach the handlers as the pipe is read (see _deliver)."""
        if isinstance(self._transport, PipeTransport):
            self._transport.deliver(app.response_queue_id, self._deliver)
        watchdog = asyncio.get_running_loop().create_task(self._watch_workers())
        try:
            async with super().lifespan(app):
                yield
        finally:
            watchdog.cancel()

    async def _watch_workers(self, interval_s: float = 0.1) -> None:
        """Fail the requests of a worker that left READY (it died; LitServe's monitor is restarting it)."""
        ready: set[str] = set()
        while True:
            await asyncio.sleep(interval_s)
            try:
                status = self.workers_setup_status.copy()  # one round trip to the manager
            except Exception:  # the manager is gone: the server is shutting down
                return
            for key, value in status.items():
                if value == WorkerSetupStatus.READY:
                    ready.add(key)
                elif key in ready:
                    ready.discard(key)
                    self.metrics.worker_deaths += 1
                    self._fail_requests_of(int(key.rsplit("_", 1)[1]))

    def _fail_requests_of(self, worker_id: int) -> None:
        # LitServe records which worker took a request (its START message, sent with restart_workers on).
        dead = Rejection(503, "the worker serving this request died and is being restarted; retry shortly")
        for uid, item in list(self.response_buffer.items()):
            if item.worker_id != worker_id or (item.response_queue is None and item.event.is_set()):
                continue
            log.warning("request %s failed: its worker %d died", uid, worker_id)
            if item.response_queue is not None:
                item.response_queue.extend([(dead, LitAPIStatus.OK), (None, LitAPIStatus.FINISH_STREAMING)])
            else:
                item.response = (dead, LitAPIStatus.OK)
            item.event.set()

    def _start_server(self, port, num_uvicorn_servers, log_level, sockets, uvicorn_worker_type, **kwargs):
        self._listen_sockets = sockets  # kept to stop listening for good at shutdown
        return super()._start_server(port, num_uvicorn_servers, log_level, sockets, uvicorn_worker_type, **kwargs)

    def _start_worker_monitoring(self, manager, uvicorn_workers):
        super()._start_worker_monitoring(manager, uvicorn_workers)
        threading.Thread(target=self._watch_http, args=(uvicorn_workers,), daemon=True,
                         name="roofserve-http-watch").start()

    def _watch_http(self, uvicorn_workers: dict, interval_s: float = 0.5) -> None:
        """Stop the server when an HTTP process dies (LitServe restarts only inference workers).
        is_alive() is a waitpid in this process: no message to another process, so no CPU taken from
        the workers while they run."""
        while not self._stopping:
            for proc in uvicorn_workers.values():
                if not proc.is_alive() and not self._stopping:  # not one that our shutdown stopped
                    self.http_died = f"the HTTP process {proc.pid} died (exit code {proc.exitcode})"
                    log.error("%s; stopping the server", self.http_died)
                    self.begin_shutdown(drain=False)  # nothing answers on the port: no one to drain
                    return
            time.sleep(interval_s)

    def begin_shutdown(self, drain: bool = True) -> None:
        """SIGTERM: /health answers 503 at once; drain_s later `run` ends, and then drains (see
        _perform_graceful_shutdown). Safe in a signal handler: the wait and the manager call run on their
        own thread, not on the main thread's busy connection. A second SIGTERM changes nothing."""
        if self._shutdown_event is None:  # nothing started yet
            raise SystemExit(0)
        if self._stopping:
            return
        self._stopping = True
        self._draining.value = 1
        delay = self.drain_s if drain else 0.0
        if delay:
            log.info("draining: /health answers 503; the port closes in %g s", delay)

        def stop() -> None:
            time.sleep(delay)
            self._shutdown_event.set()

        threading.Thread(target=stop, daemon=True, name="roofserve-drain").start()

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason="normal"):
        """Stop the HTTP processes first, so that they refuse new connections and finish the admitted
        requests (up to grace_s) while the workers still run; then LitServe stops transport and workers."""
        self._stopping = True
        with contextlib.suppress(Exception):
            self._shutdown_event.set()  # so that LitServe's monitor does not restart workers we stop
        if shutdown_reason != "keyboard_interrupt":
            for proc in uvicorn_workers.values():
                if proc.is_alive():
                    proc.terminate()  # uvicorn's graceful shutdown: stop accepting, finish requests
            # LitServe's manager process, forked after the socket was bound, keeps the port listening
            # after uvicorn stops accepting: new clients would wait in a backlog nobody reads. Once
            # uvicorn has let go of it, shutting the socket down refuses them at once.
            time.sleep(0.5)
            for sock in getattr(self, "_listen_sockets", ()):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            for proc in uvicorn_workers.values():
                proc.join(self.uvicorn_graceful_timeout + 5)
                if proc.is_alive():
                    log.warning("HTTP process %s did not stop within the grace period; killing it", proc.pid)
                    proc.kill()
                    proc.join(5)
            uvicorn_workers = {}
        super()._perform_graceful_shutdown(manager, uvicorn_workers, shutdown_reason)

    def setup_auth(self, lit_api: ls.LitAPI | None = None):
        """X-API-Key or `Authorization: Bearer` on every route but health, compared in constant time."""
        expected = (self.api_key or "").encode()
        health = self.healthcheck_path

        def check(request: Request) -> None:
            if not expected or request.url.path == health:
                return
            given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), expected):
                raise HTTPException(401, "missing or wrong API key: send it in the X-API-Key header")

        return check

    def _register_api_endpoints(self, lit_api, request_type, response_type):
        if lit_api.spec:
            return super()._register_api_endpoints(lit_api, request_type, response_type)
        handler = StreamingPayloadHandler(lit_api, self) if lit_api.stream else PayloadHandler(lit_api, self)

        async def endpoint(request: Request) -> Response:
            return await handler.handle_request(request)

        for path in (lit_api.api_path, *getattr(lit_api, "extra_paths", ())):  # same handler, same workers
            self.app.add_api_route(path, endpoint, methods=["POST"], dependencies=[Depends(self.setup_auth(lit_api))])


