"""platforms/ray_proxy.py: what Ray's proxy leaves unanswered gets our 503; what it answers goes through.
The apps below stand in for Ray's proxy app only in what it sends (tests/e2e/test_ray_platform.py kills
real replicas under real requests)."""

import asyncio
import json

import pytest

from roofserve.platforms.ray_proxy import PROXY_CALLBACK, ReplicaDiedMiddleware


def _call(app) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    asyncio.run(ReplicaDiedMiddleware(app)(scope, receive, send))
    return sent


def test_a_request_left_unanswered_gets_503_with_retry_after():
    async def died(scope, receive, send):  # Ray's proxy after a RayActorError
        return

    start, body = _call(died)
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    assert "died" in json.loads(body["body"])["error"]["message"]


def test_a_stream_cut_short_ends_with_an_error_event_and_done():
    async def cut(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})

    *_, last = _call(cut)
    assert last["more_body"] is False
    error, done = last["body"].decode().split("\n\n")[:2]
    assert json.loads(error.removeprefix("data: "))["error"]["code"] == 503 and done == "data: [DONE]"


def test_answers_from_replicas_go_through_unchanged():
    whole = [{"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]},
             {"type": "http.response.body", "body": b'{"error": "ours"}', "more_body": False}]

    async def answered(scope, receive, send):
        for message in whole:
            await send(message)

    assert _call(answered) == whole


def test_ray_loads_the_callback_from_its_import_path():
    http_util = pytest.importorskip("ray.serve._private.http_util", reason="needs the ray extra")
    from ray.serve._private.utils import call_function_from_import_path

    [middleware] = http_util.validate_http_proxy_callback_return(call_function_from_import_path(PROXY_CALLBACK))
    assert middleware.cls is ReplicaDiedMiddleware
