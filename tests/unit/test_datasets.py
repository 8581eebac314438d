"""Benchmark requests (load.datasets), goodput, and the summary under vLLM's names (load.llm.vllm_keys)."""

import json

import pytest

from roofserve.errors import UserError
from roofserve.load.datasets import WORDS, load_sharegpt, synthetic, to_sharegpt
from roofserve.load.core import RequestResult, summarize
from roofserve.load.llm import parse_goodput, vllm_keys


@pytest.fixture(scope="module")
def tokenizer():
    from roofserve.llm.model import load_tokenizer

    return load_tokenizer("default")


def test_every_word_is_one_token_so_prompts_have_exact_lengths(tokenizer):
    assert all(len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1 for w in WORDS)
    requests = synthetic(20, 64, 16, "uniform", 0.5, seed=3)
    for r in requests:
        assert len(tokenizer(r.prompt, add_special_tokens=False)["input_ids"]) == r.prompt_tokens
        assert 32 <= r.prompt_tokens <= 96 and 8 <= r.max_tokens <= 24
    assert len({r.prompt for r in requests}) == 20  # no two alike: a prefix cache cannot answer one from another
    assert synthetic(20, 64, 16, "uniform", 0.5, seed=3) == requests  # the seed fixes them
    assert {r.prompt_tokens for r in synthetic(10, 50, 5)} == {50}  # fixed
    assert min(r.prompt_tokens for r in synthetic(200, 10, 5, "normal", 2.0)) >= 1


def test_sharegpt_files_round_trip_and_bad_files_are_one_line_errors(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(to_sharegpt(synthetic(5, 12, 7))))
    loaded = load_sharegpt(path, n=10, output_len=7)
    assert sorted(r.prompt for r in loaded) == sorted(r.prompt.lstrip() for r in synthetic(5, 12, 7))
    assert {r.max_tokens for r in loaded} == {7}
    assert len(load_sharegpt(path, n=3)) == 3
    path.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "x"}]}]))
    with pytest.raises(UserError, match="no conversation"):
        load_sharegpt(path, n=3)
    path.write_text("{nope")
    with pytest.raises(UserError, match="not JSON"):
        load_sharegpt(path, n=3)


def test_goodput_counts_requests_within_every_target():
    assert parse_goodput(["ttft:200", "tpot:50"]) == {"ttft": 200.0, "tpot": 50.0}
    with pytest.raises(UserError, match="must be one of"):
        parse_goodput(["latency:3"])
    with pytest.raises(UserError, match="METRIC:MILLISECONDS"):
        parse_goodput(["ttft:fast"])
    fast = RequestResult(ok=True, ttft_ms=100, latency_ms=1000, output_tokens=10, prompt_tokens=5, itl_ms=[100] * 9)
    slow = RequestResult(ok=True, ttft_ms=300, latency_ms=1200, output_tokens=10, prompt_tokens=5, itl_ms=[100] * 9)
    failed = RequestResult(ok=False, error="HTTP 503")
    row = summarize([fast, slow, failed], wall_s=2.0, streamed=True, slos_ms={"ttft": 200}).row()
    assert row["ok"] == 2 and row["errors"] == 1 and row["output_tokens_total"] == 20
    assert row["req_per_s"] == 1.0 and row["goodput_req_per_s"] == 0.5
    stats = vllm_keys(row)  # the same numbers under vLLM's names
    assert stats["completed"] == 2 and stats["total_output_tokens"] == 20 and stats["total_input_tokens"] == 10
    assert stats["request_throughput"] == 1.0 and stats["request_goodput"] == 0.5
    assert stats["mean_ttft_ms"] == 200 and stats["median_tpot_ms"] == 100 and stats["p99_itl_ms"] == 100
    assert stats["mean_e2el_ms"] == 1100 and stats["std_ttft_ms"] == 100
    assert summarize([fast], 1.0, streamed=True).row()["goodput_req_per_s"] is None
