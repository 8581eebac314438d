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


def test_top_k_min_p_and_the_penalties_are_checked_and_passed_on():
    chat = validate_chat_request({"messages": HELLO, "top_k": 40, "min_p": 0.05, "presence_penalty": -0.5,
                                  "frequency_penalty": 1, "repetition_penalty": 1.1}, CFG, SERVED)
    assert (chat["top_k"], chat["min_p"], chat["presence_penalty"], chat["frequency_penalty"],
            chat["repetition_penalty"]) == (40, 0.05, -0.5, 1.0, 1.1)
    plain = validate_completion_request({"prompt": "x", "top_k": -1}, CFG, SERVED)  # vLLM's "all"
    assert (plain["top_k"], plain["min_p"], plain["presence_penalty"], plain["repetition_penalty"]) == (0, 0, 0, 1)
    for field, value in (("top_k", -2), ("top_k", 1.5), ("min_p", 2), ("frequency_penalty", -3),
                         ("repetition_penalty", 0)):
        assert field in _refused(validate_chat_request, {"messages": HELLO, field: value}, CFG, SERVED).detail
    llamacpp = make_config(LLMConfig, {"backend": "llamacpp"})
    assert validate_chat_request({"messages": HELLO, "top_k": 5, "presence_penalty": 0}, llamacpp, SERVED)["top_k"] == 5
    refused = _refused(validate_chat_request, {"messages": HELLO, "repetition_penalty": 1.2}, llamacpp, SERVED)
    assert "'repetition_penalty' is not available with the llamacpp backend" in refused.detail


def test_sampling_filters_keep_what_they_promise():
    import torch

    from roofserve.llm.sampling import Sampling, sample

    logits = torch.tensor([0.0, 4.0, 3.9, 3.8, -2.0])
    seen = lambda sampling: {sample(logits, sampling, torch.Generator().manual_seed(i)) for i in range(200)}
    assert seen(Sampling(temperature=1.0)) >= {1, 2, 3}  # unfiltered: several tokens
    assert seen(Sampling(temperature=1.0, top_k=1)) == {1}
    assert seen(Sampling(temperature=1.0, top_k=2)) == {1, 2}
    # min_p: tokens at least min_p times as likely as token 1 (2 and 3: e^-0.1 = 0.90 and e^-0.2 = 0.82 of it,
    # 0: e^-4 = 0.018)
    assert seen(Sampling(temperature=1.0, min_p=0.5)) == {1, 2, 3}
    assert seen(Sampling(temperature=1.0, min_p=0.85)) == {1, 2}
    assert seen(Sampling(temperature=1.0, min_p=0.95)) == {1}


def test_penalties_count_the_output_and_repetition_the_prompt_too():
    import torch

    from roofserve.llm.sampling import Sampling, sample

    logits = torch.tensor([0.0, 4.0, 3.0, 1.0])
    plain = Sampling()  # greedy, unpenalized: the same token every time
    assert [sample(logits, plain, None) for _ in range(3)] == [1, 1, 1]
    # presence 3.5, once however often: once 1 (4.0 -> 0.5) and 2 (3.0 -> -0.5) were said, 3 (1.0) is
    # next, then 1 again (0.5 against 0.0 and -2.5)
    presence = Sampling(presence_penalty=3.5)
    presence.start([0])
    assert [sample(logits, presence, None) for _ in range(4)] == [1, 2, 3, 1]
    frequency = Sampling(frequency_penalty=0.6)  # 4.0 - 0.6 n against 3.0 - 0.6 m
    frequency.start([0])
    assert [sample(logits, frequency, None) for _ in range(4)] == [1, 1, 2, 1]
    repetition = Sampling(repetition_penalty=2.0)  # a prompt token: 4.0 / 2 = 2.0, below 3.0
    repetition.start([1])
    assert sample(logits, repetition, None) == 2
    repetition.start([3])  # a new sequence forgets the last one's tokens
    assert sample(logits, repetition, None) == 1 and sample(logits, repetition, None) == 2


def test_json_nested_too_deeply_is_a_short_value_error():
    from roofserve.server.http import parse_json

    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json(b"[" * 100_000 + b"]" * 100_000)
