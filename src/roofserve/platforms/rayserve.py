"""The servers on Ray Serve (`roofserve serve vision|llm --platform ray`): the same API classes (setup,
read_payload, decode_request, predict, respond, limits, error body) as Ray Serve replicas behind Ray's
HTTP proxy, with the same routes, for traffic that outgrows one machine.

- Batching: `@serve.batch` with the config's max_batch_size and batch_timeout_s; decode and predict run
  in a thread of the replica, so its event loop keeps taking requests (and filling the next batch).
- Replicas: `ray_replicas` fixed, or autoscaled between `ray_replicas` and `ray_max_replicas` on Ray's
  ongoing requests per replica (`ray_target_ongoing_requests`). Each replica reserves its threads as Ray CPUs.
- Admission: Ray's `max_queued_requests` (its 503 beyond); the deadline is ours (504), as on LitServe.
- Cluster: no `ray_address` starts a local Ray instance (temp dir of its own, removed at exit); with one
  it joins that cluster. SIGTERM drains (replicas get `grace_s`) and stops what it started: the whole
  local instance, or on a joined cluster only its application (Serve's proxy and controller stay there).
- LLM: one generation at a time per replica (LLMAPI.predict on a thread, streamed back through
  LLMAPI.respond); continuous batching stays LitServe's (server.lit.StepLoop).
- Not here: our /metrics (Ray exports its own Prometheus metrics), /tokenize and /detokenize, and the
  connection guards of server.connections (Ray's proxy is uvicorn without them), and `drain_s`
  (Ray's proxy drains on its own).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
import time

from roofserve.config import LLMConfig, VisionConfig
from roofserve.platforms.ray_proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from roofserve.errors import UserError

log = logging.getLogger(__name__)
APP = "roofserve"


def _serve():
    try:
        from ray import serve
    except ImportError:
        raise UserError("--platform ray needs Ray Serve: pip install 'roofserve[ray]'") from None
    return serve


def replica_threads(cfg: VisionConfig | LLMConfig) -> int:
    """torch threads (and Ray CPUs) per replica: the configured number, or the cores over the replicas."""
    return cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // cfg.ray_replicas)


def deployment_options(cfg: VisionConfig | LLMConfig) -> dict:
    """Ray Serve deployment options from the server's config (what `serve.deployment(...)` takes)."""
    options = {
        "ray_actor_options": {"num_cpus": replica_threads(cfg)},
        # @serve.batch fills batches only up to the requests a replica holds at once
        "max_ongoing_requests": max(2 * cfg.max_batch_size, 8),
        "max_queued_requests": cfg.max_queued_requests,
        "graceful_shutdown_timeout_s": cfg.grace_s,
        "health_check_period_s": 2,
        "logging_config": {"enable_access_log": False},  # a log line per request costs the replica CPU
    }
    if cfg.ray_max_replicas > cfg.ray_replicas:
        options["autoscaling_config"] = {"min_replicas": cfg.ray_replicas, "max_replicas": cfg.ray_max_replicas,
                                         "target_ongoing_requests": cfg.ray_target_ongoing_requests}
    else:
        options["num_replicas"] = cfg.ray_replicas
    return options


class _Replica:
    """What both replicas share: GET /health (its process and node) and /info (LitServe's shape: the
    bench clients read the server's config from it), their own GET routes, and for a POST route the
    body (bounded) and the API's read_payload, with the same error body; `answer` does the rest."""

    post_routes: tuple[str, ...] = ()

    def get_routes(self) -> dict:
        return {}

    def health(self) -> dict:
        return {}

    async def __call__(self, request):
        import ray
        from fastapi import HTTPException
        from fastapi.responses import JSONResponse

        from roofserve.config import as_dict
        from roofserve.server.http import error_response, read_body

        path, method = request.url.path, request.method
        if path == "/health":
            return JSONResponse({"status": "ok", "platform": "ray", "replica_pid": os.getpid(),
                                 "node_id": ray.get_runtime_context().get_node_id(), **self.health()})
        if path == "/info":
            return JSONResponse({"model": {"model": self.cfg.model, "config": as_dict(self.cfg)}})
        routes = self.get_routes()
        if path in routes:
            return JSONResponse(routes[path])
        if path not in self.post_routes:
            return error_response(404, f"no route {path}: POST {' or '.join(self.post_routes)}, GET /health")
        if method != "POST":
            return error_response(405, f"use POST {path}")
        started = time.perf_counter()
        try:
            body = await read_body(request, self.cfg.max_payload_bytes)
            payload = await self.api.read_payload(request, body)
        except HTTPException as e:
            return error_response(e.status_code, str(e.detail))
        return await self.answer(payload, started)


class VisionReplica(_Replica):
    """One Ray Serve replica of the classifier: a VisionAPI set up as a LitServe worker would be."""

    post_routes = ("/predict",)

    def __init__(self, cfg: VisionConfig, device: str):
        from roofserve.vision.api import VisionAPI

        cfg.threads_per_worker = replica_threads(cfg)
        self.cfg, self.api = cfg, VisionAPI(cfg)
        self.api.setup(device)

    async def batched(self, payloads: list[dict]) -> list:  # wrapped in serve.batch by _app()
        return await asyncio.get_running_loop().run_in_executor(None, self._work, payloads)

    def _work(self, payloads: list[dict]) -> list:
        return self.api.predict([self.api.decode_request(p) for p in payloads])

    async def answer(self, payload: dict, started: float):
        from fastapi.responses import JSONResponse

        from roofserve.server.http import Rejection, error_response

        try:
            output = await asyncio.wait_for(self.batched(payload), self.cfg.timeout_s)
        except TimeoutError:
            return error_response(504, f"no answer within the deadline of {self.cfg.timeout_s:g} s")
        if isinstance(output, Rejection):
            return error_response(output.status, output.message)
        return JSONResponse(output)


_DONE = object()


class LLMReplica(_Replica):
    """One Ray Serve replica of the chat server: an LLMAPI set up as a LitServe worker would be, one
    generation at a time (continuous batching is LitServe's StepLoop), with the same routes, validation,
    limits, streaming and error body. A client that leaves stops its generation."""

    post_routes = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, cfg: LLMConfig, device: str, model_id: str, random_weights: bool):
        from roofserve.llm.api import LLMAPI
        from roofserve.server.metrics import Metrics

        cfg.threads_per_worker = replica_threads(cfg)
        cfg.max_batch_size = 1
        self.cfg, self.api = cfg, LLMAPI(cfg, model_id, random_weights)
        self.api.setup(device)
        self.metrics = Metrics(())  # respond() records TTFT and tokens; Ray exports its own metrics
        self.generating = asyncio.Lock()
        self.cards = [{"id": name, "object": "model", "created": 0, "owned_by": "roofserve", "root": model_id,
                       "max_model_len": cfg.max_seq_len, "backend": cfg.backend, "platform": "ray"}
                      for name in self.api.served]

    def get_routes(self) -> dict:
        return {"/v1/models": {"object": "list", "data": self.cards}}

    def health(self) -> dict:  # Ray exports its own metrics, not ours: the count of cancelled generations is here
        return {"generations_stopped": self.api.stopped[0]}

    async def answer(self, payload: dict, started: float):
        from roofserve.server.http import Rejection, error_response

        payload["deadline"] = time.time() + self.cfg.timeout_s  # checked between tokens, as on LitServe
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def generate() -> None:  # on a thread: the worker side of LitServe's loop
            try:
                for item in self.api.predict(payload):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except Exception:  # an error answer (OpenAI-shaped), never a 200 with the text so far
                log.exception("generating request %s failed", payload["request_id"])
                loop.call_soon_threadsafe(queue.put_nowait, Rejection(500, "the replica failed on this request"))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        try:
            await asyncio.wait_for(self.generating.acquire(), self.cfg.timeout_s)
        except TimeoutError:
            return error_response(504, f"no answer within the deadline of {self.cfg.timeout_s:g} s")
        done = loop.run_in_executor(None, generate)
        done.add_done_callback(lambda _: self.generating.release())
        first = await queue.get()
        if isinstance(first, Rejection):
            return error_response(first.status, first.message)
        if first is _DONE:
            return error_response(500, "the replica failed on this request")

        async def items():
            while (item := await queue.get()) is not _DONE:
                yield item, None

        return await self.api.respond(payload, first, items(), lambda: None, started, self.metrics)


def _app(cfg, device: str, model_id: str | None = None, random_weights: bool = False):
    serve = _serve()
    if isinstance(cfg, LLMConfig):
        options = {**deployment_options(cfg), "max_ongoing_requests": 4}  # one generates, the others wait
        return serve.deployment(name="llm", **options)(LLMReplica).bind(cfg, device, model_id, random_weights)
    return _vision_app(cfg, device)


def _vision_app(cfg: VisionConfig, device: str):
    serve = _serve()
    replica = type("VisionReplica", (VisionReplica,), {
        "batched": serve.batch(max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_timeout_s)(
            VisionReplica.batched)})
    return serve.deployment(name="vision", **deployment_options(cfg))(replica).bind(cfg, device)


def build_app(args: dict):
    """Ray Serve's application builder (`import_path: roofserve.platforms.rayserve:build_app`), for a
    RayService or `serve run`: `args["server"]` is vision (the default) or llm and `args["config"]` holds
    that server's config fields; checked as `serve vision|llm` checks them."""
    from roofserve.config import make_config

    if args.get("server", "vision") == "llm":
        from roofserve.llm.preflight import preflight as llm_preflight

        cfg = make_config(LLMConfig, args.get("config") or {})
        return _app(cfg, *llm_preflight(cfg))  # device, model id, random weights
    from roofserve.vision.preflight import preflight

    cfg = make_config(VisionConfig, args.get("config") or {})
    return _app(cfg, preflight(cfg))


def serve_on_ray(cfg: VisionConfig | LLMConfig, device: str, model_id: str | None = None,
                 random_weights: bool = False) -> None:
    """Run until SIGTERM or Ctrl-C: a local Ray instance (or cfg.ray_address), Ray's proxy on cfg.host:cfg.port."""
    if cfg.resolved_api_key():
        raise UserError("--platform ray does not check API keys yet: put an authenticating proxy in front, "
                        "or serve with --platform litserve")
    serve = _serve()
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # a dead replica's requests: 503 (ray_proxy.py)
    temp_dir = None
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, logging_level=logging.WARNING)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance: nothing to authenticate
        temp_dir = tempfile.mkdtemp(prefix="roofserve-ray-")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=temp_dir, logging_level=logging.WARNING,
                 _node_ip_address="127.0.0.1" if cfg.host in ("127.0.0.1", "localhost") else None)
    stopping = []  # a plain flag: a handler must not take a lock the interrupted main thread may hold
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.timeout_s + 5},
                    proxy_location=cfg.ray_proxy_location, logging_config={"enable_access_log": False})
        serve.run(_app(cfg, device, model_id, random_weights), name=APP, route_prefix="/", blocking=False)
        log.info("serving %s on http://%s:%d (Ray Serve, %d replica(s) x %d thread(s), %s)", cfg.model,
                 cfg.host, cfg.port, cfg.ray_replicas, replica_threads(cfg), cfg.precision)
        while not stopping:
            time.sleep(0.2)
        log.info("draining (up to %g s)", cfg.grace_s)
    finally:
        try:
            # our own instance: stop Serve; a shared cluster: remove only our application (its proxy stays)
            serve.delete(APP) if cfg.ray_address else serve.shutdown()
        finally:
            ray.shutdown()
            if temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)
