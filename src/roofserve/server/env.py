"""The process environment every roofserve server (and benchmark) runs with: the malloc, set
before the interpreter starts by re-executing the command, and the log format. No torch or LitServe
imports here."""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from pathlib import Path

from roofserve.errors import UserError

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def worker_logging() -> None:
    """Worker processes are spawned: they do not inherit the CLI's logging setup, so give them the same
    (else their INFO lines, such as the accuracy guard's verdict, are lost)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


# glibc reads these at process start; the CLI re-executes itself with them set (see tuned_environ).
_GLIBC_TUNED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
_ALLOCATOR_LIBS = {"jemalloc": ("jemalloc", "libjemalloc.so.2"), "tcmalloc": ("tcmalloc", "libtcmalloc_minimal.so.4")}

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
