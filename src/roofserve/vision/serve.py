"""Start the vision server: check the config in this process, then hand over to LitServe."""

from __future__ import annotations

import logging

from roofserve.config import VisionConfig
from roofserve.errors import UserError
from roofserve.device import resolve_accelerator
from roofserve.server.app import make_server, run_server
from roofserve.server.env import reexec_with, tuned_environ

log = logging.getLogger(__name__)


def preflight(cfg: VisionConfig) -> str:
    """Catch user mistakes before worker processes start; returns the accelerator for LitServe."""
    import timm
    import torch

    from roofserve.config import DEFAULT_VISION_MODEL
    from roofserve.vision.model import default_weights_path

    if not timm.is_model(cfg.model):
        raise UserError(f"unknown timm model {cfg.model!r}; see timm.list_models()")
    if cfg.weights is None and cfg.model == DEFAULT_VISION_MODEL:
        default_weights_path()
    elif cfg.weights is None:
        raise UserError(f"no bundled weights for {cfg.model}: pass --weights PATH, --weights hub or --weights random")
    elif cfg.weights not in ("hub", "random"):
        from pathlib import Path

        if not Path(cfg.weights).is_file():
            raise UserError(f"weights file not found: {cfg.weights}")
    accelerator = resolve_accelerator(cfg)
    from roofserve.vision.runtimes import resolve

    # results record what ran: auto resolved, and a missing runtime is one line here, not a worker traceback
    cfg.runtime, cfg.precision = resolve(cfg.runtime, cfg.precision, torch.device(accelerator))
    return accelerator


def serve(cfg: VisionConfig) -> None:
    reexec_with(tuned_environ(cfg.allocator))
    accelerator = preflight(cfg)
    if cfg.engine == "ray":
        from roofserve.engines.rayserve import serve_on_ray

        return serve_on_ray(cfg, accelerator)
    from roofserve.vision.api import VisionAPI

    server = make_server(VisionAPI(cfg), cfg, accelerator, cfg.model)
    log.info("serving %s on http://%s:%d/predict (%s, %s %s)", cfg.model, cfg.host, cfg.port, accelerator,
             cfg.runtime, cfg.precision)
    run_server(server, cfg)
