"""GGUF files of random weights in the shape of a known model (RANDOM_CONFIGS), for speed work that both
engines run on the same bytes: ours (`--gguf-weights packed`) and llama.cpp's.

Q4_0, Q4_1 and Q8_0 (and F16/BF16) are written with gguf-py, llama.cpp's own Python library, whose
quantizers are ports of llama.cpp's reference ones; K-quant mixes (Q4_K_M, ...) are made from a Q8_0 file
by llama.cpp's `llama-quantize --allow-requantize` (`make llama-server` builds it). The tokenizer is the
bundled SmolLM2's, padded with unused tokens up to the shape's vocabulary (tokens/s does not depend on
which tokens exist). Weights are drawn per tensor, so memory holds one tensor at a time.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import numpy as np

from roofserve.errors import UserError

log = logging.getLogger(__name__)

DIRECT = ("Q4_0", "Q4_1", "Q8_0", "F16", "BF16")  # what gguf-py writes itself


def _tokenizer_fields(vocab: int) -> dict:
    from gguf import GGUFReader

    from roofserve.llm.model import bundled_gguf

    fields = GGUFReader(str(bundled_gguf())).fields
    tokens = [str(bytes(fields["tokenizer.ggml.tokens"].parts[i]), "utf-8")
              for i in fields["tokenizer.ggml.tokens"].data]
    types = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]
    merges = [str(bytes(fields["tokenizer.ggml.merges"].parts[i]), "utf-8")
              for i in fields["tokenizer.ggml.merges"].data]
    if vocab < len(tokens):
        raise UserError(f"a random GGUF needs a vocabulary of at least {len(tokens)} tokens")
    extra = vocab - len(tokens)
    tokens += [f"<|unused_{i}|>" for i in range(extra)]
    types += [5] * extra  # UNUSED
    template = str(bytes(fields["tokenizer.chat_template"].parts[-1]), "utf-8")
    return {"tokens": tokens, "types": types, "merges": merges, "template": template}


def tensor_names(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, numpy shape: rows x row length) of every tensor of a Llama-family model."""
    h, ff, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = h // heads
    out = [("token_embd.weight", (config["vocab_size"], h)), ("output_norm.weight", (h,))]
    if not config.get("tie_word_embeddings"):
        out.append(("output.weight", (config["vocab_size"], h)))
    for i in range(layers):
        out += [(f"blk.{i}.attn_norm.weight", (h,)), (f"blk.{i}.attn_q.weight", (heads * head_dim, h)),
                (f"blk.{i}.attn_k.weight", (kv * head_dim, h)), (f"blk.{i}.attn_v.weight", (kv * head_dim, h)),
                (f"blk.{i}.attn_output.weight", (h, heads * head_dim)), (f"blk.{i}.ffn_norm.weight", (h,)),
                (f"blk.{i}.ffn_gate.weight", (ff, h)), (f"blk.{i}.ffn_up.weight", (ff, h)),
                (f"blk.{i}.ffn_down.weight", (h, ff))]
    return out


def _encode(w: np.ndarray, kind: str) -> tuple[np.ndarray, object]:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    qtype = GGMLQuantizationType[kind]
    if w.ndim == 1:  # norms stay F32, as llama.cpp's converter writes them
        return w.astype(np.float32), GGMLQuantizationType.F32
    if kind == "F16":
        return w.astype(np.float16), qtype
    return quantize(w, qtype), qtype


def write_direct(name: str, kind: str, path: Path, seed: int = 0) -> Path:
    """A random-weight GGUF of RANDOM_CONFIGS[name] with its matrices in `kind` (one of DIRECT)."""
    from gguf import GGUFWriter, LlamaFileType

    from roofserve.llm.model import RANDOM_CONFIGS

    if kind not in DIRECT:
        raise UserError(f"gguf-py writes {', '.join(DIRECT)}; {kind} needs llama-quantize (see write_random)")
    config = RANDOM_CONFIGS[name]
    tok = _tokenizer_fields(config["vocab_size"])
    h, heads = config["hidden_size"], config["num_attention_heads"]
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(f"random {name}")
    writer.add_context_length(min(config["max_position_embeddings"], 8192))
    writer.add_embedding_length(h)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(h // heads)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type({"Q4_0": LlamaFileType.MOSTLY_Q4_0, "Q4_1": LlamaFileType.MOSTLY_Q4_1,
                          "Q8_0": LlamaFileType.MOSTLY_Q8_0, "F16": LlamaFileType.MOSTLY_F16,
                          "BF16": LlamaFileType.MOSTLY_BF16}[kind])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok["template"])
    rng = np.random.default_rng(seed)
    names = tensor_names(config)

    def draw(shape):
        if len(shape) == 1:
            return np.ones(shape, np.float32)
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02)

    # the header lists every tensor's type and size first; the data follows, one tensor at a time
    for tname, shape in names:
        probe = np.zeros((16, shape[-1]), np.float32) if len(shape) == 2 else np.zeros(shape, np.float32)
        data, qtype = _encode(probe, kind)
        nbytes = data.nbytes // 16 * shape[0] if len(shape) == 2 else data.nbytes
        byte_shape = (shape[0], data.shape[-1]) if len(shape) == 2 else data.shape
        writer.add_tensor_info(tname, byte_shape, data.dtype, nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tname, shape in names:
        data, _ = _encode(draw(shape), kind)
        writer.write_tensor_data(data)
    writer.close()
    return path


def write_random(name: str, kind: str, path: Path, llama_quantize: str | None = None) -> Path:
    """write_direct for the types gguf-py writes; any other llama-quantize type (Q4_K_M, Q5_K_M, ...) from a
    temporary Q8_0 file through llama.cpp's `llama-quantize --allow-requantize`."""
    from roofserve.llm.model import RANDOM_CONFIGS

    if name not in RANDOM_CONFIGS:
        raise UserError(f"unknown shape {name!r}; known: {', '.join(RANDOM_CONFIGS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind in DIRECT:
        return write_direct(name, kind, path)
    from roofserve.llm.llama_server import find_llama_tool

    try:
        tool = llama_quantize or find_llama_tool("llama-quantize")
    except UserError as e:
        raise UserError(f"{kind} is made by llama.cpp's llama-quantize ({e}); or pass one of "
                        + ", ".join(DIRECT)) from None
    source = path.with_name(path.stem + ".q8_0-source.gguf")
    write_direct(name, "Q8_0", source)
    try:
        done = subprocess.run([tool, "--allow-requantize", str(source), str(path), kind], capture_output=True,
                              text=True)
    finally:
        source.unlink(missing_ok=True)
    if done.returncode:
        raise UserError(f"llama-quantize failed: {(done.stderr or done.stdout).strip().splitlines()[-1][:200]}")
    return path
