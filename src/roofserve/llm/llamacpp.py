"""llama.cpp (llama-cpp-python) behind the same API, on the same GGUF: a peer to compare against."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from roofserve.config import LLMConfig
from roofserve.errors import UserError
from roofserve.llm.text import stream_text


def gguf_path(model: str) -> Path:
    from roofserve.llm.model import DEFAULT_MODEL, bundled_gguf

    if model in (DEFAULT_MODEL, "default"):
        return bundled_gguf()
    if model.endswith(".gguf") and Path(model).is_file():
        return Path(model)
    raise UserError("the llamacpp backend needs a .gguf model (or the default one)")


def open_llama(model: str, n_ctx: int, threads: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("llama-cpp-python is not installed: pip install 'roofserve[llamacpp]' (builds in ~5 min)") from None
    return Llama(model_path=str(gguf_path(model)), n_ctx=n_ctx, n_threads=threads, n_batch=512, verbose=False, seed=0)


class LlamaCppGenerator:
    def __init__(self, cfg: LLMConfig):
        from roofserve.llm.model import _load_tokenizer

        path = gguf_path(cfg.model)
        threads = cfg.threads_per_worker or os.cpu_count() or 1
        self.llm = open_llama(cfg.model, cfg.max_seq_len, threads)
        self.tokenizer = _load_tokenizer(path)  # the GGUF's own vocabulary and chat template: same ids
        self.name = path.stem
        self.random_weights = False
        self.stop_ids = {self.llm.token_eos()}

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def tokens(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None,
               should_stop: Callable[[], bool] | None = None) -> Iterator[int]:
        if seed is not None:
            self.llm.set_seed(seed)
        count = 0
        for token in self.llm.generate(ids, temp=temperature, top_p=top_p, top_k=0, reset=True):
            if token in self.stop_ids:
                return
            yield token
            count += 1
            if count >= max_tokens or (should_stop and should_stop()):
                return

    def chat(self, ids, max_tokens, temperature, top_p, seed, stop, should_stop) -> Iterator[dict]:
        tokens = self.tokens(ids, max_tokens, temperature, top_p, seed, should_stop)
        yield from stream_text(tokens, self.decode, stop, max_tokens, len(ids))
