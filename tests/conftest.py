"""Shared test fixtures: the real test images and a real server started as a subprocess."""

from __future__ import annotations

import httpx
import pytest
import torch

from roofserve.errors import UserError
from roofserve.examples import reference_photos
from roofserve.load.process import running_server  # noqa: F401  (shared with `roofserve sweep`)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need a CUDA device: skipped cleanly without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none visible to torch)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def images() -> dict[str, bytes]:
    """chelsea (a cat, from scikit-image), bull mastiff and dalmatian (ImageNet photos from foolbox)."""
    try:
        return reference_photos()
    except UserError as e:
        pytest.skip(str(e))


def metric(url: str, name: str) -> float:
    """The value of one metric, labels included in `name` if it has any, from the server's /metrics."""
    lines = httpx.get(url + "/metrics").text.splitlines()
    return float(next(line for line in lines if line.startswith(name + " ")).split()[-1])


def torch_in_server_processes(server) -> tuple[list[list[str]], int, int]:
    """For a running ServerProcess: (command lines of its HTTP process and LitServe's forks of it that have
    torch loaded, how many such processes there are, how many of its spawned workers have torch loaded).
    Only the workers run models; the others should hold no torch (~0.3 GB resident in each)."""
    import psutil

    def loaded(p: psutil.Process) -> bool:
        return any("libtorch_cpu" in m.path for m in p.memory_maps())

    http = psutil.Process(server.proc.pid)
    spawned = lambda p: "spawn_main" in " ".join(p.cmdline())  # noqa: E731
    family = [http, *[c for c in http.children(recursive=True) if not spawned(c) and not spawned(c.parent())]]
    workers = [c for c in http.children() if spawned(c)]
    return [p.cmdline() for p in family if loaded(p)], len(family), sum(loaded(w) for w in workers)
