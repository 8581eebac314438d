"""Build and run a roofserve server from a config: the one place both servers are put together."""

from __future__ import annotations

import functools
import logging
import os
import signal

import litserve as ls

from roofserve.machine import raise_fd_limit
from roofserve.server.connections import GuardedHttpProtocol, Limits
from roofserve.server.lit import RoofServer

log = logging.getLogger(__name__)


def worker_threads(cfg) -> int:
    """torch threads per worker: the configured number, or the cores shared among the workers."""
    return cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // cfg.workers_per_device)


def make_server(api: ls.LitAPI, cfg, accelerator: str, model: str) -> RoofServer:
    """A RoofServer for `api` with the knobs every roofserve server shares (a ServerConfig)."""
    from roofserve.config import as_dict

    return RoofServer(
        api,
        max_payload_bytes=cfg.max_payload_bytes,
        max_queued_requests=cfg.max_queued_requests,
        api_key=cfg.resolved_api_key(),
        accelerator=accelerator,
        devices=1,
        workers_per_device=cfg.workers_per_device,
        timeout=cfg.timeout_s,
        grace_s=cfg.grace_s,
        drain_s=cfg.drain_s,
        transport=cfg.transport,
        model_metadata={"model": model, "config": as_dict(cfg)},
    )


def connection_limits(cfg) -> Limits:
    """The connection limits of a ServerConfig, max_connections lowered to what the open-file limit allows."""
    reserve = 256  # files the HTTP process needs besides client sockets (queues, pipes, libraries)
    allowed = raise_fd_limit(cfg.max_connections + reserve) - reserve
    if allowed < cfg.max_connections:
        log.warning("max_connections lowered from %d to %d: the open-file limit (ulimit -n) is %d",
                    cfg.max_connections, allowed, allowed + reserve)
    return Limits(header_timeout_s=cfg.header_timeout_s, body_timeout_s=cfg.body_timeout_s,
                  slow_reader_timeout_s=cfg.slow_reader_timeout_s, max_connections=max(1, allowed),
                  max_connections_per_client=cfg.max_connections_per_client, max_header_bytes=cfg.max_header_bytes,
                  max_headers=cfg.max_headers, send_buffer_bytes=cfg.send_buffer_bytes)


def run_server(server: RoofServer, cfg) -> None:
    """Serve on cfg.host:cfg.port with one HTTP process and no access log (it costs CPU per request),
    through our guarded HTTP protocol (connection timeouts and bounds, see server.connections).
    Returns after SIGTERM once the server has drained and every child process has stopped; exits
    with code 1 (after stopping the workers) if the HTTP process dies."""
    signal.signal(signal.SIGTERM, lambda *_: server.begin_shutdown())
    protocol = functools.partial(GuardedHttpProtocol, limits=connection_limits(cfg))
    server.run(host=cfg.host, port=cfg.port, generate_client_file=False, num_api_servers=1, access_log=False,
               http=protocol, timeout_keep_alive=cfg.keep_alive_s)
    if server.http_died:
        raise SystemExit(f"error: {server.http_died}; the server stopped")


