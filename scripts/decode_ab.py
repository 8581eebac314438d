"""Is there a faster well-kept decoder for the classifier's inputs? Per example photo, ms per image of:

  pillow         roofserve's decode (Pillow: JPEG draft mode, EXIF, RGB, resize into the crop box)
  torch-resize   the same decode, resized with torch's antialiased uint8 bicubic kernel instead of Pillow's
  simplejpeg     libjpeg-turbo through simplejpeg (JPEG only; decode at >= the resize target, no resize)
  opencv         cv2.imdecode (no resize)

The last two do less work than ours (no resize, no EXIF), so they only bound what a switch could save.
Rounds alternate the decoders (this VM's speed drifts); medians are printed. One core, as a server worker
has. Needs `pip install simplejpeg opencv-python-headless` for the last two columns (skipped without them).

    .venv/bin/python scripts/decode_ab.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ImageOps

from roofserve.examples import example_images
from roofserve.vision.model import LITE0_PREPROCESS as PRE
from roofserve.vision.preprocess import _to_rgb, decode, open_image


def torch_resize(data: bytes) -> torch.Tensor:
    img = open_image(data, 10**9)
    if img.format == "JPEG":
        img.draft("RGB", (PRE.resize_short, PRE.resize_short))
    img = _to_rgb(ImageOps.exif_transpose(img))
    width, height = img.size
    scale = PRE.resize_short / min(width, height)
    new_w, new_h = max(PRE.input_size, round(width * scale)), max(PRE.input_size, round(height * scale))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
    y = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True)
    left, top = (new_w - PRE.input_size) // 2, (new_h - PRE.input_size) // 2
    return y[0, :, top:top + PRE.input_size, left:left + PRE.input_size].permute(1, 2, 0)


def decoders() -> dict:
    out = {"pillow": lambda d, fmt: decode(d, PRE, 10**9), "torch-resize": lambda d, fmt: torch_resize(d)}
    try:
        import simplejpeg

        out["simplejpeg"] = lambda d, fmt: simplejpeg.decode_jpeg(
            d, colorspace="RGB", min_height=PRE.resize_short, min_width=PRE.resize_short) if fmt == "JPEG" else None
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(1)
        out["opencv"] = lambda d, fmt: cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR)
    except ImportError:
        pass
    return out


def ms_per_call(fn, calls: int = 10) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    found = decoders()
    photos = [(name, data, open_image(data, 10**9).format) for name, data in example_images()]
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, data, fmt in photos:
            for decoder, fn in found.items():
                if fn(data, fmt) is not None:
                    times.setdefault((name, decoder), []).append(ms_per_call(lambda: fn(data, fmt)))
    print("photo".ljust(22) + "".join(d.rjust(14) for d in found))
    totals = dict.fromkeys(found, 0.0)
    for name, _, _ in photos:
        cells = []
        for decoder in found:
            t = times.get((name, decoder))
            cells.append(f"{statistics.median(t):.2f}" if t else "-")
            totals[decoder] += statistics.median(t) if t else 0.0
        print(name.ljust(22) + "".join(c.rjust(14) for c in cells))
    print("sum (ms)".ljust(22) + "".join(f"{totals[d]:.2f}".rjust(14) for d in found))


if __name__ == "__main__":
    main()
