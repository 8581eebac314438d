"""The photos roofserve sends and checks by default: ones that PyPI packages ship (scikit-image's
chelsea and coffee, foolbox's labelled ImageNet samples), so that no download is needed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from roofserve.errors import UserError

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
# name -> (package, path inside it)
REFERENCE_PHOTOS = {
    "chelsea": ("skimage", "data/chelsea.png"),
    "bull mastiff": ("foolbox", "data/imagenet_00_243.jpg"),
    "dalmatian": ("foolbox", "data/imagenet_16_251.jpg"),
}
# what the classifier must answer for each: (animal, breed among the top breeds, or None)
EXPECTED = {"chelsea": ("cat", None), "bull mastiff": ("dog", "bull mastiff"), "dalmatian": ("dog", "dalmatian")}


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def reference_photos() -> dict[str, bytes]:
    """The three photos with known answers (EXPECTED); a UserError names the missing package."""
    out = {}
    for name, (package, path) in REFERENCE_PHOTOS.items():
        root = package_dir(package)
        if root is None or not (root / path).is_file():
            raise UserError(f"the reference photos need {package}: make setup installs it (pip install --no-deps)")
        out[name] = (root / path).read_bytes()
    return out


def example_images(folder: str | None = None) -> list[tuple[str, bytes]]:
    """Images to send: those in `folder`, or the photos that scikit-image and foolbox ship."""
    if folder:
        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not paths:
            raise UserError(f"no .jpg/.png/.webp images in {folder}")
    else:
        paths = []
        for package, names in (
            ("skimage", ("data/chelsea.png", "data/coffee.png", "data/astronaut.png")),
            ("foolbox", ("data/imagenet_00_243.jpg", "data/imagenet_16_251.jpg", "data/imagenet_01_559.jpg")),
        ):
            root = package_dir(package)
            if root:
                paths += [root / n for n in names if (root / n).is_file()]
        if not paths:
            raise UserError("no example images: pass --images DIR, or pip install scikit-image and foolbox (--no-deps)")
    return [(p.name, p.read_bytes()) for p in paths]
