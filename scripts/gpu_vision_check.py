"""On an NVIDIA GPU: serve the classifier on cuda (fp16, channels_last, compile) and check the
reference images in all three input formats, plus bf16/fp16 agreement with fp32. Exit 1 on a miss."""

import base64
import json
import sys

import httpx
import torch

from roofserve.examples import EXPECTED, reference_photos
from roofserve.load.process import running_server
from roofserve.vision.model import build_classifier
from roofserve.vision.preprocess import decode, to_batch

images = reference_photos()
report = {"gpu": torch.cuda.get_device_name(0), "checks": []}
ok = True
top1 = {}
for precision in ("fp32", "fp16", "bf16"):
    model, pre = build_classifier("tf_efficientnet_lite0", None, "cuda", precision)
    with torch.inference_mode():
        probs = model(to_batch([decode(d, pre, 10**8) for d in images.values()]).cuda())
    top1[precision] = probs.argmax(-1).tolist()
agree = top1["fp16"] == top1["fp32"] == top1["bf16"]
report["precision_top1"] = top1
ok &= agree
with running_server(["vision", "--device", "cuda", "--precision", "fp16", "--compile", "--max-batch-size", "8"],
                    ready_timeout_s=200) as url:
    for name, data in images.items():
        for kind, kw in {"raw": {"content": data, "headers": {"Content-Type": "image/jpeg"}},
                         "multipart": {"files": {"file": (name, data)}},
                         "base64": {"json": {"image": base64.b64encode(data).decode()}}}.items():
            body = httpx.post(url + "/predict", timeout=60, **kw).json()
            animal, breed = EXPECTED[name]
            good = body.get("animal") == animal and (breed is None or breed in [b["breed"] for b in body["breeds"]])
            ok &= good
            report["checks"].append({"image": name, "input": kind, "ok": good, "answer": body.get("animal"),
                                     "breeds": [b["breed"] for b in body.get("breeds", [])]})
print(json.dumps(report, indent=1))
if len(sys.argv) > 1:
    open(sys.argv[1], "w").write(json.dumps(report, indent=1))
sys.exit(0 if ok else 1)
