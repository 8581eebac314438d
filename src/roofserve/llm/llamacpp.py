"""llama.cpp (llama-cpp-python) behind the same API, on the same GGUF: a peer to compare against."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from roofserve.config import LLMConfig
from roofserve.errors import UserError
from roofserve.llm.generator import Generator


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


class LlamaCppGenerator(Generator):
    def __init__(self, cfg: LLMConfig):
        from roofserve.llm.model import _load_tokenizer

        path = gguf_path(cfg.model)
        threads = cfg.threads_per_worker or os.cpu_count() or 1
        self.llm = open_llama(cfg.model, cfg.max_seq_len, threads)
        self.tokenizer = _load_tokenizer(path)  # the GGUF's own vocabulary and chat template: same ids
        self.name = path.stem
        self.random_weights = False
        self.stop_ids = {self.llm.token_eos()}

    def tokens(self, ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, ignore_eos: bool = False,
               should_stop: Callable[[], bool] | None = None, observe=None) -> Iterator[int]:
        if observe is not None:  # the protocol refuses logprobs for this backend before a request gets here
            raise ValueError("the llamacpp backend does not report logprobs")
        if seed is not None:
            self.llm.set_seed(seed)
        self.llm.reset()  # no prefix reuse between requests: every prompt is prefilled, as in our engine
        count = 0
        for token in self.llm.generate(ids, temp=temperature, top_p=top_p, top_k=0, reset=True):
            if token in self.stop_ids and not ignore_eos:
                return
            yield token
            count += 1
            if count >= max_tokens or (should_stop and should_stop()):
                return
