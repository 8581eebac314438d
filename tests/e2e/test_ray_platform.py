"""The vision server on Ray Serve (`--platform ray`): a local Ray instance with two replicas, real photos
through Ray's proxy on 127.0.0.1, the same 4xx as on LitServe, a replica killed under bounded load,
and no Ray process left after SIGTERM."""

import concurrent.futures as cf
import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from roofserve.platforms.ray_proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV
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
    args = ["vision", "--platform", "ray", "--ray-replicas", "2", "--threads-per-worker", "1", "--max-batch-size", "4",
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
    assert httpx.get(url + "/info").json()["model"]["config"]["ray_replicas"] == 2  # what the bench clients read
    assert len(replica_pids(url)) == 2, "two replicas answer behind the proxy"


def test_the_cpu_per_request_splits_into_ray_replicas_proxy_and_system(server, images):
    """What the vision ladder reports for a Ray step: the CPU of the server's process tree per request,
    by role; under load the replicas and Ray's proxy both work."""
    from roofserve.config import VisionLoadConfig
    from roofserve.load.vision import bench_api

    load = VisionLoadConfig(concurrency=[4], requests=24, warmup=2, payload="raw")
    [row] = bench_api(server.url + "/predict", [("dalmatian", images["dalmatian"])], load, progress=False,
                      server_pid=server.proc.pid)
    split = row["cpu_ms_per_request"]
    assert row["ok"] == 24 and split["Ray replicas"] > 0 and split["Ray proxy"] > 0, split


def load_through(url: str, photo: dict, fault, before: int, after: int) -> list[int]:
    """`before` requests from 4 clients, then `fault()` while they run, then `after` more: every one must
    be answered (a failure is a 503, never a dropped connection or Ray's plain 500) within its deadline,
    nearly all 200."""

    def one() -> tuple[int, float]:
        started = time.monotonic()
        try:
            status = httpx.post(url + "/predict", timeout=DEADLINE_S + 10, **photo).status_code
        except httpx.HTTPError:
            status = -1
        return status, time.monotonic() - started

    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one) for _ in range(before)]
        time.sleep(1.0)
        fault()
        futures += [pool.submit(one) for _ in range(after)]
        results = [f.result() for f in futures]
    statuses = [s for s, _ in results]
    print("statuses across the fault:", {s: statuses.count(s) for s in set(statuses)},
          f"slowest {max(t for _, t in results):.2f} s")
    assert max(t for _, t in results) < DEADLINE_S + 5, "a request hung past its deadline"
    assert set(statuses) <= {200, 503} and statuses.count(200) >= len(results) - 8, statuses
    return statuses


def wait_replaced(url: str, victims: set[int]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        now = replica_pids(url, tries=10)
        if len(now) == 2 and not now & victims:
            return
        time.sleep(2)
    raise AssertionError(f"replicas not replaced: {now}")


def test_a_killed_replica_is_replaced_and_no_request_hangs(server, images):
    url = server.url
    victim = min(replica_pids(url))
    photo = {"content": images["bull mastiff"], "headers": {"Content-Type": "image/jpeg"}}
    load_through(url, photo, lambda: os.kill(victim, signal.SIGKILL), 40, 80)
    wait_replaced(url, {victim})


def test_requests_on_killed_replicas_get_503_not_rays_500(server):
    """Ray's proxy leaves them unanswered (uvicorn's plain-text 500); platforms/ray_proxy.py answers 503."""
    import io

    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:4400, 0:4400]  # 19 megapixels, 1 MB as JPEG: a batch of 4 takes most of a second
    image = Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8))
    data = io.BytesIO()
    image.save(data, "JPEG", quality=70)
    victims = replica_pids(server.url)
    replicas = [psutil.Process(pid) for pid in victims]
    idle = [sum(r.cpu_times()[:2]) for r in replicas]
    with cf.ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(httpx.post, server.url + "/predict", content=data.getvalue(), timeout=DEADLINE_S + 10,
                               headers={"Content-Type": "image/jpeg"}) for _ in range(8)]
        deadline = time.monotonic() + 10  # until both are at work on their requests (Ray reroutes the rest)
        while time.monotonic() < deadline and any(sum(r.cpu_times()[:2]) - c < 0.05 for r, c in zip(replicas, idle)):
            time.sleep(0.01)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        answers = [a.result() for a in answers]
    failed = [a for a in answers if a.status_code != 200]
    assert failed, "no request was in flight on the killed replicas: the check below did not run"
    for answer in failed:
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1", (answer.status_code, answer.text)
        assert "died" in answer.json()["error"]["message"]
    wait_replaced(server.url, victims)


def test_sigterm_stops_every_ray_process_it_started(server):
    assert ray_processes(), "the check below must be able to fail"
    os.kill(server.proc.pid, signal.SIGTERM)
    server.proc.wait(timeout=60)
    deadline = time.monotonic() + 20
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes(), "Ray processes outlived the server"


class RayNode:
    """`ray start --block` as a child in its own process group: killing the group kills the node."""

    def __init__(self, temp_dir: str, head_port: int, head: bool):
        import subprocess
        import sys

        ray = str(Path(sys.executable).parent / "ray")
        args = [ray, "start", "--block", "--num-cpus", "1", "--disable-usage-stats", "--temp-dir", temp_dir,
                "--node-ip-address", "127.0.0.1"]
        args += ["--head", "--port", str(head_port), "--include-dashboard", "false"] if head else \
            ["--address", f"127.0.0.1:{head_port}"]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               # one proxy (HeadOnly) must still send work to the other node's replica
               "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
               # a cluster we join answers a dead replica's requests 503 only with our proxy middleware
               PROXY_CALLBACK_ENV: PROXY_CALLBACK}
        self.proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)

    def kill(self) -> None:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def health(url: str, tries: int) -> list[dict]:
    out = []
    for _ in range(tries):
        response = httpx.get(url + "/health", timeout=10)
        if response.status_code == 200:
            out.append(response.json())
    return out


def test_two_node_cluster_survives_a_dead_worker_node(images, tmp_path):
    """A head and a worker node (one CPU each) on 127.0.0.1, the server joins them with --ray-address: a
    replica lands on each node; killing the worker node under load loses no request past its deadline,
    and a new worker node gets the replica back."""
    import tempfile

    from roofserve.load.process import free_port

    temp_dir = tempfile.mkdtemp(prefix="rs-raytest-", dir="/tmp")  # short: Ray's socket paths live here
    port = free_port()
    nodes = [RayNode(temp_dir, port, head=True)]
    server = None
    try:
        time.sleep(4)
        nodes.append(RayNode(temp_dir, port, head=False))
        time.sleep(4)
        args = ["vision", "--platform", "ray", "--ray-address", f"127.0.0.1:{port}", "--ray-replicas", "2",
                "--ray-proxy-location", "HeadOnly", "--threads-per-worker", "1", "--max-batch-size", "4",
                "--timeout-s", str(DEADLINE_S)]
        server = start_server(args, ready_timeout_s=240)
        url = server.url
        deadline = time.monotonic() + 60  # healthy once one replica answers; the other may still be starting
        while time.monotonic() < deadline and len({h["node_id"] for h in health(url, 10)}) < 2:
            time.sleep(2)
        before = {h["node_id"] for h in health(url, 40)}
        assert len(before) == 2, "one replica on each node"
        photo = {"content": images["dalmatian"], "headers": {"Content-Type": "image/jpeg"}}
        load_through(url, photo, nodes[1].kill, 30, 60)
        nodes.append(RayNode(temp_dir, port, head=False))  # capacity comes back: so does the replica

        def placed(ids: set[str]) -> bool:  # the dead node's replica may answer for a while after the kill
            return len(ids) == 2 and bool(ids - before)

        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not placed({h["node_id"] for h in health(url, 10)}):
            time.sleep(2)
        after = {h["node_id"] for h in health(url, 40)}
        assert placed(after), f"the replica was not placed on the new node: {before} then {after}"
    finally:
        if server is not None:
            stop_process_group(server.proc)
        for node in reversed(nodes):
            node.kill()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(b"rs-raytest-" in c for c in _cmdlines()):
            time.sleep(0.5)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not any(b"rs-raytest-" in c for c in _cmdlines()), "a Ray node outlived the test"


def _cmdlines() -> list[bytes]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out.append((entry / "cmdline").read_bytes())
            except OSError:
                pass
    return out


def test_the_chat_api_on_ray_answers_as_on_litserve():
    """`serve llm --platform ray`: the same routes, validation, streaming and error body, through Ray's proxy."""
    import openai

    from tests.conftest import running_server

    question = [{"role": "user", "content": "What is the capital of France?"}]
    with running_server(["llm", "--platform", "ray", "--max-seq-len", "256", "--default-max-tokens", "16"],
                        ready_timeout_s=240) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
        whole = client.chat.completions.create(model="smollm2-135m-instruct", messages=question, temperature=0,
                                               max_tokens=16)
        assert "Paris" in whole.choices[0].message.content and whole.usage.completion_tokens <= 16
        chunks = list(client.chat.completions.create(messages=question, model="", temperature=0, max_tokens=16,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
        text = client.completions.create(model="", prompt="The capital of France is", max_tokens=4, temperature=0)
        assert text.usage.completion_tokens == 4 or text.choices[0].finish_reason == "stop"
        for body, words in (({"messages": []}, "non-empty list"), ({"messages": question, "tools": [1]}, "tools"),
                            ({"messages": question, "model": "gpt-9"}, "does not exist")):
            response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert response.status_code in (400, 404) and words in response.json()["error"]["message"], response.text
        assert httpx.get(url + "/nope").status_code == 404
        # a whole-answer request whose client leaves is cancelled (Ray cancels the handler; its finally stops
        # the generation), as on LitServe
        body = {"messages": question, "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body, timeout=1.0)
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").json()["generations_stopped"] == 0:
            assert time.monotonic() < deadline, "the generation went on after its client left"
            time.sleep(0.2)
    deadline = time.monotonic() + 20
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes(), "Ray processes outlived the server"
