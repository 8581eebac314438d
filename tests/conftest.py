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
