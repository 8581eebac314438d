"""The LLM server's checks, run in the main process before any worker starts: a user mistake is one
line here, not a traceback in a worker. Benches and sweeps run the same checks."""

from __future__ import annotations

import json
import subprocess
import sys

from roofserve.config import LLMConfig, as_dict, make_config
from roofserve.errors import UserError

_USER_ERROR = "roofserve-preflight-user-error: "


def preflight_apart(cfg: LLMConfig) -> tuple[str, str, bool]:
    """preflight(cfg) in a child process, for the HTTP process of a server: the checks need torch (the
    device, the model's files, the CPU kernels' build), and torch would hold ~0.3 GB of that process's
    memory (and of the two processes LitServe forks from it) for nothing: only the workers run models."""
    fields = {k: v for k, v in as_dict(cfg, hide=()).items() if k != "api_key"}
    code = "import json, sys; from roofserve.llm.preflight import _child; _child(json.loads(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(fields)], stdout=subprocess.PIPE, text=True,
                          check=False)  # stderr: the user's terminal (the kernels' build says what it does)
    lines = done.stdout.strip().splitlines()
    if lines and lines[-1].startswith(_USER_ERROR):
        raise UserError(json.loads(lines[-1].removeprefix(_USER_ERROR)))
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the server's checks failed (exit status {done.returncode}); see the lines above")
    accelerator, model_id, random_weights = json.loads(lines[-1])
    return accelerator, model_id, random_weights


def _child(fields: dict) -> None:
    import logging

    from roofserve.server.env import LOG_FORMAT

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        result = preflight(make_config(LLMConfig, fields))
    except UserError as e:
        print(_USER_ERROR + json.dumps(str(e)), flush=True)
        return
    print(json.dumps(result), flush=True)


def preflight(cfg: LLMConfig) -> tuple[str, str, bool]:
    """(accelerator, model id, random weights?) or a UserError before any worker starts."""
    import importlib.util
    from pathlib import Path

    from roofserve.device import resolve_accelerator
    from roofserve.llm.model import check_source

    check_source(cfg.model)
    accelerator = resolve_accelerator(cfg)
    if cfg.quantize == "bnb4":
        if accelerator == "cpu":
            raise UserError("bitsandbytes 4-bit needs a CUDA GPU; on CPU use --quantize int4 (torchao)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("--quantize bnb4 needs bitsandbytes: pip install bitsandbytes")
    if "roofserve" in (cfg.gemv, cfg.attention):
        if accelerator != "cpu":
            raise UserError("--gemv roofserve and --attention roofserve are CPU kernels; on a GPU leave them out")
        from roofserve.llm.kernels import load_kernel

        load_kernel()  # builds them now (a compiler error is one line here), so workers load them from the cache
    if cfg.lora:
        if importlib.util.find_spec("peft") is None:
            raise UserError("--lora needs peft: pip install 'roofserve[lora]'")
        if cfg.lora.startswith("random:"):
            if not cfg.lora.removeprefix("random:").isdigit() or int(cfg.lora.removeprefix("random:")) < 1:
                raise UserError(f"--lora random:RANK needs a positive integer rank, got {cfg.lora!r}")
        elif not (Path(cfg.lora) / "adapter_config.json").is_file():
            raise UserError(f"no PEFT adapter (adapter_config.json) in {cfg.lora}")
    if cfg.backend == "llama-server":
        from roofserve.llm.llama_server import command

        command(cfg)  # the binary and the .gguf are there
    if cfg.backend == "llamacpp":
        from roofserve.llm.llamacpp import gguf_path

        gguf_path(cfg.model)
        if importlib.util.find_spec("llama_cpp") is None:
            raise UserError("llama-cpp-python is not installed: pip install 'roofserve[llamacpp]' (builds in ~5 min)")
    random_weights = cfg.model.startswith("random:")
    model_id = f"random-{cfg.model[7:]}" if random_weights else cfg.model
    return accelerator, model_id, random_weights
