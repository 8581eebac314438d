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

from roofserve.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def running_server(args: list[str], ready_timeout_s: float = 300.0, env: dict | None = None) -> Iterator[str]:
    """`roofserve serve ARGS` on 127.0.0.1 and a free port; yields the base URL once /health is 200."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix=f"roofserve-{port}-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "roofserve", "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so that stopping it reaches every worker
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not _healthy(url):
            if proc.poll() is not None:
                log.seek(0)
                raise UserError(f"server exited with code {proc.returncode}; its log ends:\n{log.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise UserError(f"server not healthy after {ready_timeout_s:.0f} s; log: {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        stop_process_group(proc)
        log.close()


def stop_process_group(proc: subprocess.Popen, grace_s: float = 15.0) -> int:
    """SIGTERM the group, wait up to grace_s, then SIGKILL what is left; returns the exit code."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=10)
