"""Image bytes -> uint8 HWC tensor, ready to stack into a channels-last batch.

Normalisation (mean/std) is not done here: it happens inside the model wrapper, batched, in the
model's dtype. That keeps the per-image CPU work to decode + resize + crop.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from roofserve.errors import UserError

_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class BadImage(ValueError):
    """The client sent something we cannot use as an image. `status` is the HTTP code to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its input; lives beside the weights it belongs to."""

    input_size: int = 224
    resize_short: int = 256
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_timm(cls, cfg: dict) -> "Preprocess":
        size = int(cfg.get("input_size", (3, 224, 224))[-1])
        crop_pct = float(cfg.get("crop_pct", 0.875))
        interp = cfg.get("interpolation", "bicubic")
        if interp not in _INTERPOLATIONS:
            raise UserError(f"unsupported interpolation {interp!r} in the model's config")
        return cls(size, int(round(size / crop_pct)), interp, tuple(cfg["mean"]), tuple(cfg["std"]))


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open and check an image without decoding its pixels yet."""
    if not data:
        raise BadImage("empty image: the request carried no bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, UnidentifiedImageError):
            raise BadImage("not an image we can read (supported: JPEG, PNG, WebP, GIF, BMP, TIFF)") from None
        raise BadImage("image has too many pixels", status=413) from None
    except Exception:
        raise BadImage("not an image we can read") from None
    width, height = img.size
    if width * height > max_pixels:
        raise BadImage(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}", status=413)
    if width < 1 or height < 1:
        raise BadImage("image has no pixels")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        img = img.convert("L")
    return img.convert("RGB")


def decode(data: bytes, pre: Preprocess, max_pixels: int, fast: bool = True) -> torch.Tensor:
    """Decode one image into a uint8 tensor of shape (H, W, 3) = (input_size, input_size, 3)."""
    img = open_image(data, max_pixels)
    try:
        if fast and img.format == "JPEG":
            # Let libjpeg scale down by 1/2, 1/4 or 1/8 while decoding, never below the resize target.
            img.draft("RGB", (pre.resize_short, pre.resize_short))
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        width, height = img.size
        scale = pre.resize_short / min(width, height)
        new_w, new_h = max(pre.input_size, round(width * scale)), max(pre.input_size, round(height * scale))
        left, top = (new_w - pre.input_size) // 2, (new_h - pre.input_size) // 2
        # Resize straight into the crop box: PIL only computes the pixels we keep.
        box = (left / scale, top / scale, (left + pre.input_size) / scale, (top + pre.input_size) / scale)
        img = img.resize((pre.input_size, pre.input_size), _INTERPOLATIONS[pre.interpolation], box=box)
        array = np.asarray(img, dtype=np.uint8)
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"image data is broken or truncated ({type(e).__name__})") from None
    return torch.from_numpy(array.copy())


def to_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack (H, W, 3) uint8 images into an (N, 3, H, W) batch whose memory is channels-last."""
    return torch.stack(images).permute(0, 3, 1, 2)
