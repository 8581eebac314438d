"""ImageNet-1k labels grouped into cat / dog / other.

ImageNet-1k classes 151-268 are the 118 dog breeds; 281-285 are the five domestic cats (tabby,
tiger cat, Persian, Siamese, Egyptian cat). Big cats (286-293: cougar, lynx, leopard, tiger, ...)
are *not* domestic cats and count as "other". The animal is decided by summed probability mass:
P(dog) = sum over the 118 breeds, P(cat) = sum over the 5 cats, P(other) = the rest; the largest wins.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DOG_CLASSES = range(151, 269)
CAT_CLASSES = range(281, 286)


@lru_cache(maxsize=1)
def imagenet_names() -> tuple[str, ...]:
    """Short names of the 1000 ImageNet classes ("dalmatian, coach dog" -> "dalmatian")."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_description(i).split(",")[0].strip() for i in range(1000))


def animal_groups(probs: "torch.Tensor") -> dict[str, float]:
    """P(cat), P(dog) and P(other) of one image's 1000 class probabilities."""
    dog = float(probs[DOG_CLASSES.start : DOG_CLASSES.stop].sum())
    cat = float(probs[CAT_CLASSES.start : CAT_CLASSES.stop].sum())
    return {"cat": cat, "dog": dog, "other": max(0.0, 1.0 - dog - cat)}


def describe(probs: "torch.Tensor", model_name: str, top_k: int = 5) -> dict:
    """The JSON answer for one image, given its 1000 class probabilities (a 1-D float tensor)."""
    import torch

    names = imagenet_names()
    probs = probs.float()
    groups = animal_groups(probs)
    dog = groups["dog"]
    animal = max(groups, key=groups.get)
    breed_p, breed_i = torch.topk(probs[DOG_CLASSES.start : DOG_CLASSES.stop], 3)
    top_p, top_i = torch.topk(probs, top_k)
    return {
        "animal": animal,
        "confidence": round(groups[animal], 4),
        # p of a breed is conditional on "dog": P(breed) / P(dog).
        "breeds": [
            {"breed": names[DOG_CLASSES.start + int(i)], "p": round(float(p) / max(dog, 1e-12), 4)}
            for p, i in zip(breed_p, breed_i)
        ],
        "top_classes": [{"index": int(i), "label": names[int(i)], "p": round(float(p), 4)} for p, i in zip(top_p, top_i)],
        "model": model_name,
    }
