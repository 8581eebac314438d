"""Start a roofserve server as a subprocess, wait until it is healthy, and stop it with all its workers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from roofserve.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log_path: str

    def log_tail(self, chars: int = 2000) -> str:
        return Path(self.log_path).read_text(errors="replace")[-chars:]


def start_process(command: list[str], port: int, ready_path: str = "/health", ready_timeout_s: float = 300.0,
                  env: dict | None = None) -> ServerProcess:
    """Any HTTP server `command` that listens on 127.0.0.1:port, returned once GET ready_path is 200."""
    with tempfile.NamedTemporaryFile("w", prefix=f"roofserve-{port}-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so that nothing it starts can outlive it
            env={**os.environ, **(env or {})},
        )
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log.name)
    deadline = time.monotonic() + ready_timeout_s
    while not _ready(server.url + ready_path):
        if proc.poll() is not None:
            raise UserError(f"server exited with code {proc.returncode}; its log ends:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            stop_process_group(proc)
            raise UserError(f"server not healthy after {ready_timeout_s:.0f} s; log: {log.name}")
        time.sleep(0.5)
    return server


def start_server(args: list[str], ready_timeout_s: float = 300.0, env: dict | None = None,
                 port: int | None = None) -> ServerProcess:
    """`roofserve serve ARGS` on 127.0.0.1 and `port` (default: a free one), returned once /health is 200."""
    port = port or free_port()
    command = [sys.executable, "-m", "roofserve", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    return start_process(command, port, ready_timeout_s=ready_timeout_s, env=env)


@contextlib.contextmanager
def server_process(args: list[str], ready_timeout_s: float = 300.0, env: dict | None = None) -> Iterator[ServerProcess]:
    """`roofserve serve ARGS` on 127.0.0.1 and a free port; yields the server once /health is 200 and
    stops its whole process group after."""
    server = start_server(args, ready_timeout_s, env)
    try:
        yield server
    finally:
        stop_process_group(server.proc)


@contextlib.contextmanager
def running_server(args: list[str], ready_timeout_s: float = 300.0, env: dict | None = None) -> Iterator[str]:
    """server_process, yielding only the base URL."""
    with server_process(args, ready_timeout_s, env) as server:
        yield server.url


def stop_process_group(proc: subprocess.Popen, grace_s: float = 30.0) -> int:
    """SIGTERM the server (it drains and stops its workers), wait up to grace_s, then SIGKILL its
    whole process group, so that nothing is left behind whatever happened; returns the exit code."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=10)
