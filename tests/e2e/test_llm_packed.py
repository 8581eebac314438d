"""`roofserve serve llm --model FILE.gguf`: a user's GGUF file is served from its own blocks (--gguf-weights
auto = packed), in the continuous batch, over real HTTP."""

import concurrent.futures as cf
import json

import httpx
import pytest

from roofserve.llm.model import bundled_gguf
from roofserve.load.process import server_process

QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def server():
    with server_process(["llm", "--model", str(bundled_gguf()), "--max-batch-size", "4", "--max-seq-len", "256",
                         "--max-tokens-cap", "64"]) as server:
        yield server


def ask(url: str, question: str, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0, **extra}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_server_prints_its_memory_plan(server):
    log = server.log_tail(200_000)
    assert "memory plan: weights 0.10 GB (Q4_1 0.07 GB, Q8_0 0.03 GB" in log
    assert ("memory plan: KV cache 0.006 GB per sequence of 256 tokens, 4 sequences: up to 0.02 GB, held as "
            "they fill it") in log  # 2 x 30 x 3 x 64 x 256 x 2 B


def test_each_answer_is_the_same_alone_or_among_others(server):
    """Each row of a batched step is quantized and summed as it is alone, so batching changes no token."""
    alone = [ask(server.url, q)["choices"][0]["message"]["content"] for q in QUESTIONS]
    assert all(alone)
    with cf.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda q: ask(server.url, q)["choices"][0]["message"]["content"], QUESTIONS))
    assert together == alone


def test_streamed_text_is_the_whole_answer(server):
    whole = ask(server.url, QUESTIONS[1])["choices"][0]["message"]["content"]
    body = {"messages": [{"role": "user", "content": QUESTIONS[1]}], "max_tokens": 24, "temperature": 0,
            "stream": True}
    pieces = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"]
                if delta:
                    pieces.append(delta[0]["delta"].get("content") or "")
    assert "".join(pieces) == whole
