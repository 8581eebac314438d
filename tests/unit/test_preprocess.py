import io
import time

import pytest
import torch
from PIL import Image

from roofserve.vision.model import LITE0_PREPROCESS as PRE
from roofserve.vision.preprocess import BadImage, decode, to_batch


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA", "CMYK", "I;16"])
def test_every_mode_becomes_rgb_uint8(mode):
    img = Image.new("RGB", (300, 200), (200, 30, 60)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    out = decode(_encode(img, fmt), PRE, 10**7)
    assert out.shape == (224, 224, 3) and out.dtype == torch.uint8


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    out = decode(_encode(img), PRE, 10**7)
    assert int(out.min()) == 255


def test_exif_orientation_is_honoured():
    # Left half red, right half blue; EXIF 3 = rotated 180 degrees, so the viewer sees blue on the left.
    img = Image.new("RGB", (400, 256), (255, 0, 0))
    img.paste((0, 0, 255), (200, 0, 400, 256))
    exif = Image.Exif()
    exif[0x0112] = 3
    out = decode(_encode(img, "JPEG", exif=exif.tobytes(), quality=95), PRE, 10**7)
    left, right = out[112, 20], out[112, 200]
    assert left[2] > 200 and left[0] < 60, "left side should be blue after rotation"
    assert right[0] > 200 and right[2] < 60


def test_resize_short_side_then_center_crop():
    # A wide image with a green band in the middle third: the center crop must be all green.
    img = Image.new("RGB", (900, 300), (255, 0, 0))
    img.paste((0, 255, 0), (300, 0, 600, 300))
    out = decode(_encode(img), PRE, 10**7)
    assert (out[:, :, 1] > 200).all() and (out[:, :, 0] < 50).all()


def test_draft_mode_matches_full_decode_closely():
    img = Image.effect_mandelbrot((2000, 1500), (-2, -1.5, 1, 1.5), 50).convert("RGB")
    data = _encode(img, "JPEG", quality=90)
    fast, slow = decode(data, PRE, 10**8, fast=True), decode(data, PRE, 10**8, fast=False)
    assert (fast.float() - slow.float()).abs().mean() < 6.0


def test_batch_is_nchw_with_channels_last_memory():
    batch = to_batch([torch.zeros(224, 224, 3, dtype=torch.uint8)] * 2)
    assert batch.shape == (2, 3, 224, 224)
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_decompression_bomb_is_refused_from_the_header_alone():
    bomb = _encode(Image.new("1", (30000, 30000)))  # 900 Mpixel, a few hundred KB of PNG
    started = time.perf_counter()
    with pytest.raises(BadImage) as err:
        decode(bomb, PRE, 40_000_000)
    assert err.value.status == 413
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_garbage_is_a_bad_image(data):
    with pytest.raises(BadImage) as err:
        decode(data, PRE, 10**7)
    assert err.value.status == 400


def test_truncated_jpeg_is_a_bad_image():
    data = _encode(Image.new("RGB", (640, 480), (9, 9, 9)), "JPEG")
    with pytest.raises(BadImage, match="broken or truncated"):
        decode(data[: len(data) // 2], PRE, 10**7)
