"""What a worker serves with, whatever the backend: a tokenizer, a chat template, and `batch` (the engine,
or llm.engine.OneAtATime over a backend's token iterator)."""

from __future__ import annotations

from collections.abc import Iterator


def chat_template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Messages through the model's chat template, as ids (what generation and /tokenize both use)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class Generator:
    """What a worker serves with: a tokenizer, a chat template, and `batch`, which has Engine's add, step,
    cancel and has_work."""

    tokenizer = None
    batch = None
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
               seed: int | None = None, ignore_eos: bool = False, observe=None) -> Iterator[int]:
        """One sequence's generated ids through the engine alone (in-process benches and tests; the server
        drives `batch` itself); `observe(logits, token)` (sampling.Sampling.observe) is called for each."""
        from roofserve.llm.sampling import Sampling

        key = object()
        self.batch.add(key, ids, Sampling(max_tokens, temperature, top_p, seed, observe),
                       set() if ignore_eos else self.stop_ids)
        try:
            while self.batch.has_work():
                for seq_id, token in self.batch.step():
                    if seq_id is key:
                        if token is None:
                            return
                        yield token
        finally:
            self.batch.cancel(key)
