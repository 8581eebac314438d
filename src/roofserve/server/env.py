"""The process environment every roofserve server (and benchmark) runs with: the malloc, set
before the interpreter starts by re-executing the command, the log format, and a server's checks at
start run in a child process (call_apart), so that its HTTP process never imports torch. No torch or
LitServe imports here."""

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


_USER_ERROR = "roofserve-user-error: "


def call_apart(target: str, cfg) -> object:
    """`target(cfg)` ("package.module:function", cfg a config dataclass) in a child process, for a
    server's HTTP process: a server's checks need torch (the device, the model's files, compiled
    kernels), and torch would hold ~0.3 GB of that process's memory, and of each process LitServe forks
    from it, for nothing: only the workers run models. Returns the function's JSON result; its
    UserError is raised here (one line); its log goes to this process's stderr."""
    import dataclasses
    import json
    import subprocess

    cls = type(cfg)
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "api_key"}  # no secret in `ps`
    code = "import sys; from roofserve.server.env import _child; _child(*sys.argv[1:])"
    command = [sys.executable, "-c", code, target, f"{cls.__module__}:{cls.__name__}", json.dumps(fields)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if lines and lines[-1].startswith(_USER_ERROR):
        raise UserError(json.loads(lines[-1].removeprefix(_USER_ERROR)))
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the server's checks failed (exit status {done.returncode}); see the lines above")
    return json.loads(lines[-1])


def _child(target: str, cls_path: str, fields: str) -> None:
    import importlib
    import json

    from roofserve.config import make_config

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    (module, name), (cls_module, cls_name) = target.split(":"), cls_path.split(":")
    fn = getattr(importlib.import_module(module), name)
    cls = getattr(importlib.import_module(cls_module), cls_name)
    try:
        result = fn(make_config(cls, json.loads(fields)))
    except UserError as e:
        print(_USER_ERROR + json.dumps(str(e)), flush=True)
        return
    print(json.dumps(result), flush=True)
