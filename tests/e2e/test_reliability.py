"""Overload, deadlines, auth, metrics and fuzzing against real servers on 127.0.0.1 (bounded)."""

import concurrent.futures as cf
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import running_server

KEY = "test-key-123"


@pytest.fixture(scope="module")
def guarded(images):
    args = ["vision", "--workers-per-device", "1", "--max-batch-size", "1", "--api-key", KEY,
            "--max-queued-requests", "4", "--timeout-s", "20", "--header-timeout-s", "2", "--body-timeout-s", "2"]
    with running_server(args) as url:
        yield url


def _post(url, data, key=KEY, **kw):
    headers = {"Content-Type": "image/jpeg", **({"X-API-Key": key} if key else {})}
    return httpx.post(url + "/predict", content=data, headers=headers, timeout=30, **kw)


def test_auth_protects_every_route_but_health(guarded, images):
    assert httpx.get(guarded + "/health").status_code == 200
    assert _post(guarded, images["dalmatian"], key=None).status_code == 401
    assert _post(guarded, images["dalmatian"], key="wrong").status_code == 401
    assert httpx.get(guarded + "/metrics").status_code == 401
    assert httpx.get(guarded + "/info").status_code == 401
    assert _post(guarded, images["dalmatian"]).status_code == 200
    bearer = httpx.post(guarded + "/predict", content=images["dalmatian"],
                        headers={"Content-Type": "image/jpeg", "Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200
    info = httpx.get(guarded + "/info", headers={"X-API-Key": KEY})
    assert info.status_code == 200 and KEY not in info.text  # the config it shows masks the key


def _noise_png(side: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((side, side), 80).convert("RGB").save(buf, "PNG")  # incompressible: slow to send and decode
    return buf.getvalue()


def test_overload_gets_503_with_retry_after_and_admitted_requests_finish(guarded, images):
    # 5 MB each, decoded one at a time by the single worker: the 24 overlap however fast the machine
    # (with a small JPEG a fast machine answered them so quickly that none was ever refused)
    slow = _noise_png(1500)
    headers = {"Content-Type": "image/png", "X-API-Key": KEY}
    with cf.ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda _: httpx.post(guarded + "/predict", content=slow, headers=headers,
                                                       timeout=30), range(24)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503, 504}, codes
    assert 503 in codes, "24 concurrent requests against a bound of 4 must be refused in part"
    assert all(r.headers.get("Retry-After") == "1" for r in responses if r.status_code == 503)
    assert 200 in codes
    assert _post(guarded, images["dalmatian"]).status_code == 200


def test_deadline_gives_504_while_queued_or_running_and_the_server_moves_on(images):
    # decoding this 9-Mpixel noise PNG alone takes longer than the 0.2 s deadline
    big = _noise_png(3000)
    args = ["vision", "--workers-per-device", "1", "--max-batch-size", "1", "--timeout-s", "0.2",
            "--max-payload-bytes", "100000000"]
    with running_server(args) as url:
        with cf.ThreadPoolExecutor(3) as pool:
            codes = list(pool.map(lambda _: _post(url, big, key=None).status_code, range(3)))
        assert codes == [504, 504, 504]
        # the worker finishes the late ones and drops their answers; then it serves again

        for _ in range(40):
            if (ok := _post(url, images["bull mastiff"], key=None)).status_code == 200:
                break
            time.sleep(0.5)
        assert ok.status_code == 200


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers={"X-API-Key": KEY}).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("roofserve_connections")}


def test_hundreds_of_stalled_uploads_and_headers_neither_fill_the_queue_nor_outlive_their_timeout(guarded, images):
    import socket

    from roofserve.machine import raise_fd_limit

    raise_fd_limit(2048)
    port = int(guarded.rsplit(":", 1)[1])
    before = _metrics(guarded)
    stalled = []
    for i in range(500):  # 300 uploads that declare 100 KB and send 10 bytes, 200 requests whose headers stop
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nX-API-Key: " + KEY.encode()
                     + (b"\r\nContent-Length: 100000\r\n\r\n0123456789" if i < 300 else b"\r\nContent-Le"))
        stalled.append(sock)
    opened = time.monotonic()
    # --max-queued-requests is 4: the 300 stalled uploads would fill it 75 times over if they counted
    with cf.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda _: _post(guarded, images["dalmatian"]).status_code, range(16)))
    assert codes == [200] * 16
    answers = []
    for sock in stalled:
        sock.settimeout(max(0.1, opened + 2 + 5 - time.monotonic()))  # each closed within its timeout + 5 s
        try:
            answers.append(sock.recv(4096))
            assert sock.recv(4096) == b""
        except TimeoutError:
            answers.append(b"still open")
        sock.close()
    assert [a[:12] for a in answers] == [b"HTTP/1.1 408"] * 500, {a[:40] for a in answers}
    after = _metrics(guarded)
    closed = 'roofserve_connections_closed_total{reason="%s"}'
    assert after[closed % "body_timeout"] - before[closed % "body_timeout"] == 300
    assert after[closed % "header_timeout"] - before[closed % "header_timeout"] == 200
    assert after["roofserve_connections_open"] <= 2  # the /metrics request itself, and perhaps a keep-alive


def test_metrics_count_requests_by_status(guarded, images):
    _post(guarded, b"junk")
    text = httpx.get(guarded + "/metrics", headers={"X-API-Key": KEY}).text
    assert 'roofserve_requests_total{route="/predict",status="400"}' in text
    assert 'roofserve_requests_total{route="/predict",status="200"}' in text
    assert "roofserve_request_duration_seconds_bucket" in text
    assert "roofserve_requests_in_flight 0" in text  # only /predict requests count, and none is running
    assert "roofserve_rejected_overload_total" in text


@pytest.fixture(scope="module")
def vision_url():
    with running_server(["vision", "--workers-per-device", "1", "--max-batch-size", "4"]) as url:
        yield url


bodies = st.one_of(
    st.binary(max_size=2048),
    # floats with NaN and Infinity (json writes its literals), text with lone surrogates
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() |
                 st.text(st.characters(exclude_categories=()), max_size=20),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                 max_leaves=10).map(lambda doc: json.dumps(doc).encode()),
)
content_types = st.sampled_from(["image/jpeg", "image/png", "application/json", "multipart/form-data; boundary=x",
                                 "text/plain", "", "application/octet-stream"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, ctype=content_types)
def test_fuzzed_vision_requests_never_get_5xx(vision_url, body, ctype):
    headers = {"Content-Type": ctype} if ctype else {}
    response = httpx.post(vision_url + "/predict", content=body, headers=headers, timeout=30)
    assert response.status_code < 500, (body[:80], ctype, response.text)
