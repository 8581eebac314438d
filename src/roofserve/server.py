"""What every roofserve server adds on top of LitServe: bounded request bodies, 4xx answers for bad
input that never fail a whole batch, one error body shape, a bounded queue and deadlines, fast
failure of the requests a dead worker held, a graceful SIGTERM, and a tuned process environment."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes.util
import hmac
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import litserve as ls
from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from litserve.server import RegularRequestHandler
from litserve.utils import LitAPIStatus, ResponseBufferItem, WorkerSetupStatus

from roofserve.errors import UserError
from roofserve.metrics import Metrics, MetricsMiddleware

log = logging.getLogger(__name__)

# glibc reads these at process start; the CLI re-executes itself with them set (see tuned_environ).
_GLIBC_TUNED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
_ALLOCATOR_LIBS = {"jemalloc": ("jemalloc", "libjemalloc.so.2"), "tcmalloc": ("tcmalloc", "libtcmalloc_minimal.so.4")}


@dataclass
class Rejection:
    """A client error found inside a worker. Returned (not raised) so that one bad image in a batch
    does not fail its neighbours; the HTTP handler turns it into a 4xx answer."""

    status: int
    message: str


def error_body(status: int, message: str) -> dict:
    """The one error shape of every roofserve answer (OpenAI's)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}


def error_response(status: int, message: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None  # 503s here are all worth a retry
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


def worker_threads(cfg) -> int:
    """torch threads per worker: the configured number, or the cores shared among the workers."""
    return cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // cfg.workers_per_device)


def tuned_environ(allocator: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables that pick the malloc for the server and all its worker processes.

    glibc's default malloc returns freed conv-net activations to the OS and maps them back on every
    batch; on small CPUs that cost us up to 4x throughput. Turning off mmap and trimming fixes it.
    """
    env = dict(os.environ if environ is None else environ)
    for key in (*_GLIBC_TUNED, "LD_PRELOAD"):
        env.pop(key, None)
    if allocator == "glibc-tuned":
        env.update(_GLIBC_TUNED)
    elif allocator in _ALLOCATOR_LIBS:
        name, soname = _ALLOCATOR_LIBS[allocator]
        lib = find_library(name, soname)
        if lib is None:
            raise UserError(f"{allocator} not found; install it (Debian: apt-get install lib{name}...) or use glibc-tuned")
        env["LD_PRELOAD"] = lib
    return env


def find_library(name: str, soname: str) -> str | None:
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/local/lib"):
        if (Path(folder) / soname).exists():
            return str(Path(folder) / soname)
    return ctypes.util.find_library(name)


def reexec_with(env: dict[str, str]) -> None:
    """Restart this very command with `env` (malloc settings only count from process start), unless it has it."""
    keys = (*_GLIBC_TUNED, "LD_PRELOAD")
    if all(os.environ.get(k) == env.get(k) for k in keys):
        return
    os.execve(sys.executable, [sys.executable, "-m", "roofserve", *sys.argv[1:]], env)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing (413) anything over max_bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise HTTPException(413, f"request body is {declared} bytes; the limit is {max_bytes}")
        except ValueError:
            raise HTTPException(400, "invalid Content-Length header") from None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise HTTPException(413, f"request body is over the limit of {max_bytes} bytes")
    return bytes(body)


def overloaded(server: "RoofServer") -> JSONResponse | None:
    """503 + Retry-After when the admitted requests are at the bound; else admit (count) the request."""
    metrics = server.metrics
    if metrics.in_flight >= server.max_queued_requests:
        metrics.rejected_overload += 1
        return error_response(503, f"server busy: {metrics.in_flight} requests in progress; retry shortly")
    metrics.in_flight += 1
    return None


class PayloadHandler(RegularRequestHandler):
    """Reads the body itself (bounded) and hands the API's `read_payload` the bytes; answers Rejections as 4xx.

    Bounds the admitted requests (503 beyond) and the time to answer (504 past the deadline, also
    while the worker is busy with it: the late answer is dropped).
    """

    async def handle_request(self, request: Request, request_type=None) -> Response:
        if busy := overloaded(self.server):
            return busy
        try:
            return await self._handle(request)
        finally:
            self.server.metrics.in_flight -= 1

    async def _handle(self, request: Request) -> Response:
        body = await read_body(request, self.server.max_payload_bytes)
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
        if busy := overloaded(self.server):
            return busy
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.server.metrics.in_flight -= 1

        try:
            return await self._handle(request, release)
        except BaseException:
            release()
            raise

    async def _handle(self, request: Request, release) -> Response:
        started = time.perf_counter()
        body = await read_body(request, self.server.max_payload_bytes)
        payload = await self.lit_api.read_payload(request, body)
        payload["deadline"] = time.time() + self.server.deadline_s  # checked by the worker between tokens
        uid, _ = await self._submit_request(payload)
        queue, event = deque(), asyncio.Event()
        self.server.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=queue)
        items = self.server.data_streamer(queue, data_available=event, send_status=True)

        def close() -> None:
            self.server.response_buffer.pop(uid, None)
            release()

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
        return await self.lit_api.respond(payload, first, items, close, started, self.server.metrics)


class RoofServer(ls.LitServer):
    """LitServer with bounded bodies, our error shape, and raw/multipart/JSON bodies for plain APIs.

    An API without a spec must define `async read_payload(request, body) -> picklable` that runs in
    the HTTP process; what it returns is what the worker's decode_request receives.

    Faults: LitServe's monitor restarts a worker that dies (its `/health` is 503 until the new one is
    warm); our watchdog in the HTTP process answers 503 at once to the requests the dead worker held,
    which LitServe would leave waiting. If the HTTP process itself dies, nothing answers on the port:
    the server stops with exit code 1, so that whatever supervises it starts a new one (see
    `_watch_http`). SIGTERM drains: see `begin_shutdown`.
    """

    http_died: str | None = None  # why the server stopped on its own, if its HTTP process died
    _stopping = False

    def __init__(self, lit_api: ls.LitAPI, *, max_payload_bytes: int, max_queued_requests: int, timeout: float,
                 grace_s: float, api_key: str | None = None, **kwargs):
        self.max_payload_bytes = max_payload_bytes
        self.max_queued_requests = max_queued_requests
        self.deadline_s = timeout
        self.api_key = api_key
        super().__init__(lit_api, timeout=timeout, restart_workers=True, **kwargs)
        self.monitor_internal = 0.2  # seconds between LitServe's worker liveness checks (its spelling)
        self.uvicorn_graceful_timeout = grace_s
        self.app.add_exception_handler(HTTPException, _http_exception)
        self.app.add_exception_handler(RequestValidationError, _validation_exception)
        self.metrics = Metrics((lit_api.api_path, self.healthcheck_path, "/metrics", "/v1/models", self.info_path))
        self.app.add_middleware(MetricsMiddleware, metrics=self.metrics)

        async def metrics() -> Response:
            lines = getattr(lit_api, "metrics_lines", list)()  # what only the API knows (from its workers)
            return Response(self.metrics.render(lines), media_type="text/plain; version=0.0.4")

        self.app.add_api_route("/metrics", metrics, methods=["GET"], dependencies=[Depends(self.setup_auth())])

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """LitServe's lifespan (it moves answers from the workers to the handlers) plus our watchdog."""
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
                    self.begin_shutdown()
                    return
            time.sleep(interval_s)

    def begin_shutdown(self) -> None:
        """SIGTERM: end `run`, which then drains (see _perform_graceful_shutdown). Safe in a signal
        handler: the manager call runs on its own thread, not on the main thread's busy connection."""
        if self._shutdown_event is None:  # nothing started yet
            raise SystemExit(0)
        self._stopping = True
        threading.Thread(target=self._shutdown_event.set, daemon=True).start()

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

        self.app.add_api_route(
            lit_api.api_path, endpoint, methods=["POST"], dependencies=[Depends(self.setup_auth(lit_api))]
        )


def resolve_accelerator(cfg) -> str:
    """'cpu' or 'cuda' for LitServe from cfg.device, refusing what this machine cannot run."""
    import torch

    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise UserError("device cuda asked for, but torch sees no GPU; use --device cpu")
    accelerator = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu"
    if cfg.precision == "fp16" and accelerator == "cpu":
        raise UserError("fp16 is slow or unsupported on CPU; use --precision bf16 or fp32")
    return accelerator


def make_server(api: ls.LitAPI, cfg, accelerator: str, model: str) -> RoofServer:
    """A RoofServer for `api` with the knobs every roofserve server shares (a ServerConfig)."""
    from roofserve.config import as_dict

    return RoofServer(
        api,
        max_payload_bytes=cfg.max_payload_bytes,
        max_queued_requests=cfg.max_queued_requests,
        api_key=cfg.api_key,
        accelerator=accelerator,
        devices=1,
        workers_per_device=cfg.workers_per_device,
        timeout=cfg.timeout_s,
        grace_s=cfg.grace_s,
        fast_queue=cfg.fast_queue,
        model_metadata={"model": model, "config": as_dict(cfg)},
    )


def run_server(server: RoofServer, cfg) -> None:
    """Serve on cfg.host:cfg.port with one HTTP process and no access log (it costs CPU per request).
    Returns after SIGTERM once the server has drained and every child process has stopped; exits
    with code 1 (after stopping the workers) if the HTTP process dies."""
    signal.signal(signal.SIGTERM, lambda *_: server.begin_shutdown())
    server.run(host=cfg.host, port=cfg.port, generate_client_file=False, num_api_servers=1, access_log=False)
    if server.http_died:
        raise SystemExit(f"error: {server.http_died}; the server stopped")


async def _http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    response = error_response(exc.status_code, str(exc.detail))
    for key, value in (exc.headers or {}).items():
        response.headers[key] = value
    return response


async def _validation_exception(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return error_response(400, f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}")


def parse_json(body: bytes) -> object:
    """json.loads that raises a Rejection-friendly ValueError with a short message."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"malformed JSON: {e.msg if hasattr(e, 'msg') else 'not UTF-8'}") from None
