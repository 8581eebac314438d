"""GGUF weights packed as stored (llm/gguf.py) and read by our int8 kernel (roofserve::gemm_quant): each
format against llama.cpp's reference dequantization (gguf-py's port), the kernel against the same math
in torch, and whole models (the bundled GGUF, random-weight files) loaded without dequantizing."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from roofserve.config import LLMConfig
from roofserve.errors import UserError
from roofserve.llm import gguf as packed_gguf
from roofserve.llm.gguf import QuantLinear, dequantize_packed, load_packed, pack_tensor
from roofserve.llm.kernels import load_kernel
from roofserve.llm.model import bundled_gguf, load
from roofserve.llm.random_gguf import write_random
from tests.integration.conftest import chat_ids, make_engine


@pytest.fixture(scope="module", autouse=True)
def kernels():
    torch.set_num_threads(2)
    load_kernel()


def random_blocks(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF blocks of n rows of k weights: quantized by gguf-py where it can, random bytes with small
    fp16 scales for the K-quants (any bytes are a valid block)."""
    rng = np.random.default_rng(seed)
    if kind in ("Q4_0", "Q4_1", "Q8_0", "Q5_0"):
        return quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), T[kind])
    if kind == "Q4_K":
        b = rng.integers(0, 256, (n, k // 256, 144), dtype=np.uint8)
        b[..., :4] = rng.uniform(1e-4, 1e-3, (n, k // 256, 2)).astype(np.float16).view(np.uint8)
        return b.reshape(n, -1)
    if kind == "Q6_K":
        b = rng.integers(0, 256, (n, k // 256, 210), dtype=np.uint8)
        b[..., 208:] = rng.uniform(1e-4, 1e-3, (n, k // 256, 1)).astype(np.float16).view(np.uint8)
        return b.reshape(n, -1)
    raise ValueError(kind)


def q8_reference(x: torch.Tensor, w: torch.Tensor, group: int) -> torch.Tensor:
    """What the kernel computes, in fp32 torch: inputs rounded to int8 per group of k (Packed.input_group;
    scale: the group's largest magnitude / 127, as llama.cpp's Q8 activations), times the dequantized
    weights."""
    b = x.double().reshape(*x.shape[:-1], -1, group)  # fp64: an fp32 product here can land on the other side
    top = b.abs().amax(-1, keepdim=True)             # of a rounding edge than the kernel's
    inv = torch.where(top > 0, 127 / top, torch.zeros_like(top))
    xq = (torch.round(b * inv) * (top / 127)).reshape(x.shape)
    return (xq @ w.double().T).float()


FORMATS = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_0", "Q6_K"]


@pytest.mark.parametrize("kind", FORMATS)
def test_packed_weights_are_llama_cpps_dequantized_ones(kind):
    n, k = 48, 512
    raw = random_blocks(kind, n, k)
    reference = dequantize(raw, T[kind]).reshape(n, k)
    got = dequantize_packed(pack_tensor(raw, kind, (n, k))).numpy()
    top = np.abs(reference).max()
    if kind in ("Q4_0", "Q4_1", "Q8_0"):
        assert np.array_equal(got, reference)  # the same blocks, relaid
    elif kind in ("Q4_K", "Q6_K"):  # their own scales: fp32 products of the same fp16 and small integers
        assert np.abs(got - reference).max() <= 1e-6 * top
    else:  # requantized to 8 bits: half a step of 1/127 of the block's largest magnitude, and the fp16 step
        blocks = np.abs(reference.reshape(n, -1, 32)).max(-1, keepdims=True)
        assert (np.abs(got - reference).reshape(n, -1, 32) <= blocks * (1 / 254 + 2 ** -10)).all()


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 7, 8, 14, 17, 64])  # tiles of 8 rows and each remainder
def test_kernel_matches_the_same_math_in_torch(kind, rows):
    n, k = 64, 768 if kind not in ("Q4_K", "Q6_K") else 512
    p = pack_tensor(random_blocks(kind, n, k, seed=rows), kind, (n, k))
    w = dequantize_packed(p)
    torch.manual_seed(rows)
    x = torch.randn(rows, k)
    expected = q8_reference(x, w, p.input_group)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
        got = QuantLinear(p)(x.to(dtype).view(rows, 1, k))
        assert got.shape == (rows, 1, n) and got.dtype == dtype
        exact = q8_reference(x.to(dtype).float(), w, p.input_group)  # bf16 inputs: the same rounding first
        assert (got.float().view(rows, n) - exact).abs().max() <= tolerance * exact.abs().max()
    # and the int8 inputs cost little against exact fp32 inputs
    assert (expected - x @ w.T).norm() <= 0.02 * (x @ w.T).norm()


def _has_amx_int8() -> bool:
    with open("/proc/cpuinfo") as f:
        return " amx_int8" in f.read()


@pytest.mark.skipif(not _has_amx_int8(), reason="the CPU has no AMX int8 tiles: the vector path runs alone")
@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("rows", [1, 5, 8, 16, 17, 40, 100])
def test_amx_tiles_compute_what_the_vector_path_computes(kind, rows):
    """The int8 tile path (prompt chunks) does the vector path's operations on the same integer sums, so
    the outputs are equal, for every row count past the 4-, 8- and 16-row tiles and partial column groups
    (N = 80: one group of 4 blocks and one of 1)."""
    n, k = 80, 768 if kind not in ("Q4_K", "Q6_K") else 512
    layer = QuantLinear(pack_tensor(random_blocks(kind, n, k, seed=rows), kind, (n, k)))
    torch.manual_seed(rows)
    x = torch.randn(rows, 1, k)
    for dtype in (torch.float32, torch.bfloat16):
        outputs = []
        for threshold in (1 << 30, 1):  # the vector path, then the tiles
            previous = torch.ops.roofserve.set_amx_quant_min_rows(threshold)
            try:
                outputs.append(layer(x.to(dtype)))
            finally:
                torch.ops.roofserve.set_amx_quant_min_rows(previous)
        assert torch.equal(*outputs), (outputs[0] - outputs[1]).abs().max()


def test_shapes_that_do_not_pack_are_one_line_errors():
    with pytest.raises(UserError, match="multiple of 16"):
        pack_tensor(random_blocks("Q8_0", 8, 64), "Q8_0", (8, 64))


@pytest.fixture(scope="module")
def bundled():
    """fp32 activations: the reference below then differs from the kernel by summation order alone (bf16
    would round both to bf16 after every layer, and a value near a rounding edge can flip a greedy token)."""
    return load("default", "fp32", "cpu", "packed")


def test_the_bundled_gguf_loads_packed_with_one_copy_of_its_weights(bundled):
    assert bundled.packed_bytes == {"Q4_1": 66_355_200, "Q8_0": 30_081_024}  # the file's own block bytes
    linears = [m for m in bundled.model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 30 * 7 + 1  # every matrix of every layer, and the tied embedding / LM head
    assert bundled.model.lm_head is bundled.model.model.embed_tokens.table  # tied: one table
    assert not any(type(m) is torch.nn.Linear for m in bundled.model.modules())


def test_the_bundled_gguf_packed_computes_what_its_math_in_torch_computes(bundled):
    """The loader (names, the undone Q/K row order, the tied table) and the kernel in a whole model, against
    the same model whose layers compute q8_reference in torch, on its own greedy answer: the logits agree
    within a few percent, and every greedy token whose margin is wider than the difference agrees."""
    ids = torch.tensor([chat_ids(bundled.tokenizer, "Name three colours of the rainbow.")])
    with torch.no_grad():
        answer = bundled.model.generate(ids, max_new_tokens=24, do_sample=False)
        ours = bundled.model(answer).logits[0, ids.shape[1] - 1:-1]
        originals = {}
        for m in bundled.model.modules():
            if isinstance(m, QuantLinear):
                w, group = dequantize_packed(m.packed()), m.packed().input_group
                originals[m] = m.forward
                m.forward = (lambda w, group: lambda x: q8_reference(x, w, group).to(x.dtype))(w, group)
        try:
            reference = bundled.model(answer).logits[0, ids.shape[1] - 1:-1]
        finally:
            for m, f in originals.items():
                m.forward = f
    # Each layer agrees to ~1e-7 (test above), but a difference that small can move an input across a
    # rounding edge of the next layer's int8 inputs, and over 30 layers such steps add up to a few percent
    # (2.8% here); a wrong row order or scale would be ~100%.
    assert (ours - reference).norm() <= 0.08 * reference.norm()
    gap = (ours - reference).abs().amax(-1)  # per position
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * gap  # no difference this size can swap the top two
    assert clear.sum() >= 3
    assert torch.equal(ours.argmax(-1)[clear], reference.argmax(-1)[clear])
    # and the answer is the kernel's greedy one: generate's one-token steps and this whole-answer forward
    # sum attention in another order, so a near-tie (0.024 apart on an EPYC) may go either way
    chosen = ours.gather(-1, answer[0, ids.shape[1]:, None])[:, 0]
    assert (ours.amax(-1) - chosen).max() <= 0.1
    assert torch.equal(ours.argmax(-1)[clear], answer[0, ids.shape[1]:][clear])


def test_packed_logits_stay_near_the_dequantized_fp32_model(bundled, fp32_model):
    """int8 inputs move the logits a little (llama.cpp's do too); a wrong row order or scale would move them
    by their own size."""
    ids = torch.tensor([chat_ids(bundled.tokenizer, "What is the capital of France?")])
    with torch.no_grad():
        ours = bundled.model(ids).logits.float()
        exact = fp32_model.model(ids).logits.float()
    assert (ours - exact).norm() <= 0.1 * exact.norm()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {kind: write_random("tiny", kind, folder / f"tiny-{kind}.gguf") for kind in ("Q4_0", "Q8_0", "F16", "BF16")}


@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0", "F16", "BF16"])
def test_random_weight_files_load_packed_in_their_own_format(tiny_files, kind):
    model, packed_bytes, dense = load_packed(tiny_files[kind])
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 49152)
    if kind in ("F16", "BF16"):
        assert packed_bytes == {} and dense > 0  # dense matrices stay dense, read in chunks of rows into bf16
        _, tensors = packed_gguf.read_header(tiny_files[kind])
        attention = model.model.layers[1].self_attn
        for name, weight, heads in [("blk.1.attn_q.weight", attention.q_proj.weight, config.num_attention_heads),
                                    ("blk.1.attn_k.weight", attention.k_proj.weight, config.num_key_value_heads),
                                    ("blk.1.ffn_down.weight", model.model.layers[1].mlp.down_proj.weight, None),
                                    ("token_embd.weight", model.lm_head.weight, None)]:
            t = tensors[name]  # gguf-py's reading of the same bytes, Q and K rows unpermuted as transformers does
            reference = dequantize(np.fromfile(tiny_files[kind], np.uint8, t.nbytes, offset=t.offset), T[kind])
            reference = reference.reshape(t.shape[1], t.shape[0])
            if heads:
                reference = reference.reshape(heads, -1, 2, t.shape[0]).swapaxes(1, 2).reshape(reference.shape)
            assert torch.equal(weight, torch.from_numpy(np.ascontiguousarray(reference)).to(torch.bfloat16)), name
        assert model.model.embed_tokens.weight.data_ptr() == model.lm_head.weight.data_ptr()  # tied: one copy
    else:
        assert set(packed_bytes) == {kind}
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 49152) and torch.isfinite(logits).all()


def test_compiled_packed_weights_give_each_layer_its_own_format(tiny_files):
    """--compile (and --compile-prefill) over packed weights trace one layer's step and reuse it for every
    layer (nested regions for decode, one layer's graph for prefill), so compiling does not grow with depth
    (unrolled, a 16-layer graph per bucket of rows took minutes on 2 cores), and the decode step's row count
    is dynamic from 2 rows on (no padding to buckets). Four layers, Q4_0 with a Q8_0 one among them, up to 4
    rows: the eager engine's logits step by step at 2 and 3 rows, within the few tenths of a percent that
    fused fp32 sums move an int8-rounded input by (a layer run through the other format's code would read
    its blocks as the wrong format: logits of another model), and nothing compiles after warm-up."""
    from torch._dynamo.utils import counters

    q4, _, _ = load_packed(tiny_files["Q4_0"], torch.float32)
    q8, _, _ = load_packed(tiny_files["Q8_0"], torch.float32)
    a, b = q4.model.layers, q8.model.layers
    q4.model.layers = torch.nn.ModuleList([a[0], b[0], a[1], a[0]])  # the same layer twice: its own cache each
    q4.config.num_hidden_layers = 4
    eager = make_engine(q4, max_batch_size=4, max_seq_len=64)
    compiled = make_engine(q4, max_batch_size=4, max_seq_len=64, compile=True, compile_prefill=True)
    assert compiled.buckets == eager.buckets == [1, 2, 3, 4]  # steps run at their own row count, unpadded
    assert compiled.compile_cached  # no frozen weights: inductor keeps these graphs for later starts
    before = counters["stats"]["unique_graphs"]
    compiled.warm_up()
    graphs = counters["stats"]["unique_graphs"] - before
    assert graphs == 2 + 2 * 2  # decode: 1 row, 2-4 rows; prefill, per layer: per format, static then dynamic
    with torch.inference_mode():  # tensors made inside it, as the engine's steps make them (dynamo guards on that)
        for length, start, slot in [(5, 0, 0), (9, 5, 0), (7, 0, 1)]:
            ids = torch.randint(0, 49152, (length,))
            want = eager.slots.prefill(ids, start, slot)
            got = compiled._compiled_prefill(ids, start + 2, torch.tensor([slot]))
            assert (got - want).norm() <= 0.02 * want.norm(), (length, start, slot)
        compiled.slots.prefill(torch.tensor([7]), 7, 1)  # a 1-token chunk runs eager: it must not compile
        tokens, slots = torch.tensor([5, 900, 77]), torch.tensor([0, 1, 2])
        for position in range(14, 20):  # the same tokens into both engines' caches, step by step
            rows = 2 if position < 17 else 3  # slot 2 joins at position 17 - 9 = 8 (its cache zeros before)
            positions = torch.tensor([position, position - 7, position - 9])[:rows]
            want, _ = eager.slots.decode(tokens[:rows], positions, slots[:rows])
            got, _ = compiled._decode(tokens[:rows], positions, slots[:rows])
            assert (got - want).norm() <= 0.02 * want.norm(), position
            tokens[:rows] = want.argmax(-1)
    assert counters["stats"]["unique_graphs"] - before == graphs, "nothing compiled after warm-up"


def test_what_cannot_be_read_packed_is_a_one_line_error(tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="cannot read"):
        load_packed(not_gguf)
    with pytest.raises(UserError, match="reads a .gguf file"):
        LLMConfig(model="random:tiny", gguf_weights="packed").validate()
    with pytest.raises(UserError, match="drop --quantize"):
        LLMConfig(model=str(bundled_gguf()), gguf_weights="packed", quantize="int8").validate()


def test_auto_packs_a_users_gguf_file_and_keeps_the_demo_model_in_bf16():
    for model, expected in ((str(bundled_gguf()), "packed"), ("smollm2-135m-instruct", "bf16")):
        cfg = LLMConfig(model=model, device="cpu")
        cfg.validate()
        assert cfg.gguf_weights == expected
        # the engine reads packed weights' KV cache with our slot kernel (only the filled positions)
        assert cfg.attention == ("roofserve" if expected == "packed" else "auto")
    one = LLMConfig(model=str(bundled_gguf()), device="cpu", max_batch_size=1)
    one.validate()
    assert (one.gguf_weights, one.attention) == ("packed", "roofserve")  # one at a time is the same engine
    cfg = LLMConfig(model=str(bundled_gguf()), device="cpu", quantize="int8")
    cfg.validate()
    assert cfg.gguf_weights == "bf16"  # torchao quantizes dequantized weights


def test_memory_plan_names_each_format_and_the_kv_cache(bundled):
    plan = packed_gguf.MemoryPlan(bundled.packed_bytes, bundled.dense_bytes,
                                  packed_gguf.kv_bytes_per_slot(bundled.model.config, 2048, torch.bfloat16), 2048)
    lines = plan.lines()
    assert lines[0].startswith("weights 0.10 GB (Q4_1 0.07 GB, Q8_0 0.03 GB")
    # 2 x 30 x 3 x 64 x 2048 x 2 B
    assert lines[1] == "KV cache 0.047 GB per sequence of 2048 tokens, 1 sequence: up to 0.05 GB, held as they fill it"


def test_our_header_reader_finds_what_gguf_py_finds():
    from gguf import GGUFReader

    from roofserve.llm.gguf import read_header

    path = bundled_gguf()
    meta, tensors = read_header(path)
    theirs = GGUFReader(str(path))
    assert meta["llama.block_count"] == 30 and meta["general.architecture"] == "llama"
    assert len(tensors) == len(theirs.tensors)
    for t in theirs.tensors:
        ours = tensors[t.name]
        assert (ours.offset, ours.nbytes, ours.kind) == (int(t.data_offset), int(t.n_bytes), t.tensor_type.name)
        assert ours.shape == tuple(int(x) for x in t.shape)


def test_the_planned_bytes_are_what_loading_holds(bundled):
    from roofserve.llm.gguf import packed_bytes, read_header
    from roofserve.measure.roofline import packed_gguf_bytes_per_token

    planned = packed_bytes(read_header(bundled_gguf())[1], 4)  # the fixture is fp32
    assert planned == sum(bundled.packed_bytes.values()) + bundled.dense_bytes
    assert packed_gguf_bytes_per_token(str(bundled_gguf()), 4) == planned


def test_a_file_larger_than_free_memory_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(packed_gguf, "available_bytes", lambda: 10 << 20)  # 10 MiB free
    with pytest.raises(UserError, match=r"needs 0\.1 GB for its weights and 0\.0 GB of memory is available"):
        load_packed(bundled_gguf())
