"""How the chat API turns the worker's items into an answer when the worker fails mid-answer: an
OpenAI-shaped error (a JSON 500, or an error event then [DONE] in a stream), never a 200 with the text
so far, a plain-text 500, or a stream cut without a word."""

import asyncio
import json

from litserve.utils import LitAPIStatus

from roofserve.config import LLMConfig, make_config
from roofserve.llm.api import LLMAPI
from roofserve.server.lit import _failures_as_rejections
from roofserve.server.metrics import Metrics

DELTA = {"t": "delta", "text": "Par", "tokens": 1}


def _answer(items: list, stream: bool):
    api = LLMAPI(make_config(LLMConfig), "m", random_weights=False)
    payload = {"route": "chat", "request_id": 7, "stream": stream, "logprobs": None}

    async def source():
        for item in items:
            yield item

    async def run():
        response = await api.respond(payload, {"t": "start", "prompt_tokens": 3}, _failures_as_rejections(source()),
                                     lambda: None, 0.0, Metrics(()))
        if not stream:
            return response.status_code, json.loads(response.body)
        return response.status_code, [event async for event in response.body_iterator]

    return asyncio.run(run())


def test_a_worker_exception_after_the_first_token_is_an_openai_error():
    failed = [(DELTA, LitAPIStatus.OK), (RuntimeError("kaboom"), LitAPIStatus.ERROR)]
    status, body = _answer(failed, stream=False)
    assert status == 500 and body["error"]["type"] == "server_error" and "kaboom" not in json.dumps(body)
    status, events = _answer(failed, stream=True)
    assert status == 200 and '"Par"' in events[1]
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == 500 and events[-1] == "data: [DONE]\n\n"


def test_items_that_end_without_an_end_item_are_an_error_not_the_text_so_far():
    status, body = _answer([(DELTA, LitAPIStatus.OK)], stream=False)  # e.g. a Ray replica's thread died
    assert status == 500 and "failed" in body["error"]["message"]
    _status, events = _answer([(DELTA, LitAPIStatus.OK)], stream=True)
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]\n\n"


def test_a_whole_answer_still_ends_with_its_finish_reason():
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    status, body = _answer([(DELTA, LitAPIStatus.OK), ({"t": "end", "finish_reason": "length", "usage": usage},
                                                       LitAPIStatus.OK)], stream=False)
    assert status == 200 and body["choices"][0]["message"]["content"] == "Par"
    assert body["choices"][0]["finish_reason"] == "length"
