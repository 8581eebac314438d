"""Shared test fixtures: the real test images and a real server started as a subprocess."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest

from roofserve.bench.process import running_server  # noqa: F401  (shared with `roofserve sweep`)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed (make test installs it)")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def images() -> dict[str, bytes]:
    """chelsea (a cat, from scikit-image), bull mastiff and dalmatian (ImageNet photos from foolbox)."""
    foolbox = _package_dir("foolbox") / "data"
    return {
        "chelsea": (_package_dir("skimage") / "data" / "chelsea.png").read_bytes(),
        "bull mastiff": (foolbox / "imagenet_00_243.jpg").read_bytes(),
        "dalmatian": (foolbox / "imagenet_16_251.jpg").read_bytes(),
    }


def metric(url: str, name: str) -> float:
    """The value of one unlabelled metric from the server's /metrics."""
    lines = httpx.get(url + "/metrics").text.splitlines()
    return float(next(line for line in lines if line.startswith(name + " ")).split()[-1])


EXPECTED = {"chelsea": ("cat", None), "bull mastiff": ("dog", "bull mastiff"), "dalmatian": ("dog", "dalmatian")}


