"""Requests for LLM benchmarks: synthetic prompts of exact token counts, or a ShareGPT-format file.

Synthetic prompts are words drawn from WORDS, each one token with its leading space in GPT-2-style
BPE vocabularies (SmolLM2's, Llama 3's: a unit test checks the bundled one), so a prompt of N words is
N tokens of message content; the chat template adds its fixed overhead. Each request draws its own
words, so a server's prefix cache cannot answer one from another. Lengths are fixed, or drawn from a
uniform or normal distribution around the mean (`spread` = the half-width or standard deviation as a
fraction of it), with a seed, as vLLM's random dataset does.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from roofserve.errors import UserError

WORDS = ("the of and to in is was for that on with as by at from his it an were are which this be or has had not "
         "first one their its new after but who two they her she also he have been other time into all more some "
         "than when during would only most there can many used over later out where both may between such them "
         "these about through city well world part years made state three under being while people then "
         "known").split()
DISTRIBUTIONS = ("fixed", "uniform", "normal")
CHARS_PER_TOKEN = 4  # for a ShareGPT reply's length when no output length is given (a common estimate)


@dataclass(frozen=True)
class ChatRequest:
    prompt: str
    max_tokens: int
    prompt_tokens: int | None = None  # of the message content, when known (synthetic prompts)


def draw_lengths(n: int, mean: int, dist: str, spread: float, rng: random.Random) -> list[int]:
    if dist not in DISTRIBUTIONS:
        raise UserError(f"length distribution must be one of {', '.join(DISTRIBUTIONS)}; got {dist!r}")
    if mean < 1 or spread < 0:
        raise UserError("lengths must be >= 1 and the spread >= 0")
    if dist == "fixed":
        return [mean] * n
    if dist == "uniform":
        low, high = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
        return [rng.randint(low, high) for _ in range(n)]
    return [max(1, round(rng.gauss(mean, mean * spread))) for _ in range(n)]


def synthetic(n: int, input_len: int, output_len: int, dist: str = "fixed", spread: float = 0.25,
              seed: int = 0) -> list[ChatRequest]:
    """n requests whose message content is exactly its drawn number of tokens."""
    rng = random.Random(seed)
    inputs = draw_lengths(n, input_len, dist, spread, rng)
    outputs = draw_lengths(n, output_len, dist, spread, rng)
    return [ChatRequest("".join(" " + rng.choice(WORDS) for _ in range(length)), out, length)
            for length, out in zip(inputs, outputs)]


def to_sharegpt(requests: list[ChatRequest]) -> list[dict]:
    """The ShareGPT shape (what vLLM's --dataset-name sharegpt reads); the reply stands in for the
    output length: as many words as max_tokens."""
    return [{"id": f"roofserve-{i}", "conversations": [
        {"from": "human", "value": r.prompt.lstrip()},
        {"from": "gpt", "value": " ".join(WORDS[j % len(WORDS)] for j in range(r.max_tokens))}]}
        for i, r in enumerate(requests)]


def load_sharegpt(path: str | Path, n: int, output_len: int | None = None, seed: int = 0) -> list[ChatRequest]:
    """Up to n requests from a ShareGPT-format JSON file (a list of {"conversations": [{"from": "human",
    "value": ...}, {"from": "gpt", "value": ...}, ...]}): the first human turn is the prompt, the reply's
    length (at CHARS_PER_TOKEN, or output_len when given) is max_tokens. Shuffled with the seed."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"dataset not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"dataset {path} is not JSON: {e}") from None
    if not isinstance(doc, list):
        raise UserError(f"dataset {path}: expected a JSON list of conversations (ShareGPT format)")
    requests = []
    for entry in doc:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, reply = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(reply, dict) and first.get("from") in ("human", "user")
                and isinstance(first.get("value"), str) and isinstance(reply.get("value"), str) and first["value"]):
            continue
        max_tokens = output_len or max(1, round(len(reply["value"]) / CHARS_PER_TOKEN))
        requests.append(ChatRequest(first["value"], max_tokens))
    if not requests:
        raise UserError(f"dataset {path}: no conversation with a human turn followed by a reply")
    random.Random(seed).shuffle(requests)
    return requests[:n]
