"""A worker killed mid-request, and SIGTERM, against real servers on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time

import httpx
import psutil
import pytest

from roofserve.load.process import start_server, stop_process_group
from tests.conftest import metric

LLM = ["llm", "--max-seq-len", "512", "--workers-per-device", "1"]


def _chat_body(max_tokens: int, stream: bool) -> dict:
    return {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": max_tokens,
            "stream": stream, "ignore_eos": True}


def _inference_workers(pid: int) -> list[psutil.Process]:
    # LitServe spawns its inference workers; its HTTP and manager processes are forks of the server.
    return [p for p in psutil.Process(pid).children() if "spawn_main" in " ".join(p.cmdline())]


def _wait_for_health(url: str, status: int, within_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if httpx.get(url + "/health", timeout=5).status_code == status:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"/health did not answer {status} within {within_s} s")


@pytest.fixture
def llm_server():
    server = start_server(LLM)
    yield server
    stop_process_group(server.proc)


def test_killed_worker_fails_its_requests_fast_and_comes_back(llm_server):
    url = llm_server.url + "/v1/chat/completions"
    for stream in (False, True):
        [worker] = _inference_workers(llm_server.proc.pid)
        with cf.ThreadPoolExecutor(1) as pool:
            if stream:
                def read_stream():
                    with httpx.stream("POST", url, json=_chat_body(400, True), timeout=60) as response:
                        return response.status_code, [line for line in response.iter_lines() if line]
                answer = pool.submit(read_stream)
            else:
                answer = pool.submit(httpx.post, url, json=_chat_body(400, False), timeout=60)
            while metric(llm_server.url, "roofserve_requests_in_flight") == 0:
                time.sleep(0.02)
            time.sleep(0.5)  # the worker has taken it and is generating 400 tokens (several seconds)
            worker.kill()
            killed = time.monotonic()
            result = answer.result(timeout=30)
            failed_after_s = time.monotonic() - killed
        assert failed_after_s < 3, f"in-flight request took {failed_after_s:.1f} s to fail"
        if stream:  # the stream had started (200): it ends with an error event
            status, lines = result
            assert status == 200
            error = json.loads(lines[-2].removeprefix("data: "))["error"]
            assert error["code"] == 503 and "died" in error["message"] and lines[-1] == "data: [DONE]"
        else:
            assert result.status_code == 503 and "died" in result.json()["error"]["message"]
            assert result.headers["Retry-After"] == "1"
        _wait_for_health(llm_server.url, 503, within_s=2)  # not ready while the new worker loads
        _wait_for_health(llm_server.url, 200, within_s=180)
        assert _inference_workers(llm_server.proc.pid)[0].pid != worker.pid
        again = httpx.post(url, json=_chat_body(4, False), timeout=60)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4
    assert metric(llm_server.url, "roofserve_worker_deaths_total") == 2


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_leaves_no_process(llm_server):
    family = [psutil.Process(llm_server.proc.pid), *psutil.Process(llm_server.proc.pid).children(recursive=True)]
    assert len(family) >= 4  # server, manager, HTTP process, inference worker (+ resource tracker)
    lines, refused = [], None
    with httpx.stream("POST", llm_server.url + "/v1/chat/completions", json=_chat_body(120, True),
                      timeout=60) as response:
        for line in response.iter_lines():
            lines += [line] if line else []
            if len(lines) == 3 and refused is None:
                os.kill(llm_server.proc.pid, signal.SIGTERM)
                time.sleep(1.0)
                try:
                    httpx.get(llm_server.url + "/health", timeout=5)
                    refused = False
                except httpx.ConnectError:
                    refused = True
    assert refused, "a new connection during the drain must be refused"
    last = json.loads(lines[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 120
    assert llm_server.proc.wait(timeout=60) == 0
    _, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, f"left behind: {alive}"


def test_sigterm_drains_then_stops_a_vision_server_with_all_its_workers(images):
    """With --drain-s, SIGTERM turns /health to 503 at once while requests are still served; then the
    server stops, workers and all."""
    server = start_server(["vision", "--workers-per-device", "2", "--drain-s", "3"])
    try:
        family = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
        assert len(_inference_workers(server.proc.pid)) == 2
        started = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        health = httpx.get(server.url + "/health", timeout=5)
        assert health.status_code == 503 and "draining" in health.json()["error"]["message"]
        served = httpx.post(server.url + "/predict", content=images["dalmatian"], timeout=30,
                            headers={"Content-Type": "image/jpeg"})
        assert served.status_code == 200 and time.monotonic() - started < 3, "served within the drain"
        assert server.proc.wait(timeout=60) == 0
        assert time.monotonic() - started >= 3
        _, alive = psutil.wait_procs(family, timeout=15)
        assert not alive, f"left behind: {alive}"
        assert time.monotonic() - started < 30
    finally:
        stop_process_group(server.proc)


def test_a_predict_that_raises_fails_only_its_request():
    """The error stays with its request (500, our error shape, no traceback or path) among neighbours
    in flight at once, and the same worker serves the next one."""
    import sys

    from roofserve.load.process import free_port, start_process

    # tests/e2e/faulty_api.py: a real RoofServer over an API whose predict raises on b"boom"
    port = free_port()
    server = start_process([sys.executable, "-m", "tests.e2e.faulty_api", str(port)], port, ready_timeout_s=120)
    url = server.url
    try:
        with cf.ThreadPoolExecutor(4) as pool:  # the failing one among neighbours in flight at once
            answers = list(pool.map(lambda body: httpx.post(url + "/predict", content=body, timeout=30),
                                    [b"ok", b"boom", b"fine", b"ok!"]))
        assert [a.status_code for a in answers] == [200, 500, 200, 200]
        error = answers[1].json()["error"]
        assert error["code"] == 500 and "secret" not in answers[1].text and "Traceback" not in answers[1].text
        assert httpx.post(url + "/predict", content=b"again", timeout=30).json() == {"bytes": 5}
    finally:
        assert stop_process_group(server.proc) == 0


def test_a_dead_http_process_stops_the_server_with_an_error():
    """LitServe restarts dead inference workers but not its HTTP process; without it nothing answers on
    the port, so the server stops (exit code 1, workers and all) for its supervisor to restart it."""
    import re

    server = start_server(["vision", "--workers-per-device", "1"])
    try:
        family = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
        [http_pid] = re.findall(r"Started server process \[(\d+)\]", server.log_tail(20000))
        os.kill(int(http_pid), signal.SIGKILL)
        assert server.proc.wait(timeout=60) == 1
        assert f"error: the HTTP process {http_pid} died (exit code -9); the server stopped" in server.log_tail()
        assert "Traceback" not in server.log_tail(20000)
        _, alive = psutil.wait_procs(family, timeout=15)
        assert not alive, f"left behind: {alive}"
    finally:
        stop_process_group(server.proc)
