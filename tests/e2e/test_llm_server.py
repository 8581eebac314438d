"""The real LLM server as a subprocess, driven by the official openai client and by raw HTTP: every test
runs against the one-at-a-time server and against the continuous batch (--max-batch-size 4), whose
per-request behaviour (limits, stop strings, seeds, usage, disconnects, errors) must be the same."""

import httpx
import openai
import pytest

from tests.conftest import metric, running_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CONTEXT = 256


@pytest.fixture(scope="module", params=[1, 4], ids=["one-at-a-time", "batch-4"])
def url(request):
    with running_server(["llm", "--max-seq-len", str(CONTEXT), "--max-tokens-cap", "128", "--default-max-tokens", "16",
                         "--max-batch-size", str(request.param), "--send-buffer-bytes", "2048",
                         "--slow-reader-timeout-s", "2"]) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    from roofserve.llm.model import _load_tokenizer, bundled_gguf

    return _load_tokenizer(bundled_gguf())


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2-135m-instruct"]


def test_greedy_answer_is_stable_and_same_streaming_or_not(client):
    answers = [client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=24) for _ in range(2)]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert "Paris" in answers[0].choices[0].message.content
    stream = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=24, stream=True)
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answers[0].choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == answers[0].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == answers[0].usage.completion_tokens


def test_usage_counts_match_the_tokenizer(client, tokenizer):
    answer = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=24)
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert answer.usage.prompt_tokens == len(ids)
    content_ids = tokenizer(answer.choices[0].message.content, add_special_tokens=False)["input_ids"]
    assert answer.usage.completion_tokens == len(content_ids)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_max_tokens_stops_with_length(client):
    long = [{"role": "user", "content": "Write a long story about a dragon."}]
    answer = client.chat.completions.create(model="x", messages=long, temperature=0, max_tokens=7)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 7


def test_seed_makes_sampling_reproducible(client):
    kw = dict(model="x", messages=QUESTION, temperature=1.0, top_p=0.95, max_tokens=16, seed=7)
    assert client.chat.completions.create(**kw).choices[0].message.content == client.chat.completions.create(**kw).choices[0].message.content


def test_stop_string_ends_the_answer(client):
    answer = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=24, stop=["Paris"])
    assert "Paris" not in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"


BAD = {
    "empty messages": {"messages": []},
    "unknown role": {"messages": [{"role": "wizard", "content": "hi"}]},
    "content not text": {"messages": [{"role": "user", "content": {"x": 1}}]},
    "image part": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    "max_tokens zero": {"messages": QUESTION, "max_tokens": 0},
    "max_tokens over context": {"messages": QUESTION, "max_tokens": CONTEXT + 1},
    "max_tokens a string": {"messages": QUESTION, "max_tokens": "10"},
    "temperature too high": {"messages": QUESTION, "temperature": 5},
    "prompt over context": {"messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 8},
    "stream not bool": {"messages": QUESTION, "stream": "yes"},
    "messages not a list": {"messages": "hello"},
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_openai_style_4xx(url, case):
    response = httpx.post(url + "/v1/chat/completions", json=BAD[case], timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]


def test_malformed_json_and_wrong_type(url):
    response = httpx.post(url + "/v1/chat/completions", content=b"{oops", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]["message"]
    response = httpx.post(url + "/v1/chat/completions", content=b"hi", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415


def test_context_error_names_the_numbers(url):
    response = httpx.post(url + "/v1/chat/completions", json=BAD["prompt over context"], timeout=60)
    assert f"context of {CONTEXT} tokens" in response.json()["error"]["message"]


def test_client_that_disconnects_mid_stream_stops_generation(url, client):
    before = metric(url, "roofserve_generations_stopped_total")
    tokens_before = metric(url, "roofserve_stopped_generation_tokens_total")
    body = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 128,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        for i, _line in enumerate(response.iter_lines()):
            if i >= 4:
                break  # hang up after a few tokens
    # The worker serves one request at a time, so once this answers the first one has ended.
    answer = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=8)
    assert answer.choices[0].message.content
    assert metric(url, "roofserve_generations_stopped_total") == before + 1
    # It stopped early: far fewer than the 128 tokens asked for (and ignore_eos kept it from ending).
    assert metric(url, "roofserve_stopped_generation_tokens_total") - tokens_before < 100


def test_a_client_that_stops_reading_a_stream_is_cut_and_releases_its_slot(url, client):
    import json
    import socket
    import time

    before = metric(url, 'roofserve_connections_closed_total{reason="slow_reader"}')
    body = json.dumps({"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                       "max_tokens": 128, "stream": True, "ignore_eos": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # about 50 of the 128 events fit in the buffers
    sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)  # and read nothing
    deadline = time.monotonic() + 30
    while metric(url, 'roofserve_connections_closed_total{reason="slow_reader"}') == before:
        assert time.monotonic() < deadline, "the server kept a client that reads nothing"
        time.sleep(0.25)
    sock.close()
    answer = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=4)
    assert answer.choices[0].message.content
    assert metric(url, "roofserve_requests_in_flight") == 0


def test_metrics_count_tokens_and_time_to_first_token(url, client):
    client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=4)
    text = httpx.get(url + "/metrics").text
    tokens = next(line for line in text.splitlines() if line.startswith("roofserve_tokens_generated_total"))
    assert int(tokens.split()[-1]) >= 4
    ttft = next(line for line in text.splitlines() if line.startswith("roofserve_time_to_first_token_seconds_count"))
    assert int(ttft.split()[-1]) >= 1
    assert 'route="/v1/chat/completions",status="400"' in text


def test_fuzzed_chat_requests_never_get_5xx(url):
    import json

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    values = st.recursive(st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=False) | st.text(max_size=12),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                          max_leaves=8)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 3]), "content": values})
    body = st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=2), values)},
                                 optional={"max_tokens": values, "temperature": values, "top_p": values, "seed": values,
                                           "stop": values, "stream": values, "n": values})

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(doc=body)
    def check(doc):
        response = httpx.post(url + "/v1/chat/completions", content=json.dumps(doc), timeout=60,
                              headers={"Content-Type": "application/json"})
        assert response.status_code < 500, (doc, response.text)

    check()
