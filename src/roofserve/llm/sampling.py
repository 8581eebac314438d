"""What a request asks of generation (Sampling) and the sampling of one token from logits; the logprob
hook a request's `logprobs` installs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    """What a request asks of each next token, in vLLM's order: penalties on the logits, then temperature,
    then top_k, min_p and top_p on the probabilities (each off at its default)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    # Called with (logits, token) for every token handed out (logprobs); None: nothing is computed.
    observe: Callable[[torch.Tensor, int], None] | None = None
    top_k: int = 0  # the k most likely tokens only; 0 (or -1): all
    min_p: float = 0.0  # tokens at least min_p times as likely as the most likely one
    presence_penalty: float = 0.0  # OpenAI's: subtracted from a token's logit once it was generated
    frequency_penalty: float = 0.0  # ... times the number of times it was generated
    repetition_penalty: float = 1.0  # vLLM's and transformers': tokens of the prompt or output, logit / r (> 0)
    generated: Counter = field(default_factory=Counter, repr=False)  # the penalties' memory
    prompt: frozenset = field(default_factory=frozenset, repr=False)

    @property
    def greedy(self) -> bool:
        # Below ~1e-30 logits / temperature overflow to inf and softmax is NaN; long before that the
        # distribution is one-hot, so such temperatures are greedy.
        return self.temperature < 1e-5

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def start(self, prompt_ids: Iterable[int]) -> None:
        """A new sequence from this prompt (what repetition_penalty counts as seen)."""
        self.generated.clear()
        self.prompt = frozenset(prompt_ids) if self.repetition_penalty != 1.0 else frozenset()


def penalize(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The logits (vocab,) with the request's penalties applied (a new fp32 tensor)."""
    logits = logits.float().clone()
    if sampling.repetition_penalty != 1.0:
        seen = sorted(sampling.prompt | set(sampling.generated))
        if seen:
            ids = torch.tensor(seen, device=logits.device)
            values = logits[ids]
            r = sampling.repetition_penalty
            logits[ids] = torch.where(values > 0, values / r, values * r)
    if sampling.generated and (sampling.presence_penalty or sampling.frequency_penalty):
        ids = torch.tensor(list(sampling.generated), device=logits.device)
        counts = torch.tensor(list(sampling.generated.values()), dtype=logits.dtype, device=logits.device)
        logits[ids] -= sampling.frequency_penalty * counts + sampling.presence_penalty
    return logits


def logprob_hook(top: int | None) -> tuple[list | None, Callable[[torch.Tensor, int], None] | None]:
    """(scores, observe) for a request's logprobs (`top` alternatives, or None: neither): the engine calls
    observe, which fills scores for llm.text.TextStream to read."""
    if top is None:
        return None, None
    scores = []
    return scores, scorer(top, scores)


def scorer(top: int, into: list) -> Callable[[torch.Tensor, int], None]:
    """An observe hook that appends (token, logprob, [(id, logprob), ...top]) to `into`: the model's
    own log-probabilities (before the penalties, temperature and filters, as vLLM and OpenAI report them)."""

    def observe(logits: torch.Tensor, token: int) -> None:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        best = torch.topk(logprobs, top) if top else None
        pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
        into.append((token, float(logprobs[token]), pairs))

    return observe


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Next token id from the last position's logits (shape (vocab,)); the penalties remember it."""
    token = _choose(penalize(logits, sampling) if sampling.penalized else logits, sampling, generator)
    if sampling.penalized:
        sampling.generated[token] += 1
    return token


def _choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = torch.where(logits >= kth, logits, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.min_p > 0.0:
        probs = torch.where(probs >= sampling.min_p * probs.max(), probs, 0.0)  # keeps the top token
    if sampling.top_p < 1.0:
        sorted_p, sorted_i = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < sampling.top_p * sorted_p.sum()  # keeps the top token
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(sorted_i[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
