import json

from roofserve.load.sse import SSEParser


def _feed_in_pieces(raw: bytes, size: int) -> list[str]:
    parser, events = SSEParser(), []
    for i in range(0, len(raw), size):
        events += parser.feed(raw[i : i + size])
    return events


RAW = (
    b": keep-alive\n\n"
    b'data: {"choices": [{"delta": {"content": "Hel"}}]}\r\n\r\n'
    b"event: message\n"
    b'data: {"choices": [{"delta": {"content": "lo"}}]}\n\n'
    b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": {"completion_tokens": 2}}\n\n'
    b"data: [DONE]\n\n"
)


def test_events_survive_any_chunking():
    whole = _feed_in_pieces(RAW, len(RAW))
    assert len(whole) == 4 and whole[-1] == "[DONE]"
    for size in (1, 2, 3, 7, 50):
        assert _feed_in_pieces(RAW, size) == whole


def test_usage_in_the_last_chunk_is_kept():
    events = _feed_in_pieces(RAW, 5)
    assert json.loads(events[2])["usage"]["completion_tokens"] == 2


def test_multiline_data_is_joined_and_comments_dropped():
    parser = SSEParser()
    assert parser.feed(b": ping\ndata: a\ndata: b\n") == []
    assert parser.feed(b"\n") == ["a\nb"]
