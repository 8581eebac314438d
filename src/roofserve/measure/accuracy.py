"""The accuracy guard: does a runtime and precision give the answers of fp32 PyTorch?

On foolbox's 20 labelled ImageNet photos and the other photos we ship (scikit-image's): the same top-1
class on at least 19 of the 20, the same cat / dog / other on every photo, and the mean absolute
difference of the 1000 probabilities reported. A runtime or precision that fails is never a default
and is flagged in the report. The photos are also int8's calibration set (no download): a guard on
photos the quantizer has seen is the floor of what a user should check on their own data.
"""

from __future__ import annotations

import re

import torch

from roofserve.errors import UserError
from roofserve.examples import package_dir

MIN_TOP1_AGREE = 19  # of foolbox's 20
_FOOLBOX = re.compile(r"imagenet_\d+_(\d+)\.jpg$")
_SKIMAGE = ("chelsea.png", "coffee.png", "astronaut.png")


def guard_photos() -> list[tuple[str, bytes, int | None]]:
    """(name, bytes, ImageNet label or None): foolbox's 20 labelled photos, then scikit-image's."""
    out = []
    foolbox = package_dir("foolbox")
    if foolbox is None or not (foolbox / "data").is_dir():
        raise UserError("the accuracy guard needs foolbox's photos: make setup installs it (pip install --no-deps foolbox)")
    for path in sorted((foolbox / "data").glob("imagenet_*.jpg")):
        out.append((path.name, path.read_bytes(), int(_FOOLBOX.search(path.name).group(1))))
    skimage = package_dir("skimage")
    for name in _SKIMAGE:
        if skimage and (skimage / "data" / name).is_file():
            out.append((name, (skimage / "data" / name).read_bytes(), None))
    return out


def animal(probs: torch.Tensor) -> str:
    from roofserve.vision.labels import animal_groups

    groups = animal_groups(probs.float())
    return max(groups, key=groups.get)


def compare(probs: torch.Tensor, reference: torch.Tensor, labels: list[int | None]) -> dict:
    """The guard's numbers for (N, classes) probabilities against fp32 PyTorch's on the same photos."""
    labelled = [i for i, label in enumerate(labels) if label is not None]
    top1, ref_top1 = probs.argmax(-1), reference.argmax(-1)
    top1_agree = int((top1[labelled] == ref_top1[labelled]).sum())
    animals_agree = sum(animal(p) == animal(r) for p, r in zip(probs, reference))
    diff = (probs.float() - reference.float()).abs()
    needed = min(MIN_TOP1_AGREE, len(labelled))
    return {
        "photos": len(labels), "labelled_photos": len(labelled),
        "top1_agree": top1_agree, "animal_agree": animals_agree,
        "top1_correct": int(sum(int(top1[i]) == labels[i] for i in labelled)),
        "reference_top1_correct": int(sum(int(ref_top1[i]) == labels[i] for i in labelled)),
        "mean_abs_prob_diff": float(diff.mean()), "max_abs_prob_diff": float(diff.max()),
        "passed": top1_agree >= needed and animals_agree == len(labels),
    }


def photo_batch(pre) -> tuple[torch.Tensor, list[int | None]]:
    from roofserve.vision.preprocess import decode, to_batch

    photos = guard_photos()
    return to_batch([decode(data, pre, 10**9) for _, data, _ in photos]), [label for _, _, label in photos]


def reference_probs(model: str, weights: str | None, images: torch.Tensor) -> torch.Tensor:
    from roofserve.vision.model import build_classifier

    net, _ = build_classifier(model, weights, "cpu", "fp32", channels_last=False)
    with torch.inference_mode():
        return net(images.contiguous())


def check_accuracy(runner, model: str, weights: str | None, reference: torch.Tensor | None = None) -> dict:
    """The guard's row for `runner` (a vision.runtimes.Runner); pass `reference` to reuse fp32 PyTorch's
    probabilities across runners."""
    images, labels = photo_batch(runner.pre)
    if reference is None:
        reference = reference_probs(model, weights, images)
    probs = torch.cat([runner(images[i:i + 8]) for i in range(0, len(images), 8)])
    return {"kind": "vision-accuracy", "model": model, "runtime": runner.runtime, "precision": runner.precision,
            **compare(probs, reference, labels)}
