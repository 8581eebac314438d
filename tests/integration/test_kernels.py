"""roofserve's CPU decode kernels (built here from source) against torch, alone and inside the engine."""

import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.llama.modeling_llama import eager_attention_forward

from roofserve.llm.engine import Engine
from roofserve.llm.kernels import (
    FEW_ROWS,
    GemvLinear,
    gemv_bf16,
    load_kernel,
    measure_gemv_peak,
    pack_pairs,
    use_gemv_kernel,
)
from roofserve.llm.model import load
from roofserve.llm.sampling import Sampling
from tests.integration.conftest import alone, chat_ids, first_layers, make_engine

QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    torch.set_num_threads(2)
    load_kernel()


@pytest.mark.parametrize("shape", [(1536, 576), (576, 1536), (49152, 576), (7, 100), (5, 31), (4, 32)])
def test_gemv_matches_fp32_matmul(shape):
    torch.manual_seed(0)
    w = torch.randn(shape).bfloat16()
    x = torch.randn(1, 1, shape[1]).bfloat16()
    expected = x.float() @ w.float().T
    got = gemv_bf16(x, w)
    assert got.shape == (1, 1, shape[0]) and got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() <= 1e-2 * expected.abs().max()  # bf16 output rounding: 2^-8


def test_gemv_refuses_what_it_cannot_compute():
    with pytest.raises(RuntimeError, match="bf16"):
        gemv_bf16(torch.randn(1, 8), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="one row"):
        gemv_bf16(torch.randn(2, 8).bfloat16(), torch.randn(4, 8).bfloat16())


@pytest.mark.parametrize("rows", [2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("shape", [(1536, 576), (7, 100), (5, 31)])
def test_gemm_of_a_decode_batch_matches_fp32_matmul(rows, shape):
    """The few-row kernel a batched decode step uses: every row right, whatever the block tails."""
    torch.manual_seed(rows)
    w = torch.randn(shape).bfloat16()
    x = torch.randn(rows, 1, shape[1]).bfloat16()
    expected = x.float() @ w.float().T
    got = torch.ops.roofserve.gemm_bf16(x, w)
    assert got.shape == (rows, 1, shape[0]) and got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() <= 1e-2 * expected.abs().max()


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 17, 40, 200])
@pytest.mark.parametrize("shape", [(1536, 576), (576, 1536), (80, 64), (48, 48), (16, 2)])
@pytest.mark.parametrize("path", ["tiles", "vectors"])
def test_gemm_on_packed_weights_matches_fp32_matmul(rows, shape, path):
    """The kernel decode steps (and with AMX prompt chunks) use on packable shapes, on weights packed
    once (pack_pairs): every row right past the 16-row tiles and the 8-row vector tiles, a prompt
    chunk's rows, a partial group of column blocks, and a K that the tiles cannot take (not a multiple
    of 32). Both paths: AMX tiles (where the CPU has them) and AVX512-BF16 vectors."""
    torch.manual_seed(rows)
    w = torch.randn(shape).bfloat16()
    x = torch.randn(rows, 1, shape[1]).bfloat16()
    expected = x.float() @ w.float().T
    previous = torch.ops.roofserve.set_amx_min_rows(1 if path == "tiles" else 1 << 30)
    try:
        got = torch.ops.roofserve.gemm_packed_bf16(x, pack_pairs(w))
    finally:
        torch.ops.roofserve.set_amx_min_rows(previous)
    assert got.shape == (rows, 1, shape[0]) and got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() <= 1e-2 * expected.abs().max()


class _Ops(TorchDispatchMode):
    """Records the operators that run under it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("max_rows", [4, 64])
def test_gemv_linear_packs_what_it_can_and_sends_each_row_count_where_it_was_told(max_rows):
    """Up to max_rows rows our kernel, beyond it torch's matmul; a shape that does not pack takes the
    older kernel only for decode-sized row counts (FEW_ROWS), prompts go to torch."""
    torch.manual_seed(0)
    for shape, packable in (((64, 32), True), ((7, 100), False)):
        linear = torch.nn.Linear(shape[1], shape[0], bias=False).bfloat16()
        swapped = GemvLinear(linear, max_rows=max_rows)
        assert (swapped.packed is not None) == packable and swapped.weight is linear.weight
        for rows in (1, 3, 4, 5, 12, 17, 64, 65):
            x = torch.randn(rows, shape[1]).bfloat16()
            expected = x.float() @ linear.weight.float().T
            with _Ops() as ops:
                got = swapped(x)
            assert (got.float() - expected).abs().max() <= 1e-2 * expected.abs().max(), (shape, rows)
            ours = rows <= max_rows and (packable or rows <= FEW_ROWS)
            assert any(n.startswith("roofserve::") for n in ops.names) == ours, (shape, rows, ops.names)
    with pytest.raises(RuntimeError, match="K/2"):
        torch.ops.roofserve.gemm_packed_bf16(torch.randn(1, 30).bfloat16(), pack_pairs(torch.randn(16, 32).bfloat16()))


@pytest.mark.parametrize("head_dim", [32, 48, 128])  # 48: the plain loop (the vector path takes multiples of 32)
def test_slot_attention_reads_each_rows_own_slot_up_to_its_position(head_dim):
    torch.manual_seed(0)
    slots_total, length = 5, 64
    k = torch.randn(slots_total, 3, length, head_dim).bfloat16()
    v = torch.randn(slots_total, 3, length, head_dim).bfloat16()
    slots, positions = torch.tensor([3, 0, 4]), torch.tensor([10, 0, 63])
    for s, p in zip(slots.tolist(), positions.tolist()):
        k[s, :, p + 1:] = 100.0  # past a row's position: never read
    q = torch.randn(3, 9, 1, head_dim).bfloat16()
    got = torch.ops.roofserve.slot_attention(q, k, v, slots, positions, 0.2)
    assert got.shape == (3, 1, 9, head_dim)
    for row, (s, p) in enumerate(zip(slots.tolist(), positions.tolist())):
        kk = k[s, :, : p + 1].float().repeat_interleave(3, 0)
        vv = v[s, :, : p + 1].float().repeat_interleave(3, 0)
        expected = torch.softmax(q[row, :, :, :].float() @ kk.transpose(1, 2) * 0.2, -1) @ vv  # (9, 1, head_dim)
        assert (got[row, 0].float() - expected[:, 0]).abs().max() < 0.03, row
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.roofserve.slot_attention(q, k, v, torch.tensor([3, 0, 5]), positions, 0.2)


def test_the_kernel_has_its_own_gemv_peak_next_to_torchs():
    peak = measure_gemv_peak()
    assert (peak.resource, peak.name, peak.unit) == ("bandwidth", "gemv-bf16-roofserve", "GB/s")
    assert peak.value > 0 and peak.size >= 128 << 20  # weights that do not fit the caches


class _Layer:  # what eager attention reads from its module
    num_key_value_groups = 3
    training = False


@pytest.mark.parametrize("position", [0, 37, 127])
def test_decode_attention_matches_eager_over_the_filled_cache(position):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 9, 1, 64), torch.randn(1, 3, 128, 64), torch.randn(1, 3, 128, 64)
    k[:, :, position + 1:] = 100.0  # empty slots must not be read
    mask = torch.full((1, 1, 1, 128), float("-inf"))
    mask[..., : position + 1] = 0
    expected, _ = eager_attention_forward(_Layer(), q, k, v, mask, scaling=0.125)
    got = torch.ops.roofserve.decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), torch.tensor([position]), 0.125)
    assert got.shape == expected.shape == (1, 1, 9, 64)
    assert (got.float() - expected).abs().max() < 0.03


_PORTABLE_CHECK = """
import torch
from roofserve.llm import kernels
kernels.build("roofserve_kernels_portable_test", ("-mno-avx512bf16", "-mno-avx512vnni"))
torch.manual_seed(0)
w, x = torch.randn(97, 100).bfloat16(), torch.randn(1, 100).bfloat16()
expected = x.float() @ w.float().T
assert (torch.ops.roofserve.gemv_bf16(x, w).float() - expected).abs().max() <= 1e-2 * expected.abs().max()
x3 = torch.randn(3, 100).bfloat16()
expected = x3.float() @ w.float().T
assert (torch.ops.roofserve.gemm_bf16(x3, w).float() - expected).abs().max() <= 1e-2 * expected.abs().max()
w = torch.randn(96, 100).bfloat16()
expected = x3.float() @ w.float().T
packed = torch.ops.roofserve.gemm_packed_bf16(x3, kernels.pack_pairs(w))
assert (packed.float() - expected).abs().max() <= 1e-2 * expected.abs().max()
q, k, v = torch.randn(1, 4, 1, 32).bfloat16(), torch.randn(1, 2, 16, 32).bfloat16(), torch.randn(1, 2, 16, 32).bfloat16()
kk, vv = k.float()[:, :, :10].repeat_interleave(2, 1), v.float()[:, :, :10].repeat_interleave(2, 1)
expected = (torch.softmax(q.float() @ kk.transpose(2, 3) * 0.2, -1) @ vv).transpose(1, 2)
got = torch.ops.roofserve.decode_attention(q, k, v, torch.tensor([9]), 0.2)
assert (got.float() - expected).abs().max() < 0.03
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from roofserve.llm.gguf import QuantLinear, pack_tensor
for kind in ("Q4_0", "Q4_1", "Q8_0"):
    raw = quantize((np.random.default_rng(0).standard_normal((32, 64)) * 0.05).astype(np.float32), GGMLQuantizationType[kind])
    w = torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind]).reshape(32, 64))
    x = torch.randn(3, 64)
    expected = x @ w.T
    got = QuantLinear(pack_tensor(raw, kind, (32, 64)))(x.bfloat16()).float()
    assert (got - expected).abs().max() <= 0.03 * expected.abs().max(), kind
from roofserve.llm.gguf import dequantize_packed
rng = np.random.default_rng(1)
for kind, size, scales in (("Q4_K", 144, slice(0, 4)), ("Q6_K", 210, slice(208, 210))):  # any bytes are a block
    raw = rng.integers(0, 256, (32, 1, size), dtype=np.uint8)
    d = rng.uniform(1e-4, 1e-3, (32, 1, (scales.stop - scales.start) // 2)).astype(np.float16)
    raw[..., scales] = d.view(np.uint8)  # small fp16 super-block scales
    p = pack_tensor(raw.reshape(32, size), kind, (32, 256))
    x = torch.randn(3, 256)
    expected = x @ dequantize_packed(p).T
    got = QuantLinear(p)(x.bfloat16()).float()
    assert (got - expected).abs().max() <= 0.03 * expected.abs().max(), kind
print("portable ok")
"""


def test_the_portable_path_for_cpus_without_avx512_bf16_is_correct_too():
    """Built without AVX512-BF16 and AVX512-VNNI: the plain loops of every operator, GGUF blocks included."""
    # a separate process: the operators' namespace can be registered once per process
    done = subprocess.run([sys.executable, "-c", _PORTABLE_CHECK], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0 and "portable ok" in done.stdout, done.stderr[-2000:]


@pytest.fixture(scope="module")
def loaded():
    return load("default", "bf16")


@pytest.fixture(scope="module")
def prompt(loaded):
    return chat_ids(loaded.tokenizer, QUESTION[0]["content"])


def _teacher_forced_logits(engine: Engine, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """The engine's next-token logits at each step when fed `tokens` (so one early difference does not
    change every later step)."""
    with torch.inference_mode():
        steps = [engine.slots.prefill(torch.tensor(prompt), 0, 0)]
        for i, token in enumerate(tokens[:-1]):
            logits, _ = engine._decode(torch.tensor([token]), torch.tensor([len(prompt) + i]), torch.tensor([0]))
            steps.append(logits[0])
    return steps


def _assert_follows(engine: Engine, prompt: list[int], reference: list[int], what: str) -> None:
    steps = _teacher_forced_logits(engine, prompt, reference)
    # torch's choice is ours too, or within a near-tie (bf16 logits here are ~20, spaced 0.125)
    gaps = [float(logits.max() - logits[token]) for logits, token in zip(steps, reference)]
    agree = sum(gap == 0 for gap in gaps)
    assert max(gaps) <= 0.5 and agree >= 0.9 * len(reference), (what, agree, max(gaps))


def test_engine_with_both_kernels_predicts_what_torch_bf16_predicts(loaded, prompt):
    reference = alone(make_engine(loaded.model, max_batch_size=1, max_seq_len=256), prompt, Sampling(max_new_tokens=48))
    model = loaded.model
    assert use_gemv_kernel(model) == 211  # 30 layers x 7 projections + the LM head (tied to the embedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    kernel = make_engine(model, max_batch_size=1, max_seq_len=256, attention="roofserve")
    _assert_follows(kernel, prompt, reference, "eager")
    # compiled, on the first 6 layers of a fresh copy (see first_layers), against that model's torch bf16
    small = first_layers(load("default", "bf16").model, 6)
    reference = alone(make_engine(small, max_batch_size=1, max_seq_len=256), prompt, Sampling(max_new_tokens=48))
    assert use_gemv_kernel(small) == 6 * 7 + 1
    compiled = make_engine(small, max_batch_size=1, max_seq_len=256, compile=True, attention="roofserve")
    _assert_follows(compiled, prompt, reference, "compiled")
