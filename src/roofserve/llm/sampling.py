"""What a request asks of generation (Sampling) and the sampling of one token from logits; the logprob
hook a request's `logprobs` installs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    # Called with (logits, token) for every token handed out (logprobs); None: nothing is computed.
    observe: Callable[[torch.Tensor, int], None] | None = None

    @property
    def greedy(self) -> bool:
        # Below ~1e-30 logits / temperature overflow to inf and softmax is NaN; long before that the
        # distribution is one-hot, so such temperatures are greedy.
        return self.temperature < 1e-5


def logprob_hook(top: int | None) -> tuple[list | None, Callable[[torch.Tensor, int], None] | None]:
    """(scores, observe) for a request's logprobs (`top` alternatives, or None: neither): the engine calls
    observe, which fills scores for llm.text.TextStream to read."""
    if top is None:
        return None, None
    scores = []
    return scores, scorer(top, scores)


def scorer(top: int, into: list) -> Callable[[torch.Tensor, int], None]:
    """An observe hook that appends (token, logprob, [(id, logprob), ...top]) to `into`: the model's
    own log-probabilities (before temperature and top_p, as vLLM and OpenAI report them)."""

    def observe(logits: torch.Tensor, token: int) -> None:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        best = torch.topk(logprobs, top) if top else None
        pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
        into.append((token, float(logprobs[token]), pairs))

    return observe


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Next token id from the last position's logits (shape (vocab,))."""
    if sampling.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, sorted_i = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < sampling.top_p  # always keeps the top token
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(sorted_i[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
