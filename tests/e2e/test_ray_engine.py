"""The vision server on Ray Serve (`--engine ray`): a local Ray instance with two replicas, real photos
through Ray's proxy on 127.0.0.1, the same 4xx as on LitServe, a replica killed under bounded load,
and no Ray process left after SIGTERM."""

import concurrent.futures as cf
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from roofserve.load.process import start_server, stop_process_group
from tests.e2e.test_vision_server import BAD, _check

pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'roofserve[ray]'")
DEADLINE_S = 20


def ray_processes() -> list[int]:
    """Processes of a Ray instance that roofserve started (their command lines name its temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"roofserve-ray-" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def server():
    assert not ray_processes(), "a Ray instance of an earlier run is still up"
    args = ["vision", "--engine", "ray", "--ray-replicas", "2", "--threads-per-worker", "1", "--max-batch-size", "4",
            "--max-payload-bytes", "2000000", "--max-image-pixels", "20000000", "--timeout-s", str(DEADLINE_S),
            "--grace-s", "5"]
    server = start_server(args, ready_timeout_s=240)
    yield server
    stop_process_group(server.proc)


def replica_pids(url: str, tries: int = 40) -> set[int]:
    return {httpx.get(url + "/health", timeout=10).json()["replica_pid"] for _ in range(tries)}


def test_photos_and_bad_input_answer_as_on_litserve(server, images):
    url = server.url
    for name in images:
        ctype = "image/png" if name == "chelsea" else "image/jpeg"
        _check(name, httpx.post(url + "/predict", content=images[name], headers={"Content-Type": ctype}, timeout=60))
    for case in ("wrong content type", "malformed json", "missing field", "too many bytes", "too many pixels",
                 "multipart without file"):
        kwargs, status, words = BAD[case]
        response = httpx.post(url + "/predict", timeout=60, **kwargs)
        assert response.status_code == status, (case, response.text)
        assert words in response.json()["error"]["message"]
    truncated = httpx.post(url + "/predict", content=images["dalmatian"][:3000], headers={"Content-Type": "image/jpeg"})
    assert truncated.status_code == 400 and "truncated" in truncated.json()["error"]["message"]
    assert httpx.get(url + "/nope").status_code == 404
    assert len(replica_pids(url)) == 2, "two replicas answer behind the proxy"


def test_a_killed_replica_is_replaced_and_no_request_hangs(server, images):
    url = server.url
    before = replica_pids(url)
    photo = {"content": images["bull mastiff"], "headers": {"Content-Type": "image/jpeg"}}

    def one() -> tuple[int, float]:
        started = time.monotonic()
        try:
            status = httpx.post(url + "/predict", timeout=DEADLINE_S + 10, **photo).status_code
        except httpx.HTTPError:
            status = -1
        return status, time.monotonic() - started

    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one) for _ in range(40)]
        time.sleep(1.0)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        futures += [pool.submit(one) for _ in range(80)]
        results = [f.result() for f in futures]
    statuses = [s for s, _ in results]
    print("statuses after the kill:", {s: statuses.count(s) for s in set(statuses)},
          "slowest %.2f s" % max(t for _, t in results))
    assert max(t for _, t in results) < DEADLINE_S + 5, "a request hung past its deadline"
    assert statuses.count(200) >= len(results) - 8, statuses
    assert set(statuses) <= {200, 500, 503}, statuses  # a failure is an answer, never a dropped connection
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        now = replica_pids(url, tries=10)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(2)
    assert len(now) == 2 and victim not in now, f"replica not replaced: {now}"


def test_sigterm_stops_every_ray_process_it_started(server):
    assert ray_processes(), "the check below must be able to fail"
    os.kill(server.proc.pid, signal.SIGTERM)
    server.proc.wait(timeout=60)
    deadline = time.monotonic() + 20
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes(), "Ray processes outlived the server"
