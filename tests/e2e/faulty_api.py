"""A real RoofServer over a tiny API whose predict raises on one input (b"boom").

Run as `python -m tests.e2e.faulty_api PORT` from the repository root (the spawned worker imports
this module by name)."""

import sys

import litserve as ls

from roofserve.config import VisionConfig
from roofserve.server.app import make_server, run_server


class Faulty(ls.LitAPI):
    def setup(self, device):
        pass

    async def read_payload(self, request, body):
        return body

    def decode_request(self, request):
        return request

    def predict(self, body):
        if body == b"boom":
            raise RuntimeError("kaboom in /secret/path/model.py")
        return {"bytes": len(body)}

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    cfg = VisionConfig(host="127.0.0.1", port=int(sys.argv[1]), workers_per_device=1)
    run_server(make_server(Faulty(max_batch_size=1), cfg, "cpu", "faulty"), cfg)
