"""The classifier on another runtime: PyTorch (eager or compiled), ONNX Runtime or OpenVINO, in fp32,
bf16 or int8, behind one call: uint8 (N, 3, H, W) images -> float32 (N, 1000) probabilities.

The timm model and its weights are exported once to ONNX (normalisation and softmax inside, uint8 NHWC
in) and cached on disk, keyed by model, weights, runtime, precision and library versions; ONNX Runtime
runs the file, OpenVINO reads it. int8 is static quantization calibrated on the photos that the data
packages ship (NNCF for OpenVINO, ONNX Runtime's quantize_static, torch's PT2E x86 inductor quantizer
with torch.compile). Whether a runtime and precision keep the answers is the accuracy guard's job
(measure/accuracy.py), not this module's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from roofserve.config import VISION_RUNTIMES as RUNTIME_CHOICES
from roofserve.errors import UserError
from roofserve.vision.preprocess import Preprocess

log = logging.getLogger(__name__)

RUNTIMES = RUNTIME_CHOICES[1:]
# what each runtime runs here; bf16 on ONNX Runtime's CPU provider falls back to slow paths
RUNTIME_PRECISIONS = {"torch": ("fp32", "fp16", "bf16", "int8"), "onnxruntime": ("fp32", "int8"),
                      "openvino": ("fp32", "bf16", "int8")}
_EXTRA = {"onnxruntime": ("onnxruntime", "onnxruntime"), "openvino": ("openvino", "openvino")}  # module, extra
SHRINK_ABOVE = 64  # ONNX Runtime gives back the memory of batches larger than this


def installed(runtime: str) -> bool:
    if runtime == "torch":
        return True
    return importlib.util.find_spec(_EXTRA[runtime][0]) is not None and importlib.util.find_spec("onnx") is not None


def require(runtime: str, precision: str | None = None) -> None:
    """One line that says how to install a missing runtime."""
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIME_CHOICES)}")
    if not installed(runtime):
        raise UserError(f"runtime {runtime} is not installed: pip install -e '.[{_EXTRA[runtime][1]}]' (make setup does)")
    if runtime == "openvino" and precision == "int8" and importlib.util.find_spec("nncf") is None:
        raise UserError("int8 on OpenVINO needs NNCF: pip install -e '.[openvino]'")


def cpu_runs_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """'auto' -> OpenVINO on CPU where installed (fastest in our measurements, see the README), else torch."""
    if runtime != "auto":
        return runtime
    return "openvino" if device.type == "cpu" and installed("openvino") else "torch"


def resolve(runtime: str, precision: str, device: torch.device) -> tuple[str, str]:
    """(runtime, precision) with 'auto' resolved and the pair checked; auto never picks int8."""
    from roofserve.vision.model import resolve_precision

    runtime = resolve_runtime(runtime, device)
    if runtime != "torch" and device.type != "cpu":
        raise UserError(f"runtime {runtime} runs on CPU in roofserve; use --runtime torch on {device.type}")
    if precision == "auto":
        precision = {"torch": resolve_precision("auto", device), "onnxruntime": "fp32",
                     "openvino": "bf16" if cpu_runs_bf16() else "fp32"}[runtime]
    if precision not in RUNTIME_PRECISIONS.get(runtime, ()):
        raise UserError(f"{runtime} does not run {precision} here: choose one of "
                        f"{', '.join(RUNTIME_PRECISIONS.get(runtime, ()))}")
    if precision == "fp16" and device.type == "cpu":
        raise UserError("fp16 is slow or unsupported on CPU; use bf16 or fp32 there")
    if runtime == "torch" and precision == "int8" and device.type != "cpu":
        raise UserError("int8 with the torch runtime is CPU only (x86 inductor quantizer)")
    require(runtime, precision)
    return runtime, precision


def cache_dir() -> Path:
    from roofserve.config import cache_root

    return cache_root() / "vision"


def artifact_key(model: str, weights: str | None, runtime: str, precision: str) -> str:
    """Changes when the model, the weights file, the runtime, the precision or the libraries do."""
    from roofserve.machine import versions

    parts = [model, runtime, precision, torch.__version__]
    if weights and Path(weights).is_file():
        st = Path(weights).stat()
        parts += [str(Path(weights).resolve()), str(st.st_size), str(st.st_mtime_ns)]
    else:
        parts.append(str(weights))
    parts += [f"{k}={v}" for k, v in sorted(versions().items()) if k in ("onnx", "onnxruntime", "openvino", "nncf")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cached(path: Path, make: Callable[[Path], None]) -> Path:
    """`path`, made by make(tmp) then renamed into place (workers starting together do not clash)."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        made = Path(tmp) / path.name
        make(made)
        for extra in made.parent.iterdir():  # OpenVINO writes a .bin beside the .xml
            if extra != made:
                os.replace(extra, path.with_suffix(extra.suffix))
        os.replace(made, path)
    return path


class NHWC(torch.nn.Module):
    """uint8 NHWC in (what the decoder makes, no copy) -> the classifier's probabilities."""

    def __init__(self, classifier: torch.nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images.permute(0, 3, 1, 2))


def export_onnx(classifier: torch.nn.Module, pre: Preprocess, path: Path) -> None:
    import warnings

    example = torch.zeros(1, pre.input_size, pre.input_size, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(NHWC(classifier).eval(), (example,), str(path), input_names=["images"],
                          output_names=["probs"], dynamic_axes={"images": {0: "batch"}, "probs": {0: "batch"}},
                          opset_version=17, dynamo=False)


def calibration_images(pre: Preprocess) -> list[torch.Tensor]:
    """(1, 3, H, W) uint8 batches of the photos the data packages ship (foolbox's 20 ImageNet samples and
    scikit-image's photos): int8 calibration needs no download."""
    from roofserve.measure.accuracy import photo_batch

    return list(photo_batch(pre)[0].split(1))


class Runner:
    """images (N, 3, H, W) uint8, any memory layout -> (N, classes) float32 probabilities on the CPU."""

    def __init__(self, runtime: str, precision: str, pre: Preprocess, run: Callable[[torch.Tensor], torch.Tensor]):
        self.runtime, self.precision, self.pre, self._run = runtime, precision, pre, run

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images)

    def __repr__(self) -> str:
        return f"Runner({self.runtime}, {self.precision})"


def build_runner(model: str, weights: str | None, device: str | torch.device, runtime: str, precision: str,
                 channels_last: bool, compile: bool, threads: int | None = None) -> Runner:
    """A ready-to-run classifier on `runtime` in `precision` (both may be 'auto'); `threads` for ONNX
    Runtime and OpenVINO (default: torch's). The defaults of the rest live in VisionConfig."""
    from roofserve.device import resolve_device
    from roofserve.vision.model import build_classifier

    device = resolve_device(device) if isinstance(device, str) else device
    runtime, precision = resolve(runtime, precision, device)
    threads = threads or torch.get_num_threads()
    if runtime == "torch" and precision != "int8":
        net, pre = build_classifier(model, weights, device, precision, channels_last, compile)

        def run_torch(images: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return net(images.to(device, non_blocking=True)).float().cpu()

        return Runner(runtime, precision, pre, run_torch)

    net, pre = build_classifier(model, weights, "cpu", "fp32", channels_last=False)
    if runtime == "torch":
        return Runner(runtime, precision, pre, _torch_int8(net, pre))
    if weights == "random":  # random weights differ per process: built in a temporary folder, never reused
        with tempfile.TemporaryDirectory(prefix="roofserve-vision-") as folder:
            return _onnx_runner(net, pre, model, weights, runtime, precision, threads, Path(folder))
    return _onnx_runner(net, pre, model, weights, runtime, precision, threads, cache_dir())


def _onnx_runner(net: torch.nn.Module, pre: Preprocess, model: str, weights: str | None, runtime: str,
                 precision: str, threads: int, folder: Path) -> Runner:
    """ONNX Runtime or OpenVINO on the cached ONNX export (and its cached int8 version)."""
    onnx_path = _cached(folder / f"{artifact_key(model, weights, 'onnx', 'fp32')}.onnx",
                        lambda p: export_onnx(net, pre, p))
    if runtime == "onnxruntime":
        path = onnx_path
        if precision == "int8":
            path = _cached(folder / f"{artifact_key(model, weights, runtime, precision)}.onnx",
                           lambda p: _ort_int8(onnx_path, p, pre))
        return Runner(runtime, precision, pre, _ort_session(path, threads))
    path = onnx_path
    if precision == "int8":
        path = _cached(folder / f"{artifact_key(model, weights, runtime, precision)}.xml",
                       lambda p: _ov_int8(onnx_path, p, pre))
    return Runner(runtime, precision, pre, _ov_compiled(path, precision, threads))


def _nhwc(images: torch.Tensor):
    """The uint8 NHWC numpy view of an (N, 3, H, W) batch; no copy when its memory is channels-last."""
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def _ort_session(path: Path, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    # The memory arena keeps what the largest batch needed: 8.8 GB after one batch of 256 here. Without it
    # (or shrinking it after every run) ONNX Runtime ran 27-30% slower at batch 32, so only batches above
    # SHRINK_ABOVE give their memory back.
    shrink = ort.RunOptions()
    shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(images: torch.Tensor) -> torch.Tensor:
        options = shrink if images.shape[0] > SHRINK_ABOVE else None
        return torch.from_numpy(session.run(None, {"images": _nhwc(images)}, options)[0])

    return run


def _ort_int8(onnx_path: Path, out: Path, pre: Preprocess) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = iter([{"images": _nhwc(x)} for x in calibration_images(pre)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    prepared = out.with_name("prepared.onnx")
    quant_pre_process(str(onnx_path), str(prepared))
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    prepared.unlink()


def _ov_int8(onnx_path: Path, out: Path, pre: Preprocess) -> None:
    import nncf
    import openvino as ov

    calibration = [_nhwc(x) for x in calibration_images(pre)]
    quantized = nncf.quantize(ov.Core().read_model(str(onnx_path)), nncf.Dataset(calibration),
                              subset_size=len(calibration))
    ov.save_model(quantized, str(out), compress_to_fp16=False)


def _ov_compiled(path: Path, precision: str, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    import openvino as ov

    hint = {"fp32": "f32", "bf16": "bf16", "int8": "bf16" if cpu_runs_bf16() else "f32"}[precision]
    # no pinning: OpenVINO pins its threads to cores by default, and two 1-thread server workers (separate
    # processes that do not know of each other) then share one core while the other idles
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                          "INFERENCE_NUM_THREADS": threads,
                                                          "PERFORMANCE_HINT": "LATENCY",
                                                          "ENABLE_CPU_PINNING": False})
    request = compiled.create_infer_request()

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(request.infer({0: _nhwc(images)})[0].copy())

    return run


def quantize_pt2e(net: torch.nn.Module, pre: Preprocess) -> torch.nn.Module:
    """PT2E static int8 with the x86 inductor quantizer, calibrated on the bundled photos; runs eagerly
    (slowly: quantize/dequantize around fp32 kernels) until inductor fuses it into int8 kernels."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = torch.zeros(2, 3, pre.input_size, pre.input_size, dtype=torch.uint8)
    exported = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},))
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        for x in calibration_images(pre):
            prepared(x)
    return convert_pt2e(prepared)


def _torch_int8(net: torch.nn.Module, pre: Preprocess) -> Callable[[torch.Tensor], torch.Tensor]:
    """quantize_pt2e compiled with frozen weights (CPU)."""
    import torch._inductor.config as inductor

    inductor.freezing = True
    compiled = torch.compile(quantize_pt2e(net, pre), dynamic=True)  # one graph for every batch size

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return compiled(images).float()

    return run
