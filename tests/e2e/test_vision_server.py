"""The real vision server as a subprocess, real images over real HTTP, good and bad."""

import base64
import io

import httpx
import pytest
from PIL import Image

from roofserve.examples import EXPECTED
from tests.conftest import running_server

CAP = 2_000_000


@pytest.fixture(scope="module")
def url():
    args = ["vision", "--workers-per-device", "1", "--max-batch-size", "4", "--max-payload-bytes", str(CAP),
            "--max-image-pixels", "20000000"]
    with running_server(args) as url:
        yield url


def _check(name: str, response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    animal, breed = EXPECTED[name]
    assert body["animal"] == animal
    assert body["model"] == "tf_efficientnet_lite0"
    assert 0 < body["confidence"] <= 1
    if breed:
        assert breed in [b["breed"] for b in body["breeds"]]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_raw_bytes(url, images, name):
    ctype = "image/png" if name == "chelsea" else "image/jpeg"
    _check(name, httpx.post(url + "/predict", content=images[name], headers={"Content-Type": ctype}))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_multipart_upload(url, images, name):
    _check(name, httpx.post(url + "/predict", files={"file": (f"{name}.img", images[name])}))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_base64_json(url, images, name):
    _check(name, httpx.post(url + "/predict", json={"image": base64.b64encode(images[name]).decode()}))


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    return buf.getvalue()


BAD = {
    "empty body": ({"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 400, "empty"),
    "not an image": ({"content": b"hello", "headers": {"Content-Type": "image/jpeg"}}, 400, "not an image"),
    "truncated": (None, 400, "truncated"),
    "wrong content type": ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "Content-Type"),
    "no content type": ({"content": b"hello"}, 415, "Content-Type"),
    "malformed json": ({"content": b"{nope", "headers": {"Content-Type": "application/json"}}, 400, "malformed JSON"),
    "json not an object": ({"json": [1, 2]}, 400, "must be an object"),
    "json nested too deeply": ({"content": b"[" * 100_000, "headers": {"Content-Type": "application/json"}}, 400,
                               "nested too deeply"),
    "compressed body": ({"content": b"\xff\xd8", "headers": {"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}},
                        415, "Content-Encoding"),
    "missing field": ({"json": {"picture": "abc"}}, 400, "no \"image\" field"),
    "field not a string": ({"json": {"image": 5}}, 400, "base64 string"),
    "invalid base64": ({"json": {"image": "%%%"}}, 400, "not valid base64"),
    "multipart without file": ({"files": {"note": (None, "abc")}}, 400, "no file part"),
    "malformed multipart": ({"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400, None),
    "too many pixels": ({"content": _bomb(), "headers": {"Content-Type": "image/png"}}, 413, "pixels"),
    "too many bytes": ({"content": b"\xff" * (CAP + 1), "headers": {"Content-Type": "image/jpeg"}}, 413, "limit"),
    "multipart over the cap": ({"files": {"file": ("x.jpg", b"\xff" * (CAP + 1), "image/jpeg")}}, 413, "limit"),
    "chunked over the cap": ({"content": iter([b"\xff" * (CAP // 2 + 1)] * 2), "headers": {"Content-Type": "image/jpeg"}},
                             413, "limit"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_and_the_server_stays_up(url, images, case):
    kwargs, status, words = BAD[case]
    if case == "truncated":
        kwargs = {"content": images["dalmatian"][:3000], "headers": {"Content-Type": "image/jpeg"}}
    response = httpx.post(url + "/predict", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    if words:
        assert words in message
    assert "Traceback" not in response.text
    _check("bull mastiff", httpx.post(url + "/predict", content=images["bull mastiff"], headers={"Content-Type": "image/jpeg"}))


def test_a_bad_image_does_not_fail_its_batch_neighbours(url, images):
    import concurrent.futures as cf

    good = {"content": images["dalmatian"], "headers": {"Content-Type": "image/jpeg"}}
    bad = {"content": b"junk", "headers": {"Content-Type": "image/jpeg"}}
    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(httpx.post, url + "/predict", timeout=60, **(bad if i % 2 else good)) for i in range(16)]
        codes = [f.result().status_code for f in futures]
    assert codes == [400 if i % 2 else 200 for i in range(16)]


def test_lying_content_length_is_refused_before_reading(url):
    import socket
    from urllib.parse import urlparse

    where = urlparse(url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {CAP * 10}\r\n\r\n"
        sock.sendall(head.encode() + b"x" * 10)
        # the server answers from the header alone; the rest of the body is never sent
        answer = sock.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 413")


def test_int8_server_on_onnxruntime_answers_like_fp32(images):
    """Another runtime behind the same API: int8 ONNX Runtime answers the reference photos, says what runs,
    and its worker ran the accuracy guard at start."""
    pytest.importorskip("onnxruntime")
    from roofserve.load.process import start_server, stop_process_group

    server = start_server(["vision", "--runtime", "onnxruntime", "--precision", "int8", "--workers-per-device", "1",
                           "--max-batch-size", "4"])
    try:
        for name in EXPECTED:
            ctype = "image/png" if name == "chelsea" else "image/jpeg"
            _check(name, httpx.post(server.url + "/predict", content=images[name], headers={"Content-Type": ctype}))
        config = httpx.get(server.url + "/info").json()["model"]["config"]
        assert (config["runtime"], config["precision"]) == ("onnxruntime", "int8")
        bad = httpx.post(server.url + "/predict", content=b"hello", headers={"Content-Type": "image/jpeg"})
        assert bad.status_code == 400 and "not an image" in bad.text
        assert "accuracy guard passed" in server.log_tail(20000)
    finally:
        stop_process_group(server.proc)


def test_default_runtime_is_recorded(url):
    """auto resolved in /info: results say which runtime and precision ran."""
    from roofserve.vision.runtimes import RUNTIMES

    config = httpx.get(url + "/info").json()["model"]["config"]
    assert config["runtime"] in RUNTIMES and config["precision"] in ("fp32", "bf16")


def test_the_http_process_and_its_forks_do_not_load_torch(images):
    """Only the workers run the model: torch stays out of the HTTP process and LitServe's forks of it
    (the server's checks run in a child); each of the two workers has it."""
    from roofserve.load.process import server_process
    from tests.conftest import torch_in_server_processes

    with server_process(["vision", "--workers-per-device", "2"]) as server:
        response = httpx.post(server.url + "/predict", content=images["chelsea"],
                              headers={"content-type": "image/png"}, timeout=60)
        assert response.status_code == 200 and "cat" in response.text
        loaded, processes, workers = torch_in_server_processes(server)
        assert loaded == [] and processes >= 2 and workers == 2
