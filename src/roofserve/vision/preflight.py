"""Catch user mistakes in a vision config before any worker (or Ray replica) starts: one line each."""

from __future__ import annotations

from roofserve.config import VisionConfig
from roofserve.errors import UserError


def resolved(cfg: VisionConfig) -> list[str]:
    """[accelerator, runtime, precision] after preflight: what a server's HTTP process gets from the
    checks run apart (server.env.call_apart), where preflight's changes to cfg would be lost."""
    return [preflight(cfg), cfg.runtime, cfg.precision]


def preflight(cfg: VisionConfig) -> str:
    """Catch user mistakes before worker processes start; returns the accelerator for LitServe."""
    import timm
    import torch

    from roofserve.config import DEFAULT_VISION_MODEL
    from roofserve.device import resolve_accelerator
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
