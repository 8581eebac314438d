"""Many users at once on the continuous-batching server: each request's text is what it gets alone,
requests run together (the metrics show it), and one client leaving or stopping ends only its own."""

import concurrent.futures as cf
import json
import time

import httpx
import pytest

from tests.conftest import metric, running_server

QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.", "What is 2+2?",
             "Write a haiku about the sea.", "Hi", "Count from one to ten in words, please."]


@pytest.fixture(scope="module")
def url():
    with running_server(["llm", "--max-seq-len", "256", "--precision", "fp32", "--max-batch-size", "4",
                         "--prefill-chunk", "16"]) as url:
        yield url


def _ask(url: str, question: str, max_tokens: int = 24, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0, **extra}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_each_answer_is_the_same_alone_or_among_others(url):
    alone = [_ask(url, q)["choices"][0]["message"]["content"] for q in QUESTIONS]
    steps_before = {b: metric_steps(url, b) for b in (2, 3, 4)}
    with cf.ThreadPoolExecutor(len(QUESTIONS)) as pool:  # 6 at once into 4 slots: some wait, then join
        together = list(pool.map(lambda q: _ask(url, q)["choices"][0]["message"]["content"], QUESTIONS))
    assert together == alone
    assert sum(metric_steps(url, b) - steps_before[b] for b in (2, 3, 4)) > 0, "decode steps ran several sequences"
    assert metric(url, "roofserve_requests_running") == 0 and metric(url, "roofserve_requests_waiting") == 0


def metric_steps(url: str, batch_size: int) -> float:
    line = f'roofserve_decode_steps_total{{batch_size="{batch_size}"}} '
    return float(next(x for x in httpx.get(url + "/metrics").text.splitlines() if x.startswith(line)).split()[-1])


def test_a_client_that_leaves_stops_only_its_own_sequence(url):
    alone = _ask(url, QUESTIONS[1], max_tokens=64)["choices"][0]["message"]["content"]
    stopped_before = metric(url, "roofserve_generations_stopped_total")
    body = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 200,
            "temperature": 0, "stream": True}
    with cf.ThreadPoolExecutor(1) as pool:
        other = pool.submit(_ask, url, QUESTIONS[1], 64)
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i >= 4:
                    break  # leave mid-stream
        assert other.result()["choices"][0]["message"]["content"] == alone
    for _ in range(50):
        if metric(url, "roofserve_generations_stopped_total") == stopped_before + 1:
            break
        httpx.get(url + "/health")
    assert metric(url, "roofserve_generations_stopped_total") == stopped_before + 1


def test_stop_strings_and_limits_stay_per_request(url):
    full = _ask(url, QUESTIONS[5], max_tokens=40)["choices"][0]["message"]["content"]
    word = full.split()[3]
    with cf.ThreadPoolExecutor(3) as pool:
        stopped = pool.submit(_ask, url, QUESTIONS[5], 40, stop=[word])
        short = pool.submit(_ask, url, QUESTIONS[0], 3)
        plain = pool.submit(_ask, url, QUESTIONS[5], 40)
        stopped, short, plain = stopped.result(), short.result(), plain.result()
    assert stopped["choices"][0]["message"]["content"] == full[: full.index(word)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert short["usage"]["completion_tokens"] == 3 and short["choices"][0]["finish_reason"] == "length"
    assert plain["choices"][0]["message"]["content"] == full


def test_streamed_text_matches_the_whole_answer_under_load(url):
    whole = _ask(url, QUESTIONS[3])["choices"][0]["message"]["content"]

    def stream() -> str:
        body = {"messages": [{"role": "user", "content": QUESTIONS[3]}], "max_tokens": 24, "temperature": 0,
                "stream": True}
        parts = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:]).get("choices") or []:
                        parts.append(choice["delta"].get("content") or "")
        return "".join(parts)

    with cf.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: stream(), range(4))) == [whole] * 4


def test_a_request_joins_the_running_batch_and_leaves_before_it_ends(url):
    """Sent while a long generation runs, a short request is admitted between steps (not when the batch
    empties): it is answered while the long one still streams."""
    body = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 160,
            "temperature": 0, "stream": True, "ignore_eos": True}
    arrived: list[float] = []  # when each of the long stream's events came in

    def long_stream() -> None:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    arrived.append(time.monotonic())

    with cf.ThreadPoolExecutor(1) as pool:
        done = pool.submit(long_stream)
        while len(arrived) < 3 and not done.done():
            time.sleep(0.01)
        assert _ask(url, QUESTIONS[2], max_tokens=4, ignore_eos=True)["usage"]["completion_tokens"] == 4
        answered = time.monotonic()
        done.result()
    assert len(arrived) >= 160
    assert sum(t > answered for t in arrived) > 10, "the long stream went on after the short answer"
