"""What a worker serves with, whatever the backend: a tokenizer, a chat template, and `tokens()`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from roofserve.llm.text import stream_text


def chat_template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Messages through the model's chat template, as ids (what generation and /tokenize both use)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class Generator:
    """What a worker serves with: a tokenizer, a chat template, and `tokens()`."""

    tokenizer = None
    stop_ids: set[int] = set()

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return chat_template_ids(self.tokenizer, messages)

    def text_ids(self, text: str) -> list[int]:
        """A raw prompt (/v1/completions) as ids: no chat template."""
        return list(self.tokenizer(text)["input_ids"])

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def tokens(self, ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, ignore_eos: bool = False,
               should_stop: Callable[[], bool] | None = None, observe=None) -> Iterator[int]:
        """Generated ids; `observe(logits, token)` (engine.Sampling.observe) is called before each is yielded."""
        raise NotImplementedError

    def chat(self, ids, max_tokens, temperature, top_p, seed, stop, ignore_eos, should_stop,
             logprobs: int | None = None) -> Iterator[dict]:
        """Text items; with `logprobs` (the number of top alternatives, 0-20) each delta carries the
        logprob entries of its tokens."""
        from roofserve.llm.engine import logprob_hook

        scores, observe = logprob_hook(logprobs)
        tokens = self.tokens(ids, max_tokens, temperature, top_p, seed, ignore_eos, should_stop, observe)
        yield from stream_text(tokens, self.decode, stop, max_tokens, len(ids), scores)
