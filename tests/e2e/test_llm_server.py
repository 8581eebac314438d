"""The real LLM server as a subprocess, driven by the official openai client and by raw HTTP: every test
runs against the one-at-a-time server and against the continuous batch (--max-batch-size 4), whose
per-request behaviour (limits, stop strings, seeds, usage, disconnects, errors) must be the same;
tests marked ONCE check what only the HTTP process does (routes, validation, the tokenizer, the bench
client) and run against the one-at-a-time server alone."""

from collections import Counter

import httpx
import openai
import pytest

from tests.conftest import metric, running_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MODEL = "smollm2-135m-instruct"
CONTEXT = 256


@pytest.fixture(scope="module", params=[1, 4], ids=["one-at-a-time", "batch-4"])
def url(request):
    with running_server(["llm", "--max-seq-len", str(CONTEXT), "--max-tokens-cap", "128", "--default-max-tokens", "16",
                         "--max-batch-size", str(request.param), "--send-buffer-bytes", "2048",
                         "--slow-reader-timeout-s", "2", "--served-model-name", f"{MODEL},smol"]) as url:
        yield url


ONCE = pytest.mark.parametrize("url", [1], indirect=True, ids=["one-at-a-time"])


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    from roofserve.llm.model import _load_tokenizer, bundled_gguf

    return _load_tokenizer(bundled_gguf())


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL, "smol"]  # --served-model-name: the name and an alias


def test_greedy_answer_is_stable_and_same_streaming_or_not(client):
    answers = [client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24) for _ in range(2)]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert "Paris" in answers[0].choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, stream=True)
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answers[0].choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == answers[0].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == answers[0].usage.completion_tokens


def test_usage_counts_match_the_tokenizer(client, tokenizer):
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert answer.usage.prompt_tokens == len(ids)
    content_ids = tokenizer(answer.choices[0].message.content, add_special_tokens=False)["input_ids"]
    assert answer.usage.completion_tokens == len(content_ids)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_top_k_min_p_and_penalties_reach_the_sampler(client, tokenizer):
    """vLLM's and llama-server's top_k and min_p, OpenAI's frequency_penalty: with top_k 1 (or min_p 1)
    sampling at any temperature is greedy; a frequency penalty makes the greedy answer repeat itself less."""
    ask = {"model": MODEL, "prompt": "yes, yes, yes, yes, yes, yes, yes,", "max_tokens": 16, "temperature": 0}

    def answer(**change) -> str:
        return client.completions.create(**{**ask, **change}).choices[0].text

    greedy = answer()
    assert answer(temperature=1.5, seed=7, extra_body={"top_k": 1}) == greedy
    assert answer(temperature=1.5, seed=7, extra_body={"min_p": 1.0}) == greedy
    assert answer(temperature=1.5, seed=7, extra_body={"top_k": 1, "min_p": 0.1, "top_p": 0.5}) == greedy
    penalized = answer(frequency_penalty=2.0)
    most = lambda text: max(Counter(tokenizer(text, add_special_tokens=False)["input_ids"]).values())
    assert most(greedy) >= 5 and most(penalized) < most(greedy), (greedy, penalized)


def test_max_tokens_stops_with_length(client):
    long = [{"role": "user", "content": "Write a long story about a dragon."}]
    answer = client.chat.completions.create(model=MODEL, messages=long, temperature=0, max_tokens=7)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 7


def test_seed_makes_sampling_reproducible(client):
    kw = dict(model=MODEL, messages=QUESTION, temperature=1.0, top_p=0.95, max_tokens=16, seed=7)
    assert client.chat.completions.create(**kw).choices[0].message.content == client.chat.completions.create(**kw).choices[0].message.content


def test_stop_string_ends_the_answer(client):
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, stop=["Paris"])
    assert "Paris" not in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"


def test_completions_work_through_the_openai_sdk_streaming_or_not(client, tokenizer):
    prompt = "The capital of France is"
    whole = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.choices[0].finish_reason in ("length", "stop")
    assert whole.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])  # no chat template
    stream = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in stream if c.choices) == whole.choices[0].text
    assert stream[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    by_ids = client.completions.create(model=MODEL, prompt=tokenizer(prompt)["input_ids"], temperature=0, max_tokens=8)
    assert by_ids.choices[0].text == whole.choices[0].text


def test_stream_options_include_usage_adds_openais_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-2].choices[0].finish_reason == "length"


def test_chat_logprobs_score_each_token_and_the_greedy_one_is_the_top(client, tokenizer):
    kw = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 12, "logprobs": True, "top_logprobs": 5}
    whole = client.chat.completions.create(**kw)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens
    assert "".join(e.token for e in entries) == whole.choices[0].message.content
    for e in entries:
        assert len(e.top_logprobs) == 5 and e.logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].token == e.token and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-6  # greedy
        assert e.bytes == list(e.token.encode())
    stream = list(client.chat.completions.create(**kw, stream=True))
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == whole.choices[0].message.content
    sampled = client.chat.completions.create(**{**kw, "temperature": 1.0, "seed": 3, "top_logprobs": 0})
    assert all(e.top_logprobs == [] and e.logprob <= 0 for e in sampled.choices[0].logprobs.content)


def test_completions_logprobs_in_the_legacy_shape(client):
    prompt = "The capital of France is"
    whole = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6, logprobs=3)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == whole.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and abs(max(top.values()) - logprob) < 1e-6 and top[token] == max(top.values())
    stream = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6, logprobs=3,
                                            stream=True))
    offsets = [o for c in stream if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


def test_continuous_usage_stats_puts_usage_so_far_in_every_chunk(url):
    """vLLM's stream_options extension, which GuideLLM sends on every request."""
    import json

    body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 10, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    used = [c["usage"]["completion_tokens"] for c in chunks]
    assert all("usage" in c for c in chunks) and used == sorted(used) and used[-1] == 10
    prompt_tokens = {c["usage"]["prompt_tokens"] for c in chunks}
    assert len(prompt_tokens) == 1 and prompt_tokens.pop() > 0


@ONCE
def test_tokenize_and_detokenize_in_vllms_shapes(url, client, tokenizer):
    done = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": "Hello there"}, timeout=60).json()
    assert done["tokens"] == tokenizer("Hello there")["input_ids"] and done["count"] == len(done["tokens"])
    assert done["max_model_len"] == CONTEXT
    chat = httpx.post(url + "/tokenize", json={"messages": QUESTION}, timeout=60).json()
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=2)
    assert chat["count"] == answer.usage.prompt_tokens  # the same chat template as generation
    text = httpx.post(url + "/detokenize", json={"tokens": done["tokens"]}, timeout=60).json()
    assert text == {"prompt": "Hello there"}
    assert httpx.post(url + "/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert httpx.post(url + "/tokenize", json={"prompt": "x", "messages": QUESTION}).status_code == 400
    assert httpx.get(url + "/version").json()["version"]


@ONCE
def test_an_alias_is_served_and_another_model_is_openais_404(url, client):
    assert client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=2).model == MODEL
    response = httpx.post(url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": QUESTION})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert "gpt-4o" in response.json()["error"]["message"]
    assert httpx.post(url + "/v1/completions", json={"model": "gpt-4o", "prompt": "x"}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=2)


@ONCE
def test_bench_llm_serve_sends_exact_lengths_at_a_rate_and_writes_vllms_keys(url, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "serve.json"
    args = [sys.executable, "-m", "roofserve", "bench", "llm-serve", url + "/v1/chat/completions", "--num-prompts", "6",
            "--input-len", "40", "--output-len", "6", "--request-rate", "20", "--max-concurrency", "2",
            "--goodput", "ttft:60000,e2el:60000", "--result-format", "vllm", "--model", MODEL, "--out", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["completed"] == 6 and result["total_output_tokens"] == 36 and result["request_rate"] == 20
    assert result["request_goodput"] == result["request_throughput"] > 0  # every request within generous targets
    for key in ("mean_ttft_ms", "median_tpot_ms", "std_itl_ms", "p99_e2el_ms", "total_token_throughput"):
        assert result[key] > 0, key
    # 40 tokens of content each (synthetic words are one token apiece) plus the chat template's fixed part
    probe = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": ""}]}).json()["count"]
    assert result["input_lens"] == [40 + probe] * 6 and result["output_lens"] == [6] * 6


def test_a_mistake_in_the_servers_checks_is_one_line_and_exit_status_2(tmp_path):
    """The checks run in a child process (above): its UserError still reaches the user as one line."""
    import subprocess
    import sys

    for args, message in ((["--model", str(tmp_path / "missing.gguf")], "GGUF file not found"),
                          (["--device", "cpu", "--precision", "fp16"], "fp16 is slow or unsupported on CPU")):
        done = subprocess.run([sys.executable, "-m", "roofserve", "serve", "llm", *args], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-1000:]
        assert "Traceback" not in done.stderr and done.stderr.count("roofserve: error:") == 1


def test_the_http_process_and_its_forks_do_not_load_torch():
    """Only the worker runs the model: torch stays out of the HTTP process and the processes LitServe
    forks from it (the server's checks run in a child), until /tokenize first needs the tokenizer there
    (transformers imports torch). A server of its own: the module's servers answer /tokenize in other tests."""
    from roofserve.load.process import server_process
    from tests.conftest import torch_in_server_processes

    with server_process(["llm", "--max-seq-len", str(CONTEXT)]) as server:
        assert httpx.post(server.url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2},
                          timeout=60).status_code == 200
        loaded, processes, workers = torch_in_server_processes(server)
        assert loaded == [] and processes >= 2 and workers == 1  # the HTTP process and its forks; the worker


@ONCE
def test_unsupported_fields_are_named_in_a_400_and_neutral_values_pass(url):
    refused = {"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}], "logit_bias": {"5": 1},
               "response_format": {"type": "json_object"}, "presence_penalty": 0.5, "top_k": 5}
    response = httpx.post(url + "/v1/chat/completions", json=refused, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("unsupported fields: logit_bias, response_format, tools")
    neutral = {"messages": QUESTION, "max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0.0, "n": 1,
               "logprobs": False, "tools": [], "user": "someone", "logit_bias": {}}
    assert httpx.post(url + "/v1/chat/completions", json=neutral, timeout=60).status_code == 200
    response = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "echo": True, "suffix": "x"}, timeout=60)
    assert response.status_code == 400 and "echo, suffix" in response.json()["error"]["message"]


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
    "stream_options without stream": {"messages": QUESTION, "stream_options": {"include_usage": True}},
    "top_logprobs without logprobs": {"messages": QUESTION, "top_logprobs": 3},
    "top_logprobs over 20": {"messages": QUESTION, "logprobs": True, "top_logprobs": 21},
    "logprobs a number on chat": {"messages": QUESTION, "logprobs": 2},
    "temperature NaN": {"messages": QUESTION, "temperature": float("nan")},  # json's NaN literal
    "top_p infinite": {"messages": QUESTION, "top_p": float("inf")},
    "seed over 64 bits": {"messages": QUESTION, "seed": 2 ** 70},
    "top_k below -1": {"messages": QUESTION, "top_k": -2},
    "top_k a float": {"messages": QUESTION, "top_k": 2.5},
    "min_p over 1": {"messages": QUESTION, "min_p": 1.5},
    "presence_penalty over 2": {"messages": QUESTION, "presence_penalty": 3},
    "repetition_penalty zero": {"messages": QUESTION, "repetition_penalty": 0},
    "lone surrogate": {"messages": [{"role": "user", "content": "\ud800"}]},
    "prompt far over context": {"messages": [{"role": "user", "content": "x" * (CONTEXT * 128 + 1)}]},
}
BAD_COMPLETIONS = {
    "no prompt": {"model": MODEL},
    "empty prompt": {"prompt": ""},
    "two prompts": {"prompt": ["a", "b"]},
    "prompt ids over the vocabulary": {"prompt": [1, 2, 10**9], "max_tokens": 2},
    "prompt a number": {"prompt": 5},
    "messages on completions": {"messages": QUESTION},
    "prompt over context": {"prompt": "word " * 400, "max_tokens": 8},
    "logprobs over 20": {"prompt": "Hi", "logprobs": 21},
    "logprobs true on completions": {"prompt": "Hi", "logprobs": True},
    "temperature -Infinity": {"prompt": "Hi", "temperature": float("-inf")},
    "lone surrogate": {"prompt": "a\udfff"},
}


@pytest.mark.parametrize("path, case", [("/v1/chat/completions", c) for c in BAD]
                         + [("/v1/completions", c) for c in BAD_COMPLETIONS])
def test_bad_requests_get_openai_style_4xx(url, path, case):
    import json

    body = (BAD if path == "/v1/chat/completions" else BAD_COMPLETIONS)[case]
    response = httpx.post(url + path, content=json.dumps(body), timeout=60,  # NaN and Infinity as json writes them
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]


def test_malformed_json_and_wrong_type(url):
    response = httpx.post(url + "/v1/chat/completions", content=b"{oops", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]["message"]
    response = httpx.post(url + "/v1/chat/completions", content=b"hi", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415


def test_deep_json_and_compressed_bodies_are_refused(url):
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = httpx.post(url + "/v1/chat/completions", content=deep, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "nested too deeply" in response.json()["error"]["message"]
    response = httpx.post(url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2},
                          headers={"Content-Encoding": "gzip"})
    assert response.status_code == 415 and "gzip" in response.json()["error"]["message"]


def test_a_tiny_temperature_is_greedy_and_the_worker_lives(url, client):
    greedy = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
    for temperature in (1e-39, 1e-30):  # logits / temperature overflow: softmax would be NaN
        answer = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=temperature, max_tokens=8)
        assert answer.choices[0].message.content == greedy.choices[0].message.content
    assert metric(url, "roofserve_worker_deaths_total") == 0


def test_a_client_that_leaves_a_whole_answer_request_stops_its_generation(url, client):
    import json
    import socket
    import time

    before = metric(url, "roofserve_generations_stopped_total")
    body = json.dumps({"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                       "max_tokens": 128, "temperature": 0, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(0.5)  # generating; then hang up before the answer is whole
    deadline = time.monotonic() + 30
    while metric(url, "roofserve_generations_stopped_total") == before:
        assert time.monotonic() < deadline, "the generation went on after its client left"
        time.sleep(0.1)
    assert metric(url, "roofserve_requests_in_flight") == 0
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4)
    assert answer.choices[0].message.content


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
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
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
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4)
    assert answer.choices[0].message.content
    assert metric(url, "roofserve_requests_in_flight") == 0


def test_metrics_count_tokens_and_time_to_first_token(url, client):
    client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4)
    text = httpx.get(url + "/metrics").text
    tokens = next(line for line in text.splitlines() if line.startswith("roofserve_tokens_generated_total"))
    assert int(tokens.split()[-1]) >= 4
    ttft = next(line for line in text.splitlines() if line.startswith("roofserve_time_to_first_token_seconds_count"))
    assert int(ttft.split()[-1]) >= 1
    assert 'route="/v1/chat/completions",status="400"' in text
    assert metric(url, "roofserve_prompt_tokens_total") > 0 and metric(url, "process_resident_memory_bytes") > 0
    client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4, stream=True)
    assert metric(url, "roofserve_time_per_output_token_seconds_count") >= 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_fuzzed_generation_requests_never_get_5xx(url, path):
    _fuzz(url, path)


@ONCE
@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_fuzzed_tokenizer_requests_never_get_5xx(url, path):
    _fuzz(url, path)


def _fuzz(url: str, path: str) -> None:
    import json

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    text = st.text(st.characters(exclude_categories=()), max_size=12)  # lone surrogates too
    values = st.recursive(st.none() | st.booleans() | st.integers(-5, 300) | st.integers() | st.floats() | text,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                          max_leaves=8)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 3]), "content": values})
    optional = {"max_tokens": values, "temperature": values, "top_p": values, "seed": values, "stop": values,
                "stream": values, "n": values, "model": st.sampled_from([MODEL, "smol", "other", 3]),
                "stream_options": values, "logprobs": values, "top_logprobs": values, "add_special_tokens": values}
    body = st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=2), values)}, optional=optional) \
        if path != "/v1/completions" else st.fixed_dictionaries({"prompt": st.one_of(values, st.lists(
            st.integers(-2, 60000), max_size=4))}, optional=optional)
    if path == "/detokenize":
        body = st.fixed_dictionaries({"tokens": st.one_of(values, st.lists(st.integers(-2, 60000), max_size=4))},
                                     optional={"model": st.sampled_from([MODEL, "other"])})
    if path == "/tokenize":
        body = st.one_of(body, st.fixed_dictionaries({"prompt": values}, optional=optional))

    @settings(max_examples=25 if path.startswith("/v1") else 15, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(doc=body)
    def check(doc):
        if path.startswith("/v1") and isinstance(doc, dict) and doc.get("max_tokens") is None:
            doc["max_tokens"] = 4  # keep the generations that do run short
        response = httpx.post(url + path, content=json.dumps(doc), timeout=60,
                              headers={"Content-Type": "application/json"})
        assert response.status_code < 500, (doc, response.text)

    check()
