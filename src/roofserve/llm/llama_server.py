"""llama.cpp's own HTTP server as a backend of `roofserve serve llm`: the continuous-batching peer.

`roofserve serve llm --backend llama-server --max-batch-size N` runs `llama-server --parallel N` on the
same GGUF, threads, context and address, so that a ladder step, a benchmark or a test treats it like
our server (`/health`, `/v1/chat/completions`; SIGTERM stops it). Our knobs that llama.cpp has no
equivalent for are not passed. Build it with `make llama-server` (scripts/build_llama_server.sh).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from roofserve.config import LLMConfig
from roofserve.errors import UserError

BUILT = Path(".cache/llama-server/bin")  # what `make llama-server` builds: llama-server, llama-bench, llama-quantize


def find_llama_tool(name: str = "llama-server") -> str:
    """$ROOFSERVE_LLAMA_SERVER (for llama-server; $ROOFSERVE_LLAMA_BENCH, ... for the others), the binary
    `make llama-server` builds, or `name` on PATH."""
    variable = "ROOFSERVE_" + name.upper().replace("-", "_")
    for candidate in (os.environ.get(variable), str((BUILT / name).resolve()), shutil.which(name)):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise UserError(f"{name} not found: build it with `make llama-server` (about 6 minutes), or set "
                    f"{variable} to its path")


def command(cfg: LLMConfig) -> list[str]:
    from roofserve.llm.llamacpp import gguf_path

    threads = cfg.threads_per_worker or os.cpu_count() or 1
    return [find_llama_tool(), "-m", str(gguf_path(cfg.model)), "--host", cfg.host, "--port", str(cfg.port),
            "-t", str(threads), "--parallel", str(cfg.max_batch_size),
            "-c", str(cfg.max_seq_len * cfg.max_batch_size),  # llama-server splits its context among the slots
            "-b", str(max(cfg.prefill_chunk, 64)), "--no-webui"]


def environ(cfg: LLMConfig) -> dict[str, str]:
    """llama-server's environment: ours, plus the API key we were given, so that it checks the same key
    (Authorization: Bearer or X-API-Key, as ours does). Through the environment, not `--api-key`: a
    command line is visible to every user in `ps`. LLAMA_API_KEY is the name the llama.cpp that
    `make llama-server` builds reads; LLAMA_ARG_API_KEY the name older builds read."""
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_API_KEY", "LLAMA_ARG_API_KEY")}
    key = cfg.resolved_api_key()
    if key:
        if "," in key:  # llama-server reads a comma-separated list of keys
            raise UserError("--backend llama-server takes an API key without commas")
        env["LLAMA_API_KEY"] = env["LLAMA_ARG_API_KEY"] = key
    return env


def exec_server(cfg: LLMConfig) -> None:
    """Replace this process with llama-server (so SIGTERM reaches it directly)."""
    argv, env = command(cfg), environ(cfg)
    os.execve(argv[0], argv, env)
