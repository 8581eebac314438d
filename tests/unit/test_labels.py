import torch

from roofserve.vision.labels import CAT_CLASSES, DOG_CLASSES, describe, imagenet_names


def _probs(mass: dict[int, float]) -> torch.Tensor:
    probs = torch.zeros(1000)
    for index, p in mass.items():
        probs[index] = p
    return probs


def test_groups_cover_the_documented_classes():
    names = imagenet_names()
    assert len(DOG_CLASSES) == 118 and len(CAT_CLASSES) == 5
    assert names[151] == "Chihuahua" and names[268] == "Mexican hairless"
    assert names[281] == "tabby" and names[285] == "Egyptian cat"


def test_big_cats_are_other_not_cat():
    tiger, lynx = 292, 287
    out = describe(_probs({tiger: 0.6, lynx: 0.3, 281: 0.1}), "m")
    assert out["animal"] == "other"
    assert abs(out["confidence"] - 0.9) < 1e-4


def test_dog_mass_is_summed_over_breeds_and_breed_p_is_conditional():
    out = describe(_probs({243: 0.3, 242: 0.2, 281: 0.45, 999: 0.05}), "m")
    assert out["animal"] == "dog"  # 0.5 of dog mass beats 0.45 of cat
    assert out["breeds"][0] == {"breed": "bull mastiff", "p": 0.6}
    assert out["breeds"][1] == {"breed": "boxer", "p": 0.4}
    assert out["top_classes"][0]["label"] == "tabby"
    assert out["model"] == "m"
