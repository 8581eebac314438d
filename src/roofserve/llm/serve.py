"""Start the LLM server: check the config here, load the model in the worker, serve the OpenAI API."""

from __future__ import annotations

import asyncio
import functools
import logging

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from roofserve.config import LLMConfig
from roofserve.llm.generator import chat_template_ids
from roofserve.llm.preflight import preflight
from roofserve.llm.protocol import parse_body, validate_detokenize_request, validate_tokenize_request
from roofserve.server.app import make_server, run_server
from roofserve.server.env import call_apart, reexec_with, tuned_environ
from roofserve.server.http import read_body

log = logging.getLogger(__name__)


def serve(cfg: LLMConfig) -> None:
    reexec_with(tuned_environ(cfg.allocator))
    # on LitServe, this process only speaks HTTP: it checks in a child and never imports torch
    accelerator, model_id, random_weights = preflight(cfg) if cfg.platform == "ray" else \
        call_apart("roofserve.llm.preflight:preflight", cfg)
    if cfg.backend == "llama-server":
        from roofserve.llm.llama_server import exec_server

        log.info("handing over to llama.cpp's llama-server on http://%s:%d", cfg.host, cfg.port)
        exec_server(cfg)
    if cfg.platform == "ray":
        from roofserve.platforms.rayserve import serve_on_ray

        return serve_on_ray(cfg, accelerator, model_id, random_weights)
    from roofserve.llm.api import LLMAPI

    api = LLMAPI(cfg, model_id, random_weights)
    server = make_server(api, cfg, accelerator, model_id)
    auth = [Depends(server.setup_auth())]
    cards = [{"id": name, "object": "model", "created": 0, "owned_by": "roofserve", "root": model_id,
              "max_model_len": cfg.max_seq_len, "backend": cfg.backend, "random_weights": random_weights}
             for name in api.served]

    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": cards})

    async def version() -> JSONResponse:
        from importlib.metadata import version as installed

        return JSONResponse({"version": installed("roofserve")})

    tokenizer = _Tokenizer(cfg.model)

    async def tokenize(request: Request) -> JSONResponse:
        doc = parse_body(await read_body(request, cfg.max_payload_bytes))
        spec = validate_tokenize_request(doc, api.served)
        ids = await tokenizer.run(_tokenize, spec)
        return JSONResponse({"count": len(ids), "max_model_len": cfg.max_seq_len, "tokens": ids})

    async def detokenize(request: Request) -> JSONResponse:
        doc = parse_body(await read_body(request, cfg.max_payload_bytes))
        vocab = await tokenizer.run(len)
        ids = validate_detokenize_request(doc, api.served, vocab)
        return JSONResponse({"prompt": await tokenizer.run(lambda t: t.decode(ids))})

    server.app.add_api_route("/v1/models", models, methods=["GET"], dependencies=auth)
    server.app.add_api_route("/version", version, methods=["GET"], dependencies=auth)
    server.app.add_api_route("/tokenize", tokenize, methods=["POST"], dependencies=auth)
    server.app.add_api_route("/detokenize", detokenize, methods=["POST"], dependencies=auth)
    log.info("serving %s as %s on http://%s:%d/v1/chat/completions and /v1/completions (%s)", model_id,
             ", ".join(api.served), cfg.host, cfg.port, accelerator)
    run_server(server, cfg)


def _tokenize(tokenizer, spec: dict) -> list[int]:
    if "messages" in spec:
        return chat_template_ids(tokenizer, spec["messages"], spec["add_generation_prompt"])
    return list(tokenizer(spec["prompt"], add_special_tokens=spec["add_special_tokens"])["input_ids"])


class _Tokenizer:
    """The model's tokenizer in the HTTP process, for /tokenize and /detokenize (not through the worker
    queue, where they would wait behind generations). Loaded on first use, on a thread, so that the
    event loop keeps serving meanwhile; calls run on that thread too."""

    def __init__(self, source: str):
        self.source = source
        self._tokenizer = None
        self._lock = asyncio.Lock()

    async def run(self, fn, *args):
        loop = asyncio.get_running_loop()
        async with self._lock:
            if self._tokenizer is None:
                from roofserve.llm.model import load_tokenizer

                self._tokenizer = await loop.run_in_executor(None, load_tokenizer, self.source)
        return await loop.run_in_executor(None, functools.partial(fn, self._tokenizer, *args))
