"""The fleet contract without a cluster: N replicas of a server behind a real load balancer (haproxy,
health-checking `/health`) on 127.0.0.1, and a rolling restart under load: SIGTERM one replica, start it
again on its port, wait until it is healthy and back in the balancer, then the next. Every request must
be answered 2xx: no request lost, no 5xx. No torch here (client side).

What makes it hold: a replica that gets SIGTERM answers 503 on /health at once but keeps serving for
DRAIN_S (`--drain-s`), long enough for haproxy's next check to take it out; then it refuses new
connections and finishes its admitted requests (server/lit.py). Without that pause a connection haproxy
opened just before the port closed sat in the listen backlog and was reset after the request was sent:
a 502 (seen once in CI, 1 of 1569 requests). haproxy still retries a refused connection on another
replica (`retries` + `option redispatch`). One request per server-side connection (`option
http-server-close`), so a request never lands on a connection the draining server is about to close.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from roofserve.errors import UserError
from roofserve.load import core
from roofserve.load.http import Connection, run_loop
from roofserve.load.process import ServerProcess, free_port, start_process, start_server, stop_process_group

log = logging.getLogger(__name__)

CHECK_INTERVAL_MS = 300
RISE = 2  # healthy checks in a row before haproxy sends to a replica again
DRAIN_S = 3 * CHECK_INTERVAL_MS / 1000  # fall 1: one failed check (every CHECK_INTERVAL_MS) takes a replica out

HAPROXY_CFG = """\
global
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    timeout http-request 30s
    retries 3
    option redispatch
    option http-server-close
frontend fleet
    bind 127.0.0.1:{port}
    default_backend replicas
    stats enable
    stats uri /haproxy-stats
backend replicas
    balance leastconn
    option httpchk GET /health
    http-check expect status 200
    default-server inter {inter}ms fall 1 rise {rise}
{servers}
"""


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                            if Path(p).is_file()), None)
    if not found:
        raise UserError("haproxy is not installed: apt-get install haproxy (make setup does where it can)")
    return found


def start_haproxy(ports: list[int]) -> tuple[subprocess.Popen, int, str]:
    """haproxy in the foreground on a free port in front of 127.0.0.1:ports; (process, port, config path)."""
    port = free_port()
    servers = "\n".join(f"    server r{i} 127.0.0.1:{p} check" for i, p in enumerate(ports))
    cfg = Path(tempfile.mkdtemp(prefix="roofserve-fleet-")) / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=port, inter=CHECK_INTERVAL_MS, rise=RISE, servers=servers))
    proc = start_process([haproxy_binary(), "-f", str(cfg), "-db"], port, ready_path="/haproxy-stats",
                         ready_timeout_s=30).proc
    return proc, port, str(cfg)


def _up(stats_url: str, name: str) -> bool:
    """Whether haproxy's stats (CSV) say replica `name` is UP."""
    with urllib.request.urlopen(stats_url + ";csv", timeout=5) as response:
        for line in response.read().decode().splitlines():
            fields = line.split(",")
            if len(fields) > 17 and fields[0] == "replicas" and fields[1] == name:
                return fields[17].startswith("UP")
    return False


def wait_up(stats_url: str, name: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not _up(stats_url, name):
        if time.monotonic() > deadline:
            raise UserError(f"haproxy did not mark {name} UP within {timeout_s:.0f} s")
        time.sleep(0.1)


def rolling_restart(server_args: list[str], send_factory, replicas: int = 2, concurrency: int = 8,
                    max_duration_s: float = 600.0, settle_s: float = 2.0) -> dict:
    """Start `replicas` servers (`roofserve serve SERVER_ARGS`) behind haproxy, load them through it with
    `concurrency` closed-loop clients (send_factory() -> core.Send), restart each replica in
    turn, and return the fleet row: requests, errors by kind, restart times. The replicas drain for
    DRAIN_S unless SERVER_ARGS (its first item is the model kind) give their own --drain-s."""
    if replicas < 2:
        raise UserError("a rolling restart needs at least 2 replicas")
    server_args = [*server_args[:1], f"--drain-s={DRAIN_S}", *server_args[1:]]  # the last one given wins
    ports = [free_port() for _ in range(replicas)]
    servers: list[ServerProcess | None] = [None] * replicas
    haproxy = None
    try:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(replicas) as pool:  # warm-ups overlap: each waits on its own /health
            futures = [pool.submit(start_server, server_args, port=port) for port in ports]
        errors = [f.exception() for f in futures if f.exception() is not None]
        for i, future in enumerate(futures):
            servers[i] = None if future.exception() else future.result()  # all stopped in `finally`
        if errors:
            raise errors[0]
        haproxy, lb_port, _ = start_haproxy(ports)
        lb, stats = f"http://127.0.0.1:{lb_port}", f"http://127.0.0.1:{lb_port}/haproxy-stats"
        for i in range(replicas):
            wait_up(stats, f"r{i}")
        done = threading.Event()
        restarts: list[dict] = []
        failure: list[BaseException] = []

        def restart_each() -> None:
            try:
                time.sleep(settle_s)  # load before the first restart
                for i, port in enumerate(ports):
                    started = time.monotonic()
                    code = stop_process_group(servers[i].proc)
                    stopped = time.monotonic()
                    servers[i] = start_server(server_args, port=port)
                    wait_up(stats, f"r{i}")
                    restarts.append({"replica": i, "exit_code": code, "stop_s": round(stopped - started, 2),
                                     "back_in_balancer_s": round(time.monotonic() - started, 2)})
                    time.sleep(settle_s)
            except BaseException as e:  # reported after the load stops
                failure.append(e)
            finally:
                done.set()

        worker = threading.Thread(target=restart_each, daemon=True)
        worker.start()
        results, wall = run_loop(core.run(lambda: Connection(lb), send_factory(), core.Concurrency(concurrency),
                                          10**6, max_duration_s, warmup=concurrency, should_stop=done.is_set))
        worker.join()
        if failure:
            raise failure[0]
    finally:
        if haproxy is not None:
            stop_process_group(haproxy, grace_s=5)
        for server in servers:
            if server is not None:
                stop_process_group(server.proc)
    row = {"kind": "fleet", "replicas": replicas, "concurrency": concurrency, "balancer": "haproxy",
           "restarts": restarts, **core.summarize(results, wall).row()}
    row["status_5xx"] = sum(1 for r in results if (r.status or 0) >= 500)
    row["passed"] = row["errors"] == 0 and len(restarts) == replicas and all(r["exit_code"] == 0 for r in restarts)
    return row
