"""The real default model, in process: the three reference images in every CPU precision."""

import pytest
import torch

from roofserve.vision.labels import describe
from roofserve.vision.model import build_classifier
from roofserve.vision.preprocess import decode, to_batch
from roofserve.examples import EXPECTED


@pytest.fixture(scope="module")
def outputs(images):
    results = {}
    for precision in ("fp32", "bf16"):
        model, pre = build_classifier("tf_efficientnet_lite0", None, "cpu", precision)
        batch = to_batch([decode(data, pre, 10**8) for data in images.values()])
        with torch.inference_mode():
            probs = model(batch)
        results[precision] = {name: (probs[i], describe(probs[i], "m")) for i, name in enumerate(images)}
    return results


@pytest.mark.parametrize("name", list(EXPECTED))
def test_reference_images_are_classified(outputs, name):
    animal, breed = EXPECTED[name]
    out = outputs["fp32"][name][1]
    assert out["animal"] == animal
    if breed:
        assert breed in [b["breed"] for b in out["breeds"]]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_bf16_agrees_with_fp32(outputs, name):
    assert int(outputs["bf16"][name][0].argmax()) == int(outputs["fp32"][name][0].argmax())
    assert outputs["bf16"][name][1]["animal"] == outputs["fp32"][name][1]["animal"]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_the_classifier_on_cuda_agrees_with_the_cpu(outputs, images, precision):
    model, pre = build_classifier("tf_efficientnet_lite0", None, "cuda", precision)
    batch = to_batch([decode(data, pre, 10**8) for data in images.values()]).cuda()
    with torch.inference_mode():
        probs = model(batch).cpu()
    for i, name in enumerate(images):
        assert probs[i].argmax() == outputs["fp32"][name][0].argmax(), (name, precision)
