"""The LitServe API of the image classifier: one image per request, batched in the worker."""

from __future__ import annotations

import base64
import binascii
import logging
import time

import litserve as ls
from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile

from roofserve.config import VisionConfig
from roofserve.server.app import worker_threads
from roofserve.server.env import worker_logging
from roofserve.server.http import Rejection, parse_json
from roofserve.vision.labels import describe

log = logging.getLogger(__name__)

RAW_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff", "application/octet-stream")
JSON_FIELDS = ("image", "image_base64", "data")


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes a compiled model is traced for: powers of two up to the max, and the max."""
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def image_from_json(body: bytes) -> bytes:
    """The image bytes of {"image": "<base64>"} (a data: URL prefix is allowed)."""
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise ValueError("JSON body must be an object such as {\"image\": \"<base64>\"}")
    field = next((f for f in JSON_FIELDS if f in doc), None)
    if field is None:
        raise ValueError("JSON body has no \"image\" field (base64 of the image file)")
    value = doc[field]
    if not isinstance(value, str):
        raise ValueError(f"\"{field}\" must be a base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"\"{field}\" is not valid base64") from None


class VisionAPI(ls.LitAPI):
    def __init__(self, cfg: VisionConfig):
        super().__init__(max_batch_size=cfg.max_batch_size, batch_timeout=cfg.batch_timeout_s, api_path="/predict")
        self.cfg = cfg

    # --- HTTP process ---------------------------------------------------------------------
    async def read_payload(self, request: Request, body: bytes) -> dict:
        """Sort the body by Content-Type; heavy work (JSON, base64, image decode) is left to the worker."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not body:
            raise HTTPException(400, "empty request body: send an image")
        if ctype in RAW_TYPES:
            return {"kind": "raw", "body": body}
        if ctype == "application/json":
            return {"kind": "json", "body": body}
        if ctype == "multipart/form-data":
            return {"kind": "raw", "body": await _multipart_file(request, body)}
        raise HTTPException(
            415, f"unsupported Content-Type {ctype or '(none)'}: send image/jpeg|png|webp, multipart/form-data or application/json"
        )

    # --- worker process -------------------------------------------------------------------
    def setup(self, device: str) -> None:
        import torch  # here, in the worker: the HTTP process never imports torch

        from roofserve.vision.preprocess import to_batch
        from roofserve.vision.runtimes import build_runner

        worker_logging()
        torch.set_num_threads(worker_threads(self.cfg))
        cfg = self.cfg
        started = time.perf_counter()
        self.runner = build_runner(cfg.model, cfg.weights, device, cfg.runtime, cfg.precision, cfg.channels_last,
                                   cfg.compile, threads=worker_threads(cfg))
        self.pre = self.runner.pre
        # compiled torch graphs are traced per batch size: pad to a few buckets instead of one per size
        compiled = self.runner.runtime == "torch" and (cfg.compile or self.runner.precision == "int8")
        self.buckets = batch_buckets(cfg.max_batch_size) if compiled else None
        for size in self.buckets or sorted({1, cfg.max_batch_size}):
            dummy = torch.zeros(size, self.pre.input_size, self.pre.input_size, 3, dtype=torch.uint8)
            for _ in range(2):
                self._run(to_batch(list(dummy)))
        if self.runner.precision == "int8":
            self._guard()
        log.info("worker ready on %s (%s %s) after %.1f s of warm-up", device, self.runner.runtime,
                 self.runner.precision, time.perf_counter() - started)

    def _guard(self) -> None:
        """int8 is calibrated on few photos: say at start whether it still gives fp32's answers."""
        from roofserve.measure.accuracy import check_accuracy

        row = check_accuracy(self.runner, self.cfg.model, self.cfg.weights)
        verdict = "passed" if row["passed"] else "FAILED (do not serve this config without checking your data)"
        (log.info if row["passed"] else log.warning)(
            "accuracy guard %s: top-1 as fp32 on %d/%d photos, cat/dog/other on %d/%d, mean |dp| %.2g",
            verdict, row["top1_agree"], row["labelled_photos"], row["animal_agree"], row["photos"],
            row["mean_abs_prob_diff"])

    def decode_request(self, request: dict):
        from roofserve.vision.preprocess import BadImage, decode

        payload = request
        try:
            data = payload["body"] if payload["kind"] == "raw" else image_from_json(payload["body"])
            return decode(data, self.pre, self.cfg.max_image_pixels, self.cfg.fast_decode)
        except BadImage as e:
            return Rejection(e.status, str(e))
        except ValueError as e:
            return Rejection(400, str(e))

    def batch(self, inputs: list) -> list:
        return inputs  # stacked in predict, after bad images are set aside

    def predict(self, inputs):
        single = not isinstance(inputs, list)
        inputs = [inputs] if single else inputs
        good = [i for i, x in enumerate(inputs) if not isinstance(x, Rejection)]
        outputs = list(inputs)
        if good:
            from roofserve.vision.preprocess import to_batch

            probs = self._run(to_batch([inputs[i] for i in good]))
            for row, i in enumerate(good):
                outputs[i] = describe(probs[row], self.cfg.model)
        return outputs[0] if single else outputs

    def unbatch(self, outputs: list) -> list:
        return outputs

    def encode_response(self, output):
        return output

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        n = images.shape[0]
        if self.buckets:
            size = next(b for b in self.buckets if b >= n)
            if size > n:
                images = torch.cat([images, images[:1].expand(size - n, -1, -1, -1)])
        return self.runner(images)[:n]


async def _multipart_file(request: Request, body: bytes) -> bytes:
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive).form(max_files=4, max_fields=16)
    except Exception:
        raise HTTPException(400, "malformed multipart body") from None
    files = [v for v in form.values() if isinstance(v, UploadFile)]
    if not files:
        raise HTTPException(400, "multipart body has no file part: upload the image as a file field")
    return await files[0].read()
