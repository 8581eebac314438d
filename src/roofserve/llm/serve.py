"""Start the LLM server: check the config here, load the model in the worker, serve the OpenAI API."""

from __future__ import annotations

import logging

from fastapi import Depends
from fastapi.responses import JSONResponse

from roofserve.config import LLMConfig
from roofserve.llm.preflight import preflight
from roofserve.server.app import make_server, run_server
from roofserve.server.env import reexec_with, tuned_environ

log = logging.getLogger(__name__)


def serve(cfg: LLMConfig) -> None:
    reexec_with(tuned_environ(cfg.allocator))
    accelerator, model_id, random_weights = preflight(cfg)
    if cfg.backend == "llama-server":
        from roofserve.llm.llama_server import exec_server

        log.info("handing over to llama.cpp's llama-server on http://%s:%d", cfg.host, cfg.port)
        exec_server(cfg)
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
