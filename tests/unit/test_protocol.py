"""The LLM wire format without a server: what each route accepts, refuses, and how answers look."""

import pytest
from fastapi import HTTPException

from roofserve.config import LLMConfig, make_config
from roofserve.llm.protocol import (
    Formatter,
    validate_chat_request,
    validate_completion_request,
    validate_detokenize_request,
    validate_tokenize_request,
)

CFG = make_config(LLMConfig)
SERVED = ("smollm2-135m-instruct", "smol")
HELLO = [{"role": "user", "content": "hi"}]


def _refused(fn, *args) -> HTTPException:
    with pytest.raises(HTTPException) as e:
        fn(*args)
    return e.value


def test_every_route_checks_the_object_its_fields_and_the_model():
    for fn, args in ((validate_chat_request, (CFG, SERVED)), (validate_completion_request, (CFG, SERVED)),
                     (validate_tokenize_request, (SERVED,)), (validate_detokenize_request, (SERVED, 100))):
        assert _refused(fn, [], *args).status_code == 400
        assert "unsupported field: best_of" in _refused(fn, {"best_of": 3}, *args).detail
        missing = _refused(fn, {"model": "gpt-4o"}, *args)
        assert missing.status_code == 404 and missing.code == "model_not_found"


def test_requests_are_normalised():
    chat = validate_chat_request({"messages": HELLO, "model": "smol", "stop": "x", "n": 1, "user": "u"}, CFG, SERVED)
    assert chat["route"] == "chat" and chat["stop"] == ["x"] and chat["messages"] == HELLO
    assert validate_completion_request({"prompt": ["hello"]}, CFG, SERVED)["prompt"] == "hello"  # a batch of one
    assert validate_completion_request({"prompt": [1, 2]}, CFG, SERVED)["prompt"] == [1, 2]
    assert "one prompt per request" in _refused(validate_completion_request, {"prompt": ["a", "b"]}, CFG, SERVED).detail
    assert validate_tokenize_request({"prompt": "x"}, SERVED) == {"prompt": "x", "add_special_tokens": True}
    assert validate_detokenize_request({"tokens": [1, 99]}, SERVED, 100) == [1, 99]
    assert _refused(validate_detokenize_request, {"tokens": [100]}, SERVED, 100).status_code == 400


def test_formatter_speaks_openais_chat_and_completion_shapes():
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chat = Formatter({"route": "chat", "request_id": 255, "include_usage": True}, "m", 0, {})
    assert chat.whole("ab", "stop", usage)["choices"][0]["message"] == {"role": "assistant", "content": "ab"}
    assert len(chat.start()) == 1 and '"content": "a"' in chat.delta("a")
    end = chat.end("length", usage)
    assert len(end) == 2 and '"choices": []' in end[1]  # include_usage: OpenAI's usage-only chunk
    text = Formatter({"route": "completions", "request_id": 255}, "m", 0, {})
    assert text.whole("ab", "stop", usage)["object"] == "text_completion" and text.start() == []
    assert text.base["id"] == "cmpl-ff" and len(text.end("stop", usage)) == 1


def test_numbers_must_be_finite_and_seeds_64_bit():
    for value in (float("nan"), float("inf"), float("-inf")):
        for field in ("temperature", "top_p"):
            refused = _refused(validate_chat_request, {"messages": HELLO, field: value}, CFG, SERVED)
            assert refused.status_code == 400 and "finite" in refused.detail
    for seed in (2 ** 64, -(2 ** 63) - 1, 2 ** 70):
        assert "64-bit" in _refused(validate_chat_request, {"messages": HELLO, "seed": seed}, CFG, SERVED).detail
    assert validate_chat_request({"messages": HELLO, "seed": 2 ** 64 - 1}, CFG, SERVED)["seed"] == 2 ** 64 - 1


def test_text_must_be_valid_unicode_and_fit_the_context():
    lone = "\ud800"
    assert "surrogate" in _refused(validate_chat_request, {"messages": [{"role": "user", "content": lone}]},
                                   CFG, SERVED).detail
    parts = [{"type": "text", "text": "a" + lone}]
    assert _refused(validate_chat_request, {"messages": [{"role": "user", "content": parts}]}, CFG, SERVED)
    assert "surrogate" in _refused(validate_completion_request, {"prompt": lone}, CFG, SERVED).detail
    assert "surrogate" in _refused(validate_chat_request, {"messages": HELLO, "stop": lone}, CFG, SERVED).detail
    assert "surrogate" in _refused(validate_tokenize_request, {"prompt": lone}, SERVED).detail
    huge = "x" * (CFG.max_seq_len * 128 + 1)  # refused before any tokenizer sees it
    assert "characters" in _refused(validate_completion_request, {"prompt": huge}, CFG, SERVED).detail
    assert "characters" in _refused(validate_chat_request, {"messages": [{"role": "user", "content": huge}]},
                                    CFG, SERVED).detail
    assert "tokens" in _refused(validate_completion_request, {"prompt": [1] * CFG.max_seq_len}, CFG, SERVED).detail


def test_tiny_temperatures_are_greedy():
    import torch

    from roofserve.llm.sampling import Sampling, sample

    logits = torch.tensor([1.0, 30.0, 2.0])
    for temperature in (1e-39, 1e-30, 1e-6):  # logits / 1e-39 overflow: softmax would be NaN
        assert Sampling(temperature=temperature).greedy
        assert sample(logits, Sampling(temperature=temperature), torch.Generator().manual_seed(0)) == 1
    assert not Sampling(temperature=0.5).greedy


def test_json_nested_too_deeply_is_a_short_value_error():
    from roofserve.server.http import parse_json

    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json(b"[" * 100_000 + b"]" * 100_000)
