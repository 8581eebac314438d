"""A gpt-fast-style decode loop over a Hugging Face causal LM at batch size 1:
prefill the prompt, then one compiled token step at a time over a static KV cache.

transformers' `generate` spends most of a small model's token time in Python: logits processors,
stopping criteria, cache bookkeeping. Here the hot step is one forward of shape (1, 1) with a fixed
cache position tensor, which torch.compile turns into one graph (CUDA graphs on GPU).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


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


class Engine:
    def __init__(self, model: torch.nn.Module, max_seq_len: int, static_cache: bool = True, compile: bool = False,
                 attention: str = "auto", prefill_chunk: int = 256):
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.attention = attention
        if attention == "roofserve":
            from roofserve.llm.kernels import use_decode_attention

            use_decode_attention(model)
        elif attention != "auto":
            model.set_attn_implementation(attention)
        self.device = next(model.parameters()).device
        self.max_seq_len = max_seq_len
        self.static_cache = static_cache
        self.compiled = compile
        self.cache = None
        if static_cache:
            from transformers import StaticCache

            self.cache = StaticCache(config=model.config, max_cache_len=max_seq_len)
        self._step = self._steps
        if compile:
            if not static_cache:
                raise ValueError("compile needs the static KV cache (fixed shapes)")
            self._step = compile_step(self)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, cache) -> tuple[torch.Tensor, object]:
        # logits_to_keep=1: the LM head (49152 x 576 for SmolLM2) runs on the last position only
        out = self.model(input_ids=ids, cache=cache, cache_position=positions, use_cache=True, logits_to_keep=1)
        return out.logits, getattr(out, "cache", None) or out.past_key_values

    def _decode_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        # token: (1, 1) int64; position: (1,) int64 -> logits (vocab,)
        logits, _ = self._forward(token, position, self.cache)
        return logits[0, -1]

    def _steps(self, token: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one graph for both paths: greedy reads only the argmax, computed inside the graph
        logits = self._decode_step(token, position)
        return logits, torch.argmax(logits)

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        stop_ids: set[int] = frozenset(),
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids one by one; stops at a stop id (not yielded) or after max_new_tokens."""
        if len(prompt_ids) + sampling.max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({sampling.max_new_tokens}) exceeds {self.max_seq_len}")
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
        ids = torch.tensor([prompt_ids], device=self.device)
        positions = torch.arange(len(prompt_ids), device=self.device)
        if self.cache is not None:
            self.cache.reset()
            cache = self.cache
        else:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
        # the prompt in chunks, as the batch engine prefills: one chunk's attention scores and activations
        # in memory at a time, not a long prompt's (2048 tokens of an 8B model took 2 GB more at once)
        for start in range(0, len(prompt_ids), self.prefill_chunk):
            end = start + self.prefill_chunk
            logits, cache = self._forward(ids[:, start:end], positions[start:end], cache)
        logits = logits[0, -1]
        token = sample(logits.cpu() if generator else logits, sampling, generator)
        position = len(prompt_ids)
        for i in range(sampling.max_new_tokens):
            if token in stop_ids:
                return
            if sampling.observe:
                sampling.observe(logits, token)
            yield token
            if i + 1 == sampling.max_new_tokens or (should_stop and should_stop()):
                return
            token_t = torch.tensor([[token]], device=self.device)
            pos_t = torch.tensor([position], device=self.device)
            if self.cache is not None:
                logits, best = self._step(token_t, pos_t)
                if sampling.greedy:
                    token, position = int(best), position + 1
                    continue
            else:
                step_logits, cache = self._forward(token_t, pos_t, cache)
                logits = step_logits[0, -1]
            token = sample(logits.cpu() if generator else logits, sampling, generator)
            position += 1

    def warm_up(self, prompt_len: int = 16, tokens: int = 8) -> float:
        """Run (and compile) the hot step before serving; returns the seconds it took."""
        start = time.perf_counter()
        for _ in range(2 if self.compiled else 1):
            for temperature in (0.0, 1.0):  # the greedy and the sampling step
                for _ in self.generate([1] * prompt_len, Sampling(tokens, temperature, seed=0)):
                    pass
        return time.perf_counter() - start


def compile_step(engine: Engine):
    """torch.compile the decode step for this device.

    GPU: CUDA graphs ("reduce-overhead"): one launch per token. CPU: inductor with frozen weights
    (oneDNN prepacks them), a C++ wrapper instead of Python around the kernels, the matmul-softmax
    attention (inductor fuses it; SDPA's CPU flash kernel is slow for one query over a long static
    cache), and no guards on module attributes or the cache (neither is replaced while serving).
    """
    import torch._inductor.config as inductor

    # Compiled code is cached per code object, and we skip guards on the model: drop what an earlier
    # engine in this process compiled (with its frozen weights) before compiling for this one.
    torch._dynamo.reset()
    if engine.device.type == "cuda":
        return torch.compile(engine._steps, mode="reduce-overhead", fullgraph=True, dynamic=False)
    inductor.freezing = True
    inductor.cpp_wrapper = True
    if engine.attention == "auto":  # eager for the step (inductor fuses it); prompts see only the filled cache
        from roofserve.llm.kernels import use_prompt_attention

        use_prompt_attention(engine.model)
    options = {"guard_filter_fn": _skip_module_and_cache_guards}
    return torch.compile(engine._steps, fullgraph=True, dynamic=False, options=options)


def _skip_module_and_cache_guards(entries) -> list[bool]:
    # Guards left: the inputs' shapes and dtypes. The weights, the imported functions and the static
    # cache (which lives as long as the engine; reset() zeroes it in place) do not change while serving,
    # and checking them on every call cost a noticeable share of a small model's token on CPU.
    modules = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    globals_ = torch.compiler.skip_guard_on_globals_unsafe(entries)
    return [m and g and not e.name.startswith("self.cache") for m, g, e in zip(modules, globals_, entries)]
