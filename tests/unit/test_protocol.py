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
