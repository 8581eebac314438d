"""The decode engine for Llama-family models, one request or many: sequences decode together, one weight
read per step. One request at a time is this engine at one row (`max_batch_size` 1).

At batch size 1 a decode step reads every weight to make one token; with B sequences in the step the
same read makes B tokens. Sequences join the running batch between steps and leave when they finish,
without waiting for each other.

- The KV cache has one slot per sequence: (slots, kv_heads, max_seq_len, head_dim) per layer. A
  sequence keeps its slot from admission to its end; nothing is copied when others come and go.
- The forward pass is ours (gpt-fast style) over the Hugging Face model's own modules, so quantized
  (torchao), LoRA-wrapped and kernel-swapped linear layers work unchanged. A decode step takes one
  token per row, each at its own position and slot; a prefill chunk takes one sequence's tokens.
- Prefill is chunked: at most `prefill_chunk` prompt tokens run per step, so a newcomer's long prompt
  delays the running sequences by one chunk per step, not by the whole prompt, and a long prompt's
  activations are one chunk's at a time.
- Decode steps run at the rows they have, eager and compiled over packed GGUF weights (one graph for one
  row, one with the row count dynamic for more). Where a compiled step needs fixed row counts (CUDA
  graphs, a dense model's unrolled graph) they run padded to a power-of-two bucket of rows (the spare
  rows write to a scratch slot), a graph per bucket. Every graph is compiled at warm-up.
- The prefill can be compiled too (`compile_prefill`): one graph with dynamic shapes for every chunk
  length, start and slot (eager, a short prompt's hundreds of small ops can cost as much as its matmuls;
  docs/results/2026-11-29-ttft-2-cores.md).
- Attention of a decode step: roofserve's slot kernel (bf16 on CPU) reads only each row's filled
  positions; otherwise the plain matmul-softmax on CPU (SDPA's CPU kernel is slow for one query), SDPA
  on GPU, over the rows' slots with a mask: eager as far as the longest row has reached, compiled
  over the whole slot (fixed shapes).

`OneAtATime` gives the same interface (add, step, cancel) to backends that make one sequence's tokens
at a time from an iterator: llama.cpp and the transformers baseline (llm.baseline).
"""

from __future__ import annotations

import functools
import logging
import time
import types
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from roofserve.config import LLMConfig, inductor_cache
from roofserve.errors import UserError
from roofserve.llm.sampling import Sampling, sample

log = logging.getLogger(__name__)


def buckets(max_batch_size: int) -> list[int]:
    """Row counts a decode step is padded to where its graph needs fixed ones: powers of two up to
    max_batch_size, and max_batch_size."""
    out, b = [], 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    return [*out, max_batch_size]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros; on CPU an anonymous mapping, whose pages the OS backs on first touch: a slot's KV cache takes
    memory as far as its sequences have reached (the slot kernel reads no position past a sequence's end),
    not all max_seq_len tokens of every slot at start."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import math
    import mmap

    return torch.frombuffer(mmap.mmap(-1, math.prod(shape) * dtype.itemsize), dtype=dtype).view(shape)


class SlotModel(torch.nn.Module):
    """A Hugging Face LlamaForCausalLM's modules with a slot-per-sequence KV cache. Slot `slots` (the
    last one) is scratch: padded decode rows write there."""

    def __init__(self, causal_lm: torch.nn.Module, slots: int, max_seq_len: int, kernel_attention: bool):
        super().__init__()
        base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm  # PEFT
        self.lm = base
        config = base.config
        self.layers = base.model.layers
        extra = set(dict(self.layers[0].self_attn.named_children())) - {"q_proj", "k_proj", "v_proj", "o_proj"}
        if extra:  # e.g. Qwen3's q_norm and k_norm: our forward would skip them and answer nonsense
            raise UserError(f"{config.model_type}'s attention has {', '.join(sorted(extra))}, which roofserve's engine "
                            "does not run (it runs Llama-shaped attention): serve it with --no-static-cache "
                            "(transformers' own forward)")
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.scale = self.head_dim ** -0.5
        self.kernel_attention = kernel_attention
        weight = base.model.norm.weight  # the model's dtype and device (the embedding may be packed, llm/gguf.py)
        # the plain matmul-softmax instead of SDPA on CPU: SDPA's CPU kernel is several times slower for one
        # query over a long cache (docs/kernels.md), and inductor fuses the matmul-softmax
        self.matmul_attention = weight.device.type == "cpu"
        shape = (slots + 1, self.kv_heads, max_seq_len, self.head_dim)
        for i in range(len(self.layers)):  # buffers, so that compiled code treats them as state, not constants
            self.register_buffer(f"k{i}", zeros_on_demand(shape, weight.dtype, weight.device), persistent=False)
            self.register_buffer(f"v{i}", zeros_on_demand(shape, weight.dtype, weight.device), persistent=False)
        self.scratch = slots

    def caches(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (b, 1, t, D) of the positions (b, t): once per forward, shared by all layers."""
        cos, sin = self.lm.model.rotary_emb(x, positions)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def _qkv(self, layer, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]):
        # x (b, t, hidden) -> q (b, H, t, D), k and v (b, KV, t, D), rotary applied
        b, t, _ = x.shape
        attn = layer.self_attn
        q = attn.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _mlp_block(self, layer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        x = x + layer.self_attn.o_proj(attn_out)
        h = layer.post_attention_layernorm(x)
        mlp = layer.mlp
        return x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               keys: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row. tokens, positions, slots: (b,) int64 -> logits (b, vocab) fp32 and their argmax (b,).
        keys: the attention reads (and gathers) each row's slot up to there (past every row's position), not
        the whole slot; eager only (an int that changes every step would make a compiled graph per value)."""
        b = tokens.shape[0]
        length = keys or self.k0.shape[2]
        # one row, eager: its slot as a view (a slice), not a gathered copy of every layer's keys and values
        rows = slice(row := int(slots[0]), row + 1) if keys and b == 1 else slots
        x = self.lm.model.embed_tokens(tokens.view(b, 1))
        rotary = self._rotary(x, positions.view(b, 1))
        for i, layer in enumerate(self.layers):
            x = self.decode_layer(layer, *self.caches(i), x, rotary, positions, slots, rows, length)
        logits = self.lm.lm_head(self.lm.model.norm(x))[:, 0].float()
        return logits, torch.argmax(logits, dim=-1)

    def decode_layer(self, layer, kc: torch.Tensor, vc: torch.Tensor, x: torch.Tensor,
                     rotary: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor, slots: torch.Tensor,
                     rows: slice | torch.Tensor, length: int) -> torch.Tensor:
        """One decoder layer of decode(): x (b, 1, hidden) -> (b, 1, hidden), the layer's cache written."""
        b = x.shape[0]
        q, k, v = self._qkv(layer, layer.input_layernorm(x), rotary)
        kc[slots, :, positions] = k[:, :, 0]  # each row's new entry at its own slot and position
        vc[slots, :, positions] = v[:, :, 0]
        if self.kernel_attention:
            out = torch.ops.roofserve.slot_attention(q, kc, vc, slots, positions, self.scale)  # (b, 1, H, D)
        elif self.matmul_attention:
            out = self._one_query_attention(q, kc[rows, :, :length], vc[rows, :, :length], positions)
        else:
            mask = (torch.arange(length, device=kc.device)[None, :] <= positions[:, None]).view(b, 1, 1, -1)
            out = F.scaled_dot_product_attention(q, kc[rows, :, :length], vc[rows, :, :length], attn_mask=mask,
                                                 scale=self.scale, enable_gqa=True).transpose(1, 2)
        return self._mlp_block(layer, x, out.reshape(b, 1, -1))

    def _one_query_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             positions: torch.Tensor) -> torch.Tensor:
        """q (b, H, 1, D) over each row's slot k, v (b, KV, S, D), keys up to its position -> (b, 1, H, D)."""
        b, kv, length, d = k.shape
        q = q.view(b, kv, self.heads // kv, d)  # the query heads of each KV head together: no copy of k or v
        scores = (q @ k.transpose(-1, -2)).float() * self.scale  # (b, KV, group, S)
        keys = torch.arange(length, device=k.device)
        scores = scores.masked_fill((keys[None, :] > positions[:, None]).view(b, 1, 1, length), float("-inf"))
        out = torch.softmax(scores, dim=-1).to(v.dtype) @ v  # (b, KV, group, D)
        return out.view(b, 1, self.heads, d)

    def prefill(self, tokens: torch.Tensor, start: int, slot: int | torch.Tensor, layer_step=None) -> torch.Tensor:
        """A chunk of one sequence's prompt: tokens (t,) at positions start.. in `slot` -> the last
        position's logits (vocab,) fp32 (the LM head runs on that position only). The slot is an int or
        a (1,) tensor (the compiled prefill's: torch.compile specializes an int index to its value).
        layer_step: what runs each layer, prefill_layer unless given (compiled, compile_prefill_step)."""
        t = tokens.shape[0]
        index = slot if isinstance(slot, torch.Tensor) else torch.tensor([slot], device=tokens.device)
        x = self.lm.model.embed_tokens(tokens.view(1, t))
        pos = torch.arange(start, start + t, device=tokens.device).view(1, t)
        end = start + t
        causal = torch.arange(end, device=tokens.device)[None, :] <= pos.view(t, 1)  # (t, end)
        rotary = self._rotary(x, pos)
        for i, layer in enumerate(self.layers):
            x = (layer_step or self.prefill_layer)(layer, *self.caches(i), x, rotary, pos, index, causal)
        return self.lm.lm_head(self.lm.model.norm(x[:, -1]))[0].float()

    def prefill_layer(self, layer, kc: torch.Tensor, vc: torch.Tensor, x: torch.Tensor,
                      rotary: tuple[torch.Tensor, torch.Tensor], pos: torch.Tensor, index: torch.Tensor,
                      causal: torch.Tensor) -> torch.Tensor:
        """One decoder layer of prefill(): x (1, t, hidden) -> (1, t, hidden), the chunk's keys and values
        written to the slot `index` (1,) at positions pos (1, t); causal (t, end) masks the keys."""
        t, end = causal.shape
        q, k, v = self._qkv(layer, layer.input_layernorm(x), rotary)
        kc[index, :, pos[0]] = k[0].transpose(0, 1)  # (t, kv_heads, head_dim) at the slot's positions
        vc[index, :, pos[0]] = v[0].transpose(0, 1)
        out = F.scaled_dot_product_attention(q, kc[index, :, :end], vc[index, :, :end], attn_mask=causal,
                                             scale=self.scale, enable_gqa=True)
        return self._mlp_block(layer, x, out.transpose(1, 2).reshape(1, t, -1))

    def prefill_shifted(self, tokens: torch.Tensor, start2: int, slot: torch.Tensor,
                        layer_step=None) -> torch.Tensor:
        """prefill(tokens, start2 - 2, slot, layer_step), for compiling with dynamic shapes: torch.compile
        specializes an int argument of 0 or 1 to a constant, and every prompt starts at 0 (a graph for the
        first chunk, another for the rest); shifted by 2, one graph serves them all."""
        return self.prefill(tokens, start2 - 2, slot, layer_step)


@dataclass
class Sequence:
    id: Hashable
    prompt: list[int]
    sampling: Sampling
    stop_ids: set[int]
    generator: torch.Generator | None = None
    slot: int | None = None
    filled: int = 0  # prompt tokens in the cache
    token: int | None = None  # the last token made, not yet in the cache
    generated: int = 0


class Engine:
    """Admit sequences with `add`, advance all of them with `step`; `cancel` drops one at once."""

    def __init__(self, model: torch.nn.Module, cfg: LLMConfig):
        """The engine `cfg` asks for (validated, its auto values resolved): max_batch_size slots of
        max_seq_len tokens, prompts prefilled prefill_chunk tokens at a time, compile / compile_prefill,
        and attention "roofserve" for our decode kernel."""
        self.max_batch_size, self.max_seq_len = cfg.max_batch_size, cfg.max_seq_len
        self.prefill_chunk = cfg.prefill_chunk
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, not {self.max_batch_size} (validate the config first)")
        self.slots = SlotModel(model, self.max_batch_size, self.max_seq_len, cfg.attention == "roofserve").eval()
        self.device = next(model.parameters()).device
        self.free = list(range(self.max_batch_size))
        self.waiting: deque[Sequence] = deque()
        self.running: dict[Hashable, Sequence] = {}
        self.compiled = cfg.compile
        # the row counts a decode step runs at: any, unless its compiled graphs are fixed (compile_decode)
        fixed = cfg.compile and not _packed(self.slots)
        self.buckets = buckets(self.max_batch_size) if fixed else list(range(1, self.max_batch_size + 1))
        # inductor does not cache graphs with frozen weights (_compile): they compile anew at every start
        self.compile_cached = not (_frozen(self.slots) and (cfg.compile or cfg.compile_prefill))
        self.last_batch_size = 0
        self._decode = compile_decode(self.slots) if cfg.compile else self.slots.decode
        # chunks shorter than this prefill eagerly: a 1-token one would be specialized by torch.compile
        # (another graph), and where our GEMM kernel takes only some chunk lengths (GemvLinear's max_rows),
        # those below it would take another branch (another graph)
        max_rows = max((getattr(m, "max_rows", 1) for m in model.modules()), default=1)
        self.compiled_prefill_min = 2 if max_rows >= self.prefill_chunk else max_rows + 1
        self._compiled_prefill = compile_prefill_step(self.slots) if cfg.compile_prefill else None

    # --- admission ----------------------------------------------------------------------------
    def add(self, seq_id: Hashable, prompt_ids: list[int], sampling: Sampling,
            stop_ids: set[int] = frozenset()) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) + sampling.max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({sampling.max_new_tokens}) "
                             f"exceeds {self.max_seq_len}")
        generator = torch.Generator(device="cpu").manual_seed(sampling.seed) if sampling.seed is not None else None
        sampling.start(prompt_ids)
        self.waiting.append(Sequence(seq_id, list(prompt_ids), sampling, set(stop_ids), generator))

    def cancel(self, seq_id: Hashable) -> None:
        """Drop a sequence (its client left, a stop string matched, its deadline passed): its slot is free
        for the next step; the others are untouched."""
        seq = self.running.pop(seq_id, None)
        if seq is not None:
            self.free.append(seq.slot)
        else:
            self.waiting = deque(s for s in self.waiting if s.id != seq_id)

    def admit(self) -> None:
        """Give waiting sequences the free slots, first come first served."""
        while self.waiting and self.free:
            seq = self.waiting.popleft()
            seq.slot = self.free.pop(0)
            self.running[seq.id] = seq

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # --- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[Hashable, int | None]]:
        """Advance every sequence by one token (and one prefill chunk, if one is prefilling). Returns
        (id, token) for each new token and (id, None) for each sequence that finished in this step
        (a stop id, which is not returned, or max_new_tokens reached)."""
        self.admit()
        events: list[tuple[Hashable, int | None]] = []
        decoding = [s for s in self.running.values() if s.token is not None]
        prefilling = next((s for s in self.running.values() if s.token is None), None)
        if prefilling is not None:
            self._prefill_chunk(prefilling, events)
        if decoding:
            self._decode_rows(decoding, events)
        self.last_batch_size = len(decoding)
        return events

    def _prefill_chunk(self, seq: Sequence, events: list) -> None:
        end = min(len(seq.prompt), seq.filled + self.prefill_chunk)
        chunk = torch.tensor(seq.prompt[seq.filled:end], device=self.device)
        if self._compiled_prefill is not None and len(chunk) >= self.compiled_prefill_min:
            logits = self._compiled_prefill(chunk, seq.filled + 2, torch.tensor([seq.slot], device=self.device))
        else:
            logits = self.slots.prefill(chunk, seq.filled, seq.slot)
        seq.filled = end
        if end == len(seq.prompt):
            self._emit(seq, sample(logits.cpu() if seq.generator else logits, seq.sampling, seq.generator), events,
                       logits)

    def _decode_rows(self, rows: list[Sequence], events: list) -> None:
        n = len(rows)
        size = next(b for b in self.buckets if b >= n)
        pad = size - n
        tokens = torch.tensor([s.token for s in rows] + [0] * pad, device=self.device)
        positions = torch.tensor([len(s.prompt) + s.generated - 1 for s in rows] + [0] * pad, device=self.device)
        slots = torch.tensor([s.slot for s in rows] + [self.slots.scratch] * pad, device=self.device)
        if self.compiled:
            logits, best = self._decode(tokens, positions, slots)
        else:  # the attention reads the slots only as far as the longest row has reached
            logits, best = self._decode(tokens, positions, slots, max(len(s.prompt) + s.generated for s in rows))
        best = best.tolist()
        for i, seq in enumerate(rows):
            if seq.sampling.greedy and not seq.sampling.penalized:
                token = best[i]
            else:
                token = sample(logits[i].cpu() if seq.generator else logits[i], seq.sampling, seq.generator)
            self._emit(seq, token, events, logits[i])

    def _emit(self, seq: Sequence, token: int, events: list, logits: torch.Tensor) -> None:
        if token in seq.stop_ids:
            events.append((seq.id, None))
            self.cancel(seq.id)
            return
        if seq.sampling.observe:
            seq.sampling.observe(logits, token)
        seq.token = token
        seq.generated += 1
        events.append((seq.id, token))
        if seq.generated >= seq.sampling.max_new_tokens:
            events.append((seq.id, None))
            self.cancel(seq.id)

    @torch.inference_mode()
    def warm_up(self, prompt_len: int = 16) -> float:
        """Run (and compile) the decode step at every power-of-two row count (a graph each where they are fixed;
        where the rows are dynamic, the graph of 2 rows serves the others), and a prefill; returns the seconds.
        The decode steps run on the scratch slot, so they leave no trace in the others. (Serving
        sequences would not fill the buckets: one prefills per step, so a warm-up batch leaves before
        the others join; a bucket first met while serving would compile then, for a minute.)"""
        start = time.perf_counter()
        scratch = self.slots.scratch
        sizes = buckets(self.max_batch_size)  # where the rows are dynamic, 1 and 2 compile, the others reuse 2's
        if self.compiled:
            log.info("compiling the decode step for %s rows: minutes on a small CPU %s",
                     sizes if self.buckets == sizes else f"1 and 2-{sizes[-1]}",
                     "the first time, seconds once inductor's cache holds them" if self.compile_cached
                     else "at every start (graphs with frozen weights are not cached)")
        for i, size in enumerate(sizes, 1):
            for _ in range(2):  # three distinct tensors, as in serving (dynamo guards on aliasing too)
                tokens, positions = (torch.zeros(size, dtype=torch.long, device=self.device) for _ in range(2))
                self._decode(tokens, positions, torch.full((size,), scratch, device=self.device))
            if self.compiled:
                log.info("decode step for %d row%s ready (%d of %d, %.0f s so far)", size, "s" if size > 1 else "",
                         i, len(sizes), time.perf_counter() - start)
        if self._compiled_prefill is not None:
            log.info("compiling the prefill step")
            # a chunk length unlike the start: torch.compile gives equal ints one symbol (a guard that
            # they stay equal), which the next prompt would break, compiling again while serving; and a
            # second length, for a prefill compiled per layer (compile_prefill_step)
            length = max(self.compiled_prefill_min, prompt_len, 6)
            slot = torch.tensor([scratch], device=self.device)
            for n in (length, length + 1):
                self._compiled_prefill(torch.ones(n, dtype=torch.long, device=self.device), 3 + 2, slot)
        self.add(("warm-up",), [1] * prompt_len, Sampling(2, 0.0))
        while self.has_work():
            self.step()
        return time.perf_counter() - start


def compile_decode(model: SlotModel):
    """torch.compile the decode step: one graph per bucket of rows (dynamic=False); CUDA graphs on GPU.
    With packed weights (see _packed) each layer is a nested compile region, traced and compiled once,
    called by every layer inside the graph (a layer of another format, as Q4_K_M's Q6_K ones, traces to a
    region of its own), and the row count is left to torch.compile's automatic dynamic shapes: a graph for
    one row, and at the second row count one for every count from 2 up, so steps need no padding (the
    bucketed graphs and it stepped alike, docs/results/2026-12-08-steps-and-llama-cpp-xeon-2-cores.md)."""
    if _packed(model):
        model.decode_layer = types.MethodType(torch.compiler.nested_compile_region(SlotModel.decode_layer), model)
        return _compile(model, model.decode, dynamic=None)
    return _compile(model, model.decode, dynamic=False)


def compile_prefill_step(model: SlotModel):
    """torch.compile the prefill of a chunk: one graph with dynamic shapes (chunk length, start, slot);
    no CUDA graphs on GPU (the shapes vary). Compiling takes minutes on a small CPU. With packed weights
    one layer's prefill is compiled instead and run for every layer, its weights as inputs: torch 2.14's
    nested regions fail on the slot slicing with a dynamic length. Its sizes are made dynamic where they
    change (warm_up's second chunk), not all at once: dynamic=True would give the weights' sizes symbols,
    which a chunk length equal to one of them would share ("duck sizing") and specialize with."""
    if _packed(model):  # the eager prefill (chunks below compiled_prefill_min) keeps the eager layer
        step = _compile(model, model.prefill_layer, dynamic=None, guard_modules=True)
        return functools.partial(model.prefill_shifted, layer_step=step)
    return _compile(model, model.prefill_shifted, dynamic=True)


def _packed(model: SlotModel) -> bool:
    """On CPU, layers without a dense weight matrix (GGUF weights packed: every matmul is our kernel), where
    freezing has nothing to prepack for oneDNN, and a graph of every layer unrolled took minutes per bucket
    of rows on 2 cores for 16 layers (an 8B model's 32 had not compiled in 11 minutes)."""
    return next(model.parameters()).device.type == "cpu" and not any(p.dim() == 2 for p in model.layers.parameters())


def _frozen(model: SlotModel) -> bool:
    """Compiled with frozen weights (_compile): dense weights on CPU. Inductor caches no such graph (the
    weights are constants in it), so a start compiles them again; without freezing they were cached but
    stepped slower (docs/results/2026-12-08-steps-and-llama-cpp-xeon-2-cores.md)."""
    return next(model.parameters()).device.type == "cpu" and not _packed(model)


def _compile(model: SlotModel, forward, dynamic: bool | None, guard_modules: bool = False):
    """One of the model's forwards compiled: inductor with frozen weights (oneDNN's prepacked matmuls) and
    a C++ wrapper on CPU, guards only on the inputs (the weights and the cache buffers do not change while
    serving); for packed weights neither freezing nor the C++ wrapper, which cannot call a nested region
    (torch 2.14). guard_modules: keep the guards on modules, for a function of one layer, which tell one
    layer's format from another's. It first drops what an earlier engine in this process compiled: with
    the module guards skipped, its graphs (and their frozen weights) would serve this engine too. Compiling
    is lazy, so the decode step and the prefill of one engine can be set up one after the other."""
    import torch._inductor.config as inductor

    inductor_cache()
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    if next(model.parameters()).device.type == "cuda":
        return torch.compile(forward, mode=None if dynamic else "reduce-overhead", fullgraph=True, dynamic=dynamic)
    inductor.freezing = inductor.cpp_wrapper = _frozen(model)
    options = {} if guard_modules else {"guard_filter_fn": _skip_module_and_cache_guards}
    return torch.compile(forward, fullgraph=True, dynamic=dynamic, options=options)


def _skip_module_and_cache_guards(entries) -> list[bool]:
    # Guards left: the inputs' shapes and dtypes. The weights, the imported functions and the cache buffers
    # do not change while serving, and checking them on every call cost a noticeable share of a small
    # model's token on CPU.
    modules = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    globals_ = torch.compiler.skip_guard_on_globals_unsafe(entries)
    return [m and g for m, g in zip(modules, globals_)]


@dataclass
class _Running:
    id: Hashable
    tokens: Iterator[int]
    max_new_tokens: int
    generated: int = 0


class OneAtATime:
    """Engine's interface (add, step, cancel, has_work) over a backend that makes one sequence's tokens at a
    time: `generate(prompt_ids, sampling, stop_ids)` yields them (ending at a stop id or max_new_tokens).
    The first sequence added runs; the others wait. A step makes one token."""

    def __init__(self, generate: Callable[[list[int], Sampling, set[int]], Iterator[int]]):
        self.generate = generate
        self.waiting: deque[tuple] = deque()
        self.running: dict[Hashable, _Running] = {}
        self.last_batch_size = 0

    def add(self, seq_id: Hashable, prompt_ids: list[int], sampling: Sampling,
            stop_ids: set[int] = frozenset()) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        self.waiting.append((seq_id, list(prompt_ids), sampling, set(stop_ids)))

    def cancel(self, seq_id: Hashable) -> None:
        seq = self.running.pop(seq_id, None)
        if seq is not None:
            seq.tokens.close()
        else:
            self.waiting = deque(w for w in self.waiting if w[0] != seq_id)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def step(self) -> list[tuple[Hashable, int | None]]:
        """(id, token) for the running sequence's next token, and (id, None) when it has finished."""
        self.last_batch_size = 0
        if not self.running:
            if not self.waiting:
                return []
            seq_id, prompt, sampling, stop_ids = self.waiting.popleft()
            self.running[seq_id] = _Running(seq_id, self.generate(prompt, sampling, stop_ids), sampling.max_new_tokens)
        seq = next(iter(self.running.values()))
        token = next(seq.tokens, None)
        if token is None:
            self.cancel(seq.id)
            return [(seq.id, None)]
        seq.generated += 1
        self.last_batch_size = 1
        if seq.generated < seq.max_new_tokens:
            return [(seq.id, token)]
        self.cancel(seq.id)
        return [(seq.id, token), (seq.id, None)]
