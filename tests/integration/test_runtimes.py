"""The classifier on every runtime and precision: the accuracy guard against fp32 PyTorch, the export cache,
and a missing runtime's one line."""

import pytest
import torch

from roofserve.config import DEFAULT_VISION_MODEL as MODEL
from roofserve.errors import UserError
from roofserve.measure.accuracy import check_accuracy, compare, photo_batch, reference_probs
from roofserve.vision import runtimes
from roofserve.vision.runtimes import build_runner, installed

PAIRS = [("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "bf16"),
         ("openvino", "int8")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.set_num_threads(2)
    runner = build_runner(MODEL, None, "cpu", "torch", "fp32", channels_last=True, compile=False)
    images, labels = photo_batch(runner.pre)
    return images, labels, reference_probs(MODEL, None, images)


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROOFSERVE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("runtime, precision", PAIRS, ids=[f"{r}-{p}" for r, p in PAIRS])
def test_runtime_passes_the_accuracy_guard(reference, runtime, precision):
    if not installed(runtime):
        pytest.skip(f"{runtime} is not installed")
    if precision == "bf16" and not runtimes.cpu_runs_bf16():
        pytest.skip("this CPU does not run bf16 natively")
    images, labels, probs = reference
    runner = build_runner(MODEL, None, "cpu", runtime, precision, channels_last=True, compile=False)
    row = check_accuracy(runner, MODEL, None, probs)
    assert (row["runtime"], row["precision"]) == (runtime, precision)
    assert row["passed"], row
    assert row["photos"] == len(labels) >= 21 and row["labelled_photos"] == 20
    # the same photos in a different batch make the same answers (no state kept between calls)
    again = runner(images[:3].contiguous())
    assert torch.allclose(again, runner(images[:3]), atol=1e-6)
    if precision == "fp32":
        assert row["mean_abs_prob_diff"] < 1e-6  # the same graph, in fp32
    else:
        assert 0 < row["mean_abs_prob_diff"] < 2e-3


def test_torch_int8_quantization_passes_the_guard_before_compiling(reference):
    """PT2E int8 as torch's runtime quantizes it, run eagerly: compiling it (the served path, ~40 s on 2
    cores) changes kernels, not the quantization, and the sweeps and `bench vision-model` run it compiled."""
    from roofserve.vision.model import build_classifier

    images, labels, probs = reference
    net, pre = build_classifier(MODEL, None, "cpu", "fp32", channels_last=False)
    quantized = runtimes.quantize_pt2e(net, pre)
    with torch.no_grad():
        row = compare(quantized(images), probs, labels)
    assert row["passed"], row
    assert 0 < row["mean_abs_prob_diff"] < 2e-3


def test_guard_fails_on_a_different_model(reference):
    """The guard can fail: random weights give other answers than the trained model."""
    images, labels, probs = reference
    torch.manual_seed(0)
    other = build_runner(MODEL, "random", "cpu", "torch", "fp32", channels_last=True, compile=False)
    row = compare(other(images), probs, labels)
    assert not row["passed"] and row["top1_agree"] < 19


def test_exports_are_cached_and_keyed(tmp_path):
    if not installed("onnxruntime"):
        pytest.skip("onnxruntime is not installed")
    build_runner(MODEL, None, "cpu", "onnxruntime", "fp32", channels_last=True, compile=False)
    files = sorted((tmp_path / "cache" / "vision").iterdir())
    assert [f.suffix for f in files] == [".onnx"]
    stamp = files[0].stat().st_mtime_ns
    build_runner(MODEL, None, "cpu", "onnxruntime", "fp32", channels_last=True, compile=False)
    assert files[0].stat().st_mtime_ns == stamp, "a second start reuses the export"
    keys = {runtimes.artifact_key(MODEL, None, r, p) for r, p in [*PAIRS, ("torch", "int8")]}
    assert len(keys) == len(PAIRS) + 1
    # random weights are never cached: each process draws its own
    build_runner(MODEL, "random", "cpu", "onnxruntime", "fp32", channels_last=True, compile=False)
    assert sorted((tmp_path / "cache" / "vision").iterdir()) == files


def test_missing_runtime_and_bad_pairs_are_one_line(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="onnxruntime does not run bf16"):
        runtimes.resolve("onnxruntime", "bf16", cpu)
    with pytest.raises(UserError, match="fp16 is slow or unsupported on CPU"):
        runtimes.resolve("torch", "fp16", cpu)
    monkeypatch.setattr(runtimes.importlib.util, "find_spec", lambda name: None)  # as on a machine without them
    with pytest.raises(UserError, match=r"runtime openvino is not installed: pip install -e '.\[openvino\]'"):
        runtimes.resolve("openvino", "auto", cpu)
    assert runtimes.resolve("auto", "fp32", cpu) == ("torch", "fp32"), "auto falls back to torch"
