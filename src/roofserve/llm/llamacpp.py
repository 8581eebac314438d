"""llama.cpp (llama-cpp-python) behind the same API, on the same GGUF: a peer to compare against."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from roofserve.config import LLMConfig
from roofserve.errors import UserError
from roofserve.llm.engine import OneAtATime
from roofserve.llm.generator import Generator
from roofserve.llm.sampling import Sampling


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
        self.batch = OneAtATime(self._generate)

    def _generate(self, ids: list[int], sampling: Sampling, stop_ids: set[int]) -> Iterator[int]:
        if sampling.observe is not None:  # the protocol refuses logprobs for this backend before a request gets here
            raise ValueError("the llamacpp backend does not report logprobs")
        if sampling.seed is not None:
            self.llm.set_seed(sampling.seed)
        self.llm.reset()  # no prefix reuse between requests: every prompt is prefilled, as in our engine
        count = 0
        # min_p and top_k given even when off: llama-cpp-python's defaults (0.05, 40) would filter unasked
        for token in self.llm.generate(ids, temp=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                       min_p=sampling.min_p, reset=True):
            if token in stop_ids:
                return
            yield token
            count += 1
            if count >= sampling.max_new_tokens:
                return
