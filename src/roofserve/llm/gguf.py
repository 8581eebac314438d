"""GGUF weights served as they are stored: 4- and 8-bit blocks repacked once, at load, for our kernel.

`--gguf-weights packed` reads each tensor of a Llama-family .gguf file, turns its blocks into the layout
`roofserve::gemm_quant` streams (kernels.cpp: w = d * u + m per block of 32, u unsigned, grouped for
AVX512-VNNI) and drops the file's bytes: one copy of the weights, about the file's size, and no fp32
folder. Formats and what they become:
- Q4_0, Q8_0: the same bytes per weight (4.5, 8.5 bits); d as stored, m = -8d or -128d.
- Q4_1: 5 bits per weight, as stored (an fp16 minimum per block of 32).
- Q4_K: its own scales (a 6-bit scale and minimum per 32 weights, fp16 d and dmin per 256), each held in
  a byte: 4.625 bits per weight where the file has 4.5.
- Q6_K (the 6-bit tensors of a Q4_K_M file): its own scales (an int8 scale per 16 weights, fp16 d per
  256), 6.5625 bits per weight as in the file.
- other quantized types (Q5_* and the rest, through gguf-py's reference dequantization): requantized to 8
  bits per weight (8.5 bits; each weight moves by at most 1/254 of its block's largest magnitude).
- F32, F16, BF16 matrices: dense weights in the model's precision (torch's matmul).
The token embedding stays packed too; a lookup dequantizes only the rows it needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from roofserve.errors import UserError

log = logging.getLogger(__name__)

QK = 32  # weights per block of our layout
ROWS_PER_CHUNK = 4096  # rows decoded at once (bounds the temporary float copies of a big tensor)

# GGUF tensor names (llama.cpp's "llama" architecture) -> transformers' LlamaForCausalLM names
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass
class Packed:
    """One weight matrix (N x K) in gemm_quant's layout: w = d * u + m per block of 32."""

    u: torch.Tensor  # (N/16, K/32, bits * 64) uint8
    d: torch.Tensor  # (N/16, K/32, 16) fp16; Q4_K: (N/16, K/256, 2, 16) fp16, super-block d and dmin
    m: torch.Tensor  # like d, or empty (m = mfac * d); Q4_K: (N/16, K/32, 2, 16) uint8, 6-bit scales and minimums
    bits: int
    mfac: float
    source: str  # the GGUF type it came from, e.g. "Q4_K"

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.shape[0] * 16, self.u.shape[1] * QK

    @property
    def input_group(self) -> int:
        """How many k share one scale of the kernel's int8 inputs: 256 for Q6_K (llama.cpp's Q8_K inputs),
        32 for the rest (its Q8_0)."""
        return 256 if self.m.dtype == torch.int8 else QK

    @property
    def nbytes(self) -> int:
        return self.u.numel() + 2 * self.d.numel() + self.m.element_size() * self.m.numel()


def pack8(u: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit u (N, K) and d (N, K/32) -> the layout of kernels.cpp (see its comment), for the types that
    pack_gguf does not decode itself."""
    n, k = u.shape
    blocks = k // QK
    out = u.reshape(n // 16, 16, blocks, 8, 4).transpose(0, 2, 3, 1, 4)  # -> (N/16, B, 8 j, 16 c, 4 t)
    out = np.ascontiguousarray(out, dtype=np.uint8).reshape(n // 16, blocks, 8 * 64)
    return out, np.ascontiguousarray(d.reshape(n // 16, 16, blocks).transpose(0, 2, 1), dtype=np.float16)


def _requantize8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 (N, K) -> 8-bit blocks of 32: d = max |w| / 127, u = round(w / d) + 128."""
    blocks = w.reshape(w.shape[0], -1, QK)
    d = np.abs(blocks).max(axis=-1) / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.rint(blocks * inv[..., None]).clip(-127, 127).astype(np.int16) + 128
    return q.astype(np.uint8).reshape(w.shape), d


def requantize(raw: np.ndarray, kind: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a type pack_gguf does not decode (Q5_*, Q2_K, ...) -> 8-bit u (N, K) and d (N, K/32), through
    gguf-py's reference dequantization."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    w = dequantize(raw, GGMLQuantizationType[kind]).reshape(raw.shape[0], k).astype(np.float32)
    return _requantize8(w)


DENSE = ("F32", "F16", "BF16")
NATIVE = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q4_K": 3, "Q6_K": 4}  # the types kernels.cpp's pack_gguf decodes
FOUR_BITS = ("Q4_0", "Q4_1", "Q4_K")
WITH_MIN = ("Q4_1",)


def empty_packed(kind: str, n: int, k: int) -> Packed:
    """The packed tensors of an N x K matrix of `kind`, to be filled."""
    bits = 4 if kind in FOUR_BITS else 6 if kind == "Q6_K" else 8
    u = torch.empty((n // 16, k // QK, bits * 64), dtype=torch.uint8)
    if kind == "Q6_K":  # d per 256 weights, an int8 scale per half-block of 16
        d = torch.empty((n // 16, k // 256, 16), dtype=torch.float16)
        m = torch.empty((n // 16, k // QK, 2, 16), dtype=torch.int8)
        return Packed(u, d, m, 6, 0.0, kind)
    if kind == "Q4_K":
        d = torch.empty((n // 16, k // 256, 2, 16), dtype=torch.float16)
        m = torch.empty((n // 16, k // QK, 2, 16), dtype=torch.uint8)
        return Packed(u, d, m, 4, 0.0, kind)
    d = torch.empty((n // 16, k // QK, 16), dtype=torch.float16)
    m = torch.empty_like(d) if kind in WITH_MIN else torch.empty(0, dtype=torch.float16)
    return Packed(u, d, m, bits, 0.0 if kind in WITH_MIN else (-8.0 if bits == 4 else -128.0), kind)


def pack_rows(raw: np.ndarray, kind: str, k: int, into: Packed, row: int) -> None:
    """Rows [row, row + len(raw)) of a matrix (GGUF blocks, a multiple of 16 rows) into `into`."""
    s = slice(row // 16, (row + raw.shape[0]) // 16)
    m = into.m[s] if into.m.numel() else into.m
    if kind in NATIVE:
        torch.ops.roofserve.pack_gguf(torch.from_numpy(np.ascontiguousarray(raw)), NATIVE[kind], k, into.u[s],
                                      into.d[s], m)
        return
    pu, pd = pack8(*requantize(raw, kind, k))
    into.u[s] = torch.from_numpy(pu)
    into.d[s] = torch.from_numpy(pd)


def _check_shape(kind: str, n: int, k: int) -> None:
    if n % 16 or k % QK:
        raise UserError(f"a {n}x{k} {kind} matrix does not fit the packed layout (rows a multiple of 16, "
                        "columns of 32); load it with --gguf-weights bf16")


def _unpermute(raw: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's converter's rotary reordering of Q and K rows (as transformers does)."""
    n = raw.shape[0]
    return raw.reshape(heads, n // heads // 2, 2, -1).swapaxes(2, 1).reshape(n, -1)


def pack_tensor(raw: np.ndarray, kind: str, shape: tuple[int, int], permute: int | None = None) -> Packed:
    """A GGUF matrix's raw bytes (N rows) -> Packed; permute: the head count of a Q or K matrix."""
    n, k = shape
    _check_shape(kind, n, k)
    raw = raw.reshape(n, -1)
    if permute:
        raw = _unpermute(raw, permute)
    out = empty_packed(kind, n, k)
    for row in range(0, n, ROWS_PER_CHUNK):
        pack_rows(raw[row:row + ROWS_PER_CHUNK], kind, k, out, row)
    return out


def _row_chunks(path: Path, offset: int, nbytes: int, n: int):
    """(first row, raw bytes of up to ROWS_PER_CHUNK rows) of an n-row tensor in a file, by file reads, not a
    memory map, whose pages would count as this process's memory next to the copy being built."""
    row_bytes = nbytes // n
    with open(path, "rb") as f:
        f.seek(offset)
        for row in range(0, n, ROWS_PER_CHUNK):
            rows = min(ROWS_PER_CHUNK, n - row)
            yield row, np.fromfile(f, np.uint8, rows * row_bytes).reshape(rows, row_bytes)


def pack_from_file(path: Path, offset: int, nbytes: int, kind: str, shape: tuple[int, int],
                   permute: int | None = None) -> Packed:
    """pack_tensor of a tensor in a file, read a chunk of rows at a time (_row_chunks)."""
    n, k = shape
    _check_shape(kind, n, k)
    if permute:  # Q and K matrices are small: whole
        return pack_tensor(np.fromfile(path, np.uint8, nbytes, offset=offset), kind, shape, permute)
    out = empty_packed(kind, n, k)
    for row, raw in _row_chunks(path, offset, nbytes, n):
        pack_rows(raw, kind, k, out, row)
    return out


def dense_from_file(path: Path, offset: int, nbytes: int, kind: str, shape: tuple[int, int], dtype: torch.dtype,
                    permute: int | None = None) -> torch.Tensor:
    """An F32 / F16 / BF16 matrix of a file in `dtype`, read a chunk of rows at a time into its one copy: no
    fp32 copy of the whole matrix next to it (a 1B model's bf16 embedding would pass through 1 GB of fp32)."""
    n, k = shape
    w = torch.empty((n, k), dtype=dtype)
    for row, raw in _row_chunks(path, offset, nbytes, n):
        if kind == "BF16":
            chunk = torch.from_numpy(raw.reshape(-1).view(np.int16)).view(torch.bfloat16)
        else:
            chunk = torch.from_numpy(raw.reshape(-1).view(np.float16 if kind == "F16" else np.float32))
        w[row:row + len(raw)] = chunk.reshape(len(raw), k)
    if permute:  # llama.cpp's rotary reordering of Q and K rows undone, as _unpermute does
        w = w.reshape(permute, n // permute // 2, 2, k).transpose(1, 2).reshape(n, k)
    return w


def dequantize_packed(p: Packed, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 weights (rows: only those rows) back from the packed layout."""
    nb, blocks, _ = p.u.shape
    rows = torch.arange(nb * 16) if rows is None else rows
    cb, c = rows // 16, rows % 16
    if p.bits == 8:
        u = p.u.view(nb, blocks, 8, 16, 4)[cb, :, :, c, :].reshape(len(rows), blocks, QK)
    else:
        v = p.u[..., :256].reshape(nb, blocks, 4, 16, 4)[cb, :, :, c, :].reshape(len(rows), blocks, 16)
        u = torch.cat([v & 0xF, v >> 4], dim=-1)
    if p.bits == 6:  # the high 2 bits: vector h's bits 2i..2i+1 belong to k = 4 (4h + i) ..
        h = p.u[..., 256:].reshape(nb, blocks, 2, 16, 4)[cb, :, :, c, :]  # (rows, blocks, 2 h, 4 t)
        high = torch.stack([(h >> (2 * i)) & 3 for i in range(4)], dim=-2)  # (rows, blocks, 2 h, 4 i, 4 t)
        u = u | (high.reshape(len(rows), blocks, QK) << 4)
        sup = p.d[cb, :, c].float().repeat_interleave(8, dim=1)  # (rows, blocks)
        scale = p.m[cb, :, :, c].float().repeat_interleave(16, dim=-1)  # (rows, blocks, 32)
        w = sup[..., None] * scale * (u.float() - 32)
        return w.reshape(len(rows), blocks * QK)
    if p.m.dtype == torch.uint8:  # Q4_K: super-block d, dmin times each block's 6-bit scale, minimum
        sup = p.d[cb, :, :, c].float().repeat_interleave(8, dim=1)  # (rows, blocks, 2)
        sub = p.m[cb, :, :, c].float()
        d, m = sup[..., 0] * sub[..., 0], -sup[..., 1] * sub[..., 1]
    else:
        d = p.d[cb, :, c].float()
        m = p.m[cb, :, c].float() if p.m.numel() else p.mfac * d
    return (u.float() * d[..., None] + m[..., None]).reshape(len(rows), blocks * QK)


class QuantLinear(torch.nn.Module):
    """A bias-free linear layer over packed weights: every call goes to roofserve::gemm_quant."""

    def __init__(self, p: Packed):
        super().__init__()
        self.out_features, self.in_features = p.shape
        self.bits, self.mfac, self.source = p.bits, p.mfac, p.source
        self.register_buffer("u", p.u, persistent=False)
        self.register_buffer("d", p.d, persistent=False)
        self.register_buffer("m", p.m, persistent=False)

    def packed(self) -> Packed:
        return Packed(self.u, self.d, self.m, self.bits, self.mfac, self.source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.roofserve.gemm_quant(x, self.u, self.d, self.m, self.bits, self.mfac)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.source} as {self.bits}-bit"


class QuantEmbedding(torch.nn.Module):
    """The token embedding over packed weights (shared with a tied LM head): a lookup dequantizes its rows."""

    def __init__(self, linear: QuantLinear, dtype: torch.dtype):
        super().__init__()
        self.table = linear  # a module reference: tied, not copied
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize_packed(self.table.packed(), ids.reshape(-1))
        return rows.to(self.dtype).view(*ids.shape, -1)


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: row length first
    kind: str  # GGUF type name, e.g. "Q4_K"
    offset: int  # from the file's start
    nbytes: int


def read_header(path: Path) -> tuple[dict, dict[str, TensorInfo]]:
    """A GGUF file's metadata (arrays left out: the tokenizer's 100k+ strings) and tensor table, read in a
    fraction of a second where gguf-py's reader builds a numpy view per field (seconds for a 128k vocab)."""
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f:
        data = f.read(1 << 20)
        pos = 0

        def take(fmt: str):
            nonlocal data, pos
            size = struct.calcsize("<" + fmt)
            while pos + size > len(data):  # the header runs past what was read: read more
                more = f.read(max(1 << 20, size))
                if not more:
                    raise ValueError("the file ends inside its header")
                data += more
            got = struct.unpack_from("<" + fmt, data, pos)
            pos += size
            return got[0] if len(got) == 1 else got

        def string() -> str:
            n = take("Q")
            return take(f"{n}s").decode("utf-8", errors="replace")

        def value(vtype: int):
            if vtype == 8:
                return string()
            if vtype == 9:
                item, count = take("I"), take("Q")
                if item in scalars and item != 8:
                    take(f"{count}{scalars[item]}")  # skipped
                else:
                    for _ in range(count):
                        value(item)
                return None
            return take(scalars[vtype])

        if data[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        pos = 4
        version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
        if version < 2:
            raise ValueError(f"GGUF version {version}")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = tuple(take("Q") for _ in range(take("I")))
            kind, offset = take("I"), take("Q")
            infos.append((name, dims, kind, offset))
    align = int(meta.get("general.alignment") or 32)
    start = (pos + align - 1) // align * align
    tensors = {}
    for name, dims, kind, offset in infos:
        qtype = GGMLQuantizationType(kind)
        block, size = GGML_QUANT_SIZES[qtype]
        count = 1
        for d in dims:
            count *= d
        tensors[name] = TensorInfo(name, dims, qtype.name, start + offset, count // block * size)
    return meta, tensors


# any other quantized type: 272 (8 bits)
PACKED_BYTES_PER_256 = {"Q4_0": 144, "Q4_1": 160, "Q4_K": 148, "Q6_K": 210, "Q8_0": 272}


def packed_bytes(tensors: dict[str, TensorInfo], dense_bytes: int = 2) -> int:
    """What load_packed will hold for these tensors: packed blocks, and F32/F16/BF16 ones at dense_bytes
    per weight (the model's precision)."""
    total = 0
    for t in tensors.values():
        n = 1
        for d in t.shape:
            n *= d
        total += n * dense_bytes if t.kind in DENSE else n * PACKED_BYTES_PER_256.get(t.kind, 272) // 256
    return total


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def llama_config(meta: dict, tensors: dict[str, TensorInfo]):
    """transformers' LlamaConfig from a llama-architecture GGUF's metadata."""
    from transformers import LlamaConfig

    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"architecture {arch!r}: --gguf-weights packed reads Llama-family files only "
                        "(use --gguf-weights bf16)")

    def key(name, default=None):
        return meta.get(f"llama.{name}", default)

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    vocab = key("vocab_size") or tensors["token_embd.weight"].shape[1]
    rope = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))}
    return LlamaConfig(
        hidden_size=hidden, intermediate_size=key("feed_forward_length"), num_hidden_layers=key("block_count"),
        num_attention_heads=heads, num_key_value_heads=key("attention.head_count_kv", heads),
        head_dim=key("attention.key_length") or hidden // heads, vocab_size=vocab,
        max_position_embeddings=key("context_length", 2048), rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5),
        rope_parameters=rope, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"), pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        tie_word_embeddings="output.weight" not in tensors)


@dataclass
class MemoryPlan:
    """What a packed GGUF model holds in memory, by source format, and its KV cache per sequence."""

    weight_bytes: dict[str, int]
    dense_bytes: int
    kv_bytes_per_slot: int
    max_seq_len: int
    sequences: int = 1  # the engine's KV slots (max_batch_size; its scratch slot takes a page)

    def lines(self) -> list[str]:
        gb = 1e9
        parts = [f"{kind} {n / gb:.2f} GB" for kind, n in sorted(self.weight_bytes.items())]
        parts.append(f"dense {self.dense_bytes / gb:.2f} GB")
        total = sum(self.weight_bytes.values()) + self.dense_bytes
        plural = "s" if self.sequences != 1 else ""
        # the slots' pages are backed as they are written (engine.zeros_on_demand)
        return [f"weights {total / gb:.2f} GB ({', '.join(parts)})",
                f"KV cache {self.kv_bytes_per_slot / gb:.3f} GB per sequence of {self.max_seq_len} tokens, "
                f"{self.sequences} sequence{plural}: up to {self.sequences * self.kv_bytes_per_slot / gb:.2f} GB, "
                "held as they fill it"]


def kv_bytes_per_slot(config, max_seq_len: int, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * max_seq_len * dtype.itemsize


def _dense(raw: np.ndarray, kind: str) -> np.ndarray:
    """F32 / F16 / BF16 bytes -> fp32 (any other type through gguf-py's reference dequantization)."""
    if kind == "F32":
        return raw.view(np.float32).copy()
    if kind == "F16":
        return raw.view(np.float16).astype(np.float32)
    if kind == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(raw, GGMLQuantizationType[kind]).astype(np.float32)


def load_packed(path: Path, dtype: torch.dtype = torch.bfloat16):
    """A LlamaForCausalLM whose matrices are QuantLinear modules, straight from a GGUF file (one copy of the
    weights in memory); returns (model, {gguf type: packed bytes}, dense bytes)."""
    from transformers import AutoModelForCausalLM

    from roofserve.llm.kernels import load_kernel

    load_kernel()
    try:
        meta, tensors = read_header(path)
    except (ValueError, KeyError, OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} as GGUF ({type(e).__name__}: {str(e)[:120]})") from None
    try:
        config = llama_config(meta, tensors)
    except UserError as e:
        raise UserError(f"{path.name}: {e}") from None
    need, free = packed_bytes(tensors, dtype.itemsize), available_bytes()
    if free is not None and need > free:
        raise UserError(f"{path.name} needs {need / 1e9:.1f} GB for its weights and {free / 1e9:.1f} GB of memory is "
                        "available: free memory, or pick a smaller file or quantization")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weight_bytes: dict[str, int] = {}
    dense = 0

    def raw(t: TensorInfo) -> np.ndarray:  # small tensors (norms, dense matrices): one read
        return np.fromfile(path, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def matrix(name: str, permute: int | None = None) -> torch.nn.Module:
        nonlocal dense
        t = tensors[name]
        k, n = t.shape[:2]  # ggml order: row length first
        kind = t.kind
        if kind in DENSE:
            w = dense_from_file(path, t.offset, t.nbytes, kind, (n, k), dtype, permute)
            with torch.device("meta"):
                layer = torch.nn.Linear(k, n, bias=False, dtype=dtype)
            layer.weight = torch.nn.Parameter(w, requires_grad=False)
            dense += layer.weight.numel() * dtype.itemsize
            return layer
        p = pack_from_file(path, t.offset, t.nbytes, kind, (n, k), permute)
        weight_bytes[kind] = weight_bytes.get(kind, 0) + p.nbytes
        return QuantLinear(p)

    def vector(name: str) -> torch.nn.Parameter:
        nonlocal dense
        t = tensors[name]
        v = torch.from_numpy(_dense(raw(t), t.kind).reshape(-1)).to(dtype)
        dense += v.numel() * dtype.itemsize
        return torch.nn.Parameter(v, requires_grad=False)

    try:
        inner = model.model
        table = matrix("token_embd.weight")
        if not isinstance(table, QuantLinear):
            embed = torch.nn.Embedding.from_pretrained(table.weight.data, freeze=True)
        else:
            embed = QuantEmbedding(table, dtype)
        inner.embed_tokens = embed
        model.lm_head = table if config.tie_word_embeddings else matrix("output.weight")
        inner.norm.weight = vector("output_norm.weight")
        for i, layer in enumerate(inner.layers):
            for short, long in _LAYER_NAMES.items():
                name = f"blk.{i}.{short}.weight"
                if short.endswith("norm"):
                    layer.get_submodule(long).weight = vector(name)
                else:
                    owner, attr = long.split(".")
                    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(short)
                    setattr(layer.get_submodule(owner), attr, matrix(name, heads))
    except KeyError as e:
        raise UserError(f"{path.name} has no tensor {e.args[0]}: not a Llama-family GGUF file we can read") from None
    inner.rotary_emb = type(inner.rotary_emb)(config=config)  # its frequencies were built on meta
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"{path.name}: no weights in the file for {', '.join(left[:3])}")
    return model.eval(), weight_bytes, dense
