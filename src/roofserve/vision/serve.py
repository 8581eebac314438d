"""Start the vision server: check the config in this process, then hand over to LitServe."""

from __future__ import annotations

import logging

from roofserve.config import VisionConfig
from roofserve.server.app import make_server, run_server
from roofserve.server.env import call_apart, reexec_with, tuned_environ
from roofserve.vision.preflight import preflight

log = logging.getLogger(__name__)


def serve(cfg: VisionConfig) -> None:
    reexec_with(tuned_environ(cfg.allocator))
    if cfg.platform == "ray":
        from roofserve.platforms.rayserve import serve_on_ray

        return serve_on_ray(cfg, preflight(cfg))
    # this process only speaks HTTP: it checks in a child and never imports torch
    accelerator, cfg.runtime, cfg.precision = call_apart("roofserve.vision.preflight:resolved", cfg)
    from roofserve.vision.api import VisionAPI

    server = make_server(VisionAPI(cfg), cfg, accelerator, cfg.model)
    log.info("serving %s on http://%s:%d/predict (%s, %s %s)", cfg.model, cfg.host, cfg.port, accelerator,
             cfg.runtime, cfg.precision)
    run_server(server, cfg)
