"""Token ids -> streamed text: incremental detokenization with stop strings held back until resolved."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator


def stream_text(
    tokens: Iterable[int], decode: Callable[[list[int]], str], stop: list[str], max_tokens: int, prompt_tokens: int
) -> Iterator[dict]:
    """Yield {"t": "delta", "text"} items, then one {"t": "end", "finish_reason", "usage"} item.

    Detokenizes incrementally in O(1) per token: only the last few ids are decoded each step (a
    token's text can depend on its left neighbours, so a short prefix is decoded along). Text that
    might be the start of a stop string, or an incomplete UTF-8 sequence, is held back until the next
    token decides it. finish_reason is "length" when max_tokens were generated, else "stop"
    (end-of-sequence token or a stop string).
    """
    ids: list[int] = []
    text = ""  # everything decoded so far
    sent = 0  # characters of `text` already yielded
    prefix, read = 0, 0  # ids[prefix:read] is the context for decoding what follows `read`
    finish = "stop"
    for token in tokens:
        ids.append(token)
        before = decode(ids[prefix:read])
        after = decode(ids[prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            text += after[len(before):]
            prefix, read = read, len(ids)
        hit = min((i for i in (text.find(s, max(0, sent - len(s))) for s in stop) if i >= 0), default=-1)
        if hit >= 0:
            if hit > sent:
                yield {"t": "delta", "text": text[sent:hit]}
            sent = len(text)
            break
        safe = len(text) - _held_back(text, stop)
        if safe > sent:
            yield {"t": "delta", "text": text[sent:safe]}
            sent = safe
    else:
        if read < len(ids):  # bytes of an unfinished character at the very end
            text += decode(ids[prefix:])[len(decode(ids[prefix:read])):]
        if len(text) > sent:
            yield {"t": "delta", "text": text[sent:]}
        if len(ids) >= max_tokens:
            finish = "length"
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids), "total_tokens": prompt_tokens + len(ids)}
    yield {"t": "end", "finish_reason": finish, "usage": usage}


def coalesce(items: Iterable[dict], every: int) -> Iterator[dict]:
    """Join the text of up to `every` delta items into one (vLLM's stream interval): each message
    costs the server and the client the same CPU however much text it holds. The first delta goes
    alone, so the time to first token does not wait; held text goes out before any other item."""
    held: list[str] = []
    first = True
    for item in items:
        if item["t"] == "delta" and not first:
            held.append(item["text"])
            if len(held) < every:
                continue
            item, held = {"t": "delta", "text": "".join(held)}, []
        elif held:
            yield {"t": "delta", "text": "".join(held)}
            held = []
        first = first and item["t"] != "delta"
        yield item
    if held:
        yield {"t": "delta", "text": "".join(held)}


def _held_back(text: str, stop: list[str]) -> int:
    """How many trailing characters must wait: an unfinished UTF-8 char, or a possible stop-string start."""
    if text.endswith("\ufffd"):
        return 1
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold
