"""Roofline math against hand-computed cases."""

import pytest

from roofserve.measure import roofline
from roofserve.llm.model import RANDOM_CONFIGS

SMOL = RANDOM_CONFIGS["smollm2-135m"]
LLAMA1B = RANDOM_CONFIGS["llama-3.2-1b"]


def test_vision_roofs():
    # 0.77 GFLOP per image on a 0.9 TFLOP/s peak: 1168.8 images/s at best
    assert roofline.compute_roof_per_s(0.77e9, 0.9) == pytest.approx(1168.83, rel=1e-4)
    assert roofline.mfu(300, 0.77e9, 0.9) == pytest.approx(300 * 0.77e9 / 0.9e12)
    assert roofline.memory_roof_per_s(1e6, 50) == pytest.approx(50_000)


def test_smollm2_parameter_count_matches_the_model():
    linear, other = roofline.llm_shapes(SMOL)
    # per layer: q,o 576x576; k,v 576x192; gate,up,down 576x1536 -> 3,538,944; x30; LM head 49152x576
    assert linear == 30 * 3_538_944 + 49_152 * 576 == 134_479_872
    assert other == 61 * 576 + 576  # 2 norms per layer + final norm, and one embedding row


def test_smollm2_bytes_per_token_per_format():
    linear, other = 134_479_872, 35_712
    assert roofline.weight_bytes_per_token(SMOL, "bf16") == (linear + other) * 2 == 269_031_168
    assert roofline.weight_bytes_per_token(SMOL, "fp32") == (linear + other) * 4
    # int4, group 64: half a byte per weight + (scale, zero) in bf16 per 64 weights
    assert roofline.weight_bytes_per_token(SMOL, "int4", 64) == linear // 2 + (linear // 64) * 4 + other * 2
    # int8: one byte per weight + one bf16 scale per output row (30 x (576+192+192+576+1536+1536+576) + 49152)
    rows = 30 * 5184 + 49152
    assert roofline.weight_bytes_per_token(SMOL, "int8") == linear + rows * 2 + other * 2


def test_llama_3_2_1b_bf16_bytes_and_roof():
    # per layer: q,o 2048x2048; k,v 2048x512; 3 x 2048x8192 -> 60,817,408; x16; LM head 128256x2048
    linear, _ = roofline.llm_shapes(LLAMA1B)
    assert linear == 16 * 60_817_408 + 128_256 * 2048 == 1_235_746_816
    bytes_bf16 = roofline.weight_bytes_per_token(LLAMA1B, "bf16")
    # a T4's 320 GB/s datasheet bandwidth: about 129 tokens/s at most in bf16
    assert roofline.memory_roof_per_s(bytes_bf16, 320) == pytest.approx(129.4, abs=0.5)


def test_kv_cache_bytes_and_mbu():
    # SmolLM2: 2 (k, v) x 30 layers x 3 kv heads x 64 dims x 2 bytes = 23,040 bytes per position
    assert roofline.kv_bytes_per_token(SMOL, 1) == 23_040
    assert roofline.kv_bytes_per_token(SMOL, 100) == 2_304_000
    assert roofline.mbu(100, 269e6, 80) == pytest.approx(100 * 269e6 / 80e9)


def test_gguf_bytes_count_blocks(tmp_path):
    from roofserve.llm.model import bundled_gguf

    size = roofline.gguf_bytes_per_token(str(bundled_gguf()))
    # Q4_1 stores 32 weights in 20 bytes (0.625 B/weight); some tensors may be kept wider
    assert 134_515_008 * 0.6 < size < bundled_gguf().stat().st_size


def test_bnb4_keeps_the_lm_head_wide():
    linear, other = roofline.llm_shapes(SMOL)
    head = 49_152 * 576
    assert roofline.weight_bytes_per_token(SMOL, "bnb4") == (linear - head) // 2 + ((linear - head) // 64) * 4 + head * 2 + other * 2


def test_batch_roof_by_hand():
    # 100 weight bytes read once per step, 10 KV bytes per sequence, 50 linear parameters (100 FLOPs per
    # token); 1 GB/s and 0.001 TFLOP/s = 1e9 FLOP/s.
    one = roofline.batch_roof(1, 100, 10, 50, 1.0, 0.001)
    assert one["step_bytes"] == 110 and one["step_flops"] == 100
    assert one["bandwidth_roof_tokens_per_s"] == pytest.approx(1e9 / 110, rel=1e-6)
    assert one["compute_roof_tokens_per_s"] == pytest.approx(1e7) and one["bound"] == "bandwidth"
    two = roofline.batch_roof(2, 100, 10, 50, 1.0, 0.001)
    assert two["bandwidth_roof_tokens_per_s"] == pytest.approx(2e9 / 120, rel=1e-6)
    assert two["roof_tokens_per_s"] == pytest.approx(1e7) and two["bound"] == "compute"
    assert roofline.crossover_batch_size(100, 10, 50, 1.0, 0.001) == 2
    assert roofline.batch_roof(4, 100, 10, 50, 1.0, None)["bound"] is None  # no peak: only the bandwidth roof


def test_prefill_roof_by_hand():
    from roofserve.measure.llm_roof import prefill_roof

    # 64 prompt tokens of SmolLM2 in bf16: 2 x (106.17 M layer parameters x 64 + the 28.31 M of the LM head
    # once, for the last position) FLOPs at 0.74 TFLOP/s, or its 269 MB read at 50 GB/s
    linear, head = 134_479_872, 49152 * 576
    roof = prefill_roof(linear, head, 269_031_168, 64, 0.74, 50.0)
    assert roof["prefill_compute_roof_ms"] == pytest.approx(18.44, abs=0.01)  # not 23.26: the head for every token
    assert roof["prefill_weight_read_ms"] == pytest.approx(5.38, abs=0.01)
    assert roof["prefill_roof_ms"] == roof["prefill_compute_roof_ms"]
    # a 1-token prompt is bound by reading the weights, not by its FLOPs
    assert prefill_roof(linear, head, 269_031_168, 1, 0.74, 50.0)["prefill_roof_ms"] == pytest.approx(5.38, abs=0.01)
    assert prefill_roof(linear, head, 269_031_168, 64, None, None)["prefill_roof_ms"] is None


def test_a_working_set_the_caches_hold_gets_its_own_roof_not_drams():
    from roofserve.config import LLMConfig, make_config
    from roofserve.measure.llm_roof import step_roof

    small = make_config(LLMConfig, {"model": "random:smollm2-135m", "precision": "bf16"})
    dram = step_roof(small, 256, bandwidth_gb_s=50.0)  # no working-set rate: the DRAM roof, as before
    assert dram["memory_level"] == "DRAM" and dram["bandwidth_gb_s"] == 50.0
    resident = step_roof(small, 256, bandwidth_gb_s=50.0, working_set_gb_s=200.0)
    assert resident["memory_level"] == "cache" and resident["bandwidth_gb_s"] == 200.0
    assert resident["roof_tokens_per_s"] == pytest.approx(4 * dram["roof_tokens_per_s"], rel=0.01)
    assert resident["dram_bandwidth_gb_s"] == 50.0
    # read no more than 20% faster than DRAM: read from DRAM (the difference is noise)
    assert step_roof(small, 256, bandwidth_gb_s=50.0, working_set_gb_s=55.0)["memory_level"] == "DRAM"


def test_the_read_rate_is_measured_at_any_size():
    import torch

    from roofserve.measure.peaks import measure_read_gb_s

    assert measure_read_gb_s(1 << 20, torch.device("cpu")) > 0 and measure_read_gb_s(64 << 20, torch.device("cpu")) > 0


def test_the_dram_buffer_is_several_times_the_cache():
    import os

    import torch

    from roofserve.machine import cache_bytes
    from roofserve.measure.peaks import dram_buffer_bytes

    size, cache = dram_buffer_bytes(torch.device("cpu")), cache_bytes() or 0
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert size >= 512 << 20 and (size >= 4 * cache or size >= memory // 8)  # 4x the cache, unless memory is short
    assert dram_buffer_bytes(torch.device("cuda")) == 2 << 30
