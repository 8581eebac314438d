"""Token ids -> streamed text: incremental detokenization with stop strings held back until resolved."""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    """Token ids in, text items out, one token at a time (push-style, so that a batch of sequences can
    each keep one): {"t": "delta", "text"} items from `push`, and `close` ends with one
    {"t": "end", "finish_reason", "usage"} item.

    Detokenizes incrementally in O(1) per token: only the last few ids are decoded each step (a
    token's text can depend on its left neighbours, so a short prefix is decoded along). Text that
    might be the start of a stop string, or an incomplete UTF-8 sequence, is held back until the next
    token decides it. finish_reason is "length" when max_tokens were generated, else "stop"
    (end-of-sequence token or a stop string). After a stop string, `stopped` is true and the caller
    should push no more tokens.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str], max_tokens: int, prompt_tokens: int,
                 scores: list | None = None):
        self.decode, self.stop, self.max_tokens, self.prompt_tokens = decode, stop, max_tokens, prompt_tokens
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already yielded
        self.prefix, self.read = 0, 0  # ids[prefix:read] is the context for decoding what follows `read`
        self.stopped = False
        # logprobs: the engine appends (token, logprob, top pairs) to `scores` before each token reaches
        # `push`; each delta carries the entries of the tokens pushed since the last one.
        self.scores, self.pending = scores, []
        self.counted = 0  # tokens already reported in a delta's "tokens"

    def _entry(self, token: int, logprob: float) -> dict:
        text = self.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def _deltas(self, text: str) -> list[dict]:
        """One delta item: its text, the tokens pushed since the last one, and their logprob entries."""
        item = {"t": "delta", "text": text, "tokens": len(self.ids) - self.counted}
        self.counted = len(self.ids)
        if self.scores is not None:
            item["logprobs"], self.pending = self.pending, []
        return [item]

    def push(self, token: int) -> list[dict]:
        ids, decode, stop = self.ids, self.decode, self.stop
        ids.append(token)
        if self.scores is not None:
            scored, logprob, top = self.scores[len(ids) - 1]
            assert scored == token, "logprobs out of step with the tokens"
            self.pending.append({**self._entry(token, logprob), "top_logprobs": [self._entry(t, lp) for t, lp in top]})
        before = decode(ids[self.prefix:self.read])
        after = decode(ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(ids)
        text, sent = self.text, self.sent
        hit = min((i for i in (text.find(s, max(0, sent - len(s))) for s in stop) if i >= 0), default=-1)
        if hit >= 0:
            self.stopped, self.sent = True, len(text)
            return self._deltas(text[sent:hit]) if hit > sent else []
        safe = len(text) - _held_back(text, stop)
        if safe > sent:
            self.sent = safe
            return self._deltas(text[sent:safe])
        return []

    def close(self) -> list[dict]:
        out, finish = [], "stop"
        if not self.stopped:
            if self.read < len(self.ids):  # bytes of an unfinished character at the very end
                self.text += self.decode(self.ids[self.prefix:])[len(self.decode(self.ids[self.prefix:self.read])):]
            if len(self.text) > self.sent:
                out += self._deltas(self.text[self.sent:])
                self.sent = len(self.text)
            if len(self.ids) >= self.max_tokens:
                finish = "length"
        if self.pending:  # logprobs of tokens whose text was held back and then cut by a stop string
            out += self._deltas("")
        n = len(self.ids)
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}
        out.append({"t": "end", "finish_reason": finish, "usage": usage})
        return out


class Coalescer:
    """Join the text of up to `every` delta items into one (vLLM's stream interval): each message
    costs the server and the client the same CPU however much text it holds. The first delta goes
    alone, so the time to first token does not wait; held text goes out before any other item."""

    def __init__(self, every: int):
        self.every, self.held, self.first = every, [], True

    def push(self, item: dict) -> list[dict]:
        out = []
        if item["t"] == "delta" and not self.first:
            self.held.append(item)
            if len(self.held) < self.every:
                return out
            item = self._joined()
        elif self.held:
            out.append(self._joined())
        self.first = self.first and item["t"] != "delta"
        out.append(item)
        return out

    def _joined(self) -> dict:
        held, self.held = self.held, []
        item = {"t": "delta", "text": "".join(d["text"] for d in held), "tokens": sum(d.get("tokens", 0) for d in held)}
        if "logprobs" in held[0]:
            item["logprobs"] = [entry for d in held for entry in d["logprobs"]]
        return item


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
