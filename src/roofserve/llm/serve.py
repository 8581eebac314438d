"""Start the LLM server: check the config here, load the model in the worker, serve the OpenAI API."""

from __future__ import annotations

import logging

from fastapi import Depends
from fastapi.responses import JSONResponse

from roofserve.config import LLMConfig
from roofserve.errors import UserError
from roofserve.server import make_server, reexec_with, resolve_accelerator, run_server, tuned_environ

log = logging.getLogger(__name__)


def preflight(cfg: LLMConfig) -> tuple[str, str, bool]:
    """(accelerator, model id, random weights?) or a UserError before any worker starts."""
    import importlib.util
    from pathlib import Path

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
    if cfg.backend == "llamacpp":
        from roofserve.llm.llamacpp import gguf_path

        gguf_path(cfg.model)
        if importlib.util.find_spec("llama_cpp") is None:
            raise UserError("llama-cpp-python is not installed: pip install 'roofserve[llamacpp]' (builds in ~5 min)")
    random_weights = cfg.model.startswith("random:")
    model_id = f"random-{cfg.model[7:]}" if random_weights else cfg.model
    return accelerator, model_id, random_weights


def serve(cfg: LLMConfig) -> None:
    reexec_with(tuned_environ(cfg.allocator))
    accelerator, model_id, random_weights = preflight(cfg)
    from roofserve.llm.api import LLMAPI

    api = LLMAPI(cfg, model_id, random_weights)
    server = make_server(api, cfg, accelerator, model_id)
    card = {"id": model_id, "object": "model", "created": 0, "owned_by": "roofserve",
            "backend": cfg.backend, "random_weights": random_weights}

    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [card]})

    server.app.add_api_route("/v1/models", models, methods=["GET"], dependencies=[Depends(server.setup_auth())])
    log.info("serving %s on http://%s:%d/v1/chat/completions (%s)", model_id, cfg.host, cfg.port, accelerator)
    run_server(server, cfg)
