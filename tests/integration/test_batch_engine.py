"""The continuous-batching engine on the real default model: each request's tokens are the same
whether it ran alone or among others that joined and left mid-run, and per-request settings stay
per request."""

import pytest
import torch

from roofserve.llm.engine import Engine, buckets
from roofserve.llm.sampling import Sampling
from roofserve.llm.model import load
from tests.integration.conftest import alone as run_alone
from tests.integration.conftest import chat_ids, first_layers, make_engine

QUESTIONS = ["Name three colours of the rainbow.", "What is 2+2?", "Write a haiku about the sea, please, in English.",
             "Hi"]


@pytest.fixture(scope="module")
def loaded(fp32_model):
    return fp32_model


@pytest.fixture(scope="module")
def prompts(loaded):
    out = [chat_ids(loaded.tokenizer, q) for q in QUESTIONS]
    assert len({len(p) for p in out}) >= 3, "prompts of different lengths"
    return out


@pytest.fixture(scope="module")
def alone(loaded, prompts):
    """Greedy tokens of each prompt run alone, one at a time (the engine at one row)."""
    engine = make_engine(loaded.model, max_batch_size=1, max_seq_len=256)
    return [run_alone(engine, p, Sampling(20, 0.0)) for p in prompts]


def _run(engine: Engine, schedule: dict[int, list[tuple]], cancel_at: dict[int, int] | None = None) -> dict:
    """Step until done; schedule: step -> [(id, prompt, sampling)] added before that step."""
    out, step = {}, 0
    while engine.has_work() or any(s >= step for s in schedule):
        for seq_id, prompt, sampling in schedule.get(step, []):
            engine.add(seq_id, prompt, sampling)
            out[seq_id] = []
        for seq_id, at in (cancel_at or {}).items():
            if at == step:
                engine.cancel(seq_id)
        for seq_id, token in engine.step():
            if token is not None:
                out[seq_id].append(token)
        step += 1
    return out


def _tiny_llama() -> torch.nn.Module:
    """A small random Llama (fp32), so that compiling takes seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def _prefills(compiled: Engine, eager: Engine, cases: list[tuple[int, int, int]]):
    """For each (length, start, slot): the case, the compiled prefill's logits and the eager one's, of
    the same random chunk."""
    for length, start, slot in cases:
        ids = torch.randint(0, 512, (length,))
        yield (length, start, slot), compiled._compiled_prefill(ids, start + 2, torch.tensor([slot])), \
            eager.slots.prefill(ids, start, slot)


def test_fp32_greedy_tokens_are_the_same_alone_or_among_others(loaded, prompts, alone):
    engine = make_engine(loaded.model, max_batch_size=4, max_seq_len=256, prefill_chunk=16)  # prompts span chunks
    greedy = Sampling(20, 0.0)
    schedule = {0: [(0, prompts[0], greedy), (1, prompts[1], greedy)], 5: [(2, prompts[2], greedy)],
                9: [(3, prompts[3], greedy)]}
    out = _run(engine, schedule)
    assert [out[i] for i in range(4)] == alone
    assert not engine.running and sorted(engine.free) == [0, 1, 2, 3], "every slot is free again"


def test_more_requests_than_slots_wait_and_then_run(loaded, prompts, alone):
    engine = make_engine(loaded.model, max_batch_size=2, max_seq_len=256)
    greedy = Sampling(20, 0.0)
    out, most = {}, 0
    for i in range(4):
        engine.add(i, prompts[i], greedy)
        out[i] = []
    while engine.has_work():
        for seq_id, token in engine.step():
            if token is not None:
                out[seq_id].append(token)
        most = max(most, len(engine.running))
        assert len(engine.running) + len(engine.waiting) <= 4
    assert most == 2, "never more running than slots"
    assert [out[i] for i in range(4)] == alone


def test_cancelling_one_sequence_leaves_the_others_unchanged(loaded, prompts, alone):
    engine = make_engine(loaded.model, max_batch_size=4, max_seq_len=256)
    greedy = Sampling(20, 0.0)
    out = _run(engine, {0: [(i, prompts[i], greedy) for i in range(3)]}, cancel_at={1: 6})
    assert out[0] == alone[0] and out[2] == alone[2]
    assert 0 < len(out[1]) < 20 and out[1] == alone[1][: len(out[1])]


def test_per_request_limits_and_seeds(loaded, prompts, alone):
    engine = make_engine(loaded.model, max_batch_size=4, max_seq_len=256)
    out = _run(engine, {0: [("short", prompts[0], Sampling(3, 0.0)), ("long", prompts[1], Sampling(20, 0.0)),
                            ("seed a", prompts[2], Sampling(12, 1.0, seed=7)),
                            ("seed b", prompts[2], Sampling(12, 1.0, seed=7)),
                            ]})
    assert out["short"] == alone[0][:3] and out["long"] == alone[1]
    assert out["seed a"] == out["seed b"] and len(out["seed a"]) == 12  # the same seed, the same text
    other = _run(make_engine(loaded.model, max_batch_size=4, max_seq_len=256),
                 {0: [("seed c", prompts[2], Sampling(12, 1.0, seed=8))]})
    assert other["seed c"] != out["seed a"]


def test_a_stop_id_ends_only_its_own_sequence(loaded, prompts, alone):
    stop = alone[1][5]
    engine = make_engine(loaded.model, max_batch_size=4, max_seq_len=256)
    engine.add("stop", prompts[1], Sampling(20, 0.0), stop_ids={stop})
    engine.add("other", prompts[0], Sampling(20, 0.0))
    out = {"stop": [], "other": []}
    while engine.has_work():
        for seq_id, token in engine.step():
            if token is not None:
                out[seq_id].append(token)
    assert out["stop"] == alone[1][:alone[1].index(stop)] and out["other"] == alone[0]


def test_a_prompt_that_does_not_fit_is_refused(loaded):
    engine = make_engine(loaded.model, max_batch_size=2, max_seq_len=64)
    with pytest.raises(ValueError, match="exceeds 64"):
        engine.add(0, [1] * 60, Sampling(8, 0.0))


def test_buckets_are_powers_of_two_up_to_the_batch():
    assert buckets(1) == [1] and buckets(8) == [1, 2, 4, 8] and buckets(12) == [1, 2, 4, 8, 12]


def test_warm_up_runs_the_decode_step_at_every_bucket(loaded):
    """A compiled engine must meet every bucket at warm-up: one first met while serving compiles then."""
    engine = make_engine(loaded.model, max_batch_size=4, max_seq_len=64)
    seen = []
    decode = engine._decode
    engine._decode = lambda tokens, *rest: seen.append(len(tokens)) or decode(tokens, *rest)
    engine.warm_up()
    assert {1, 2, 4} <= set(seen) and not engine.has_work() and sorted(engine.free) == [0, 1, 2, 3]


def test_dense_compiled_steps_pad_to_buckets_and_promise_no_compile_cache():
    """A dense model on CPU compiles with frozen weights, a graph per bucket of rows, which inductor does not
    cache: the server must not tell the user that later starts reuse them. Eager, steps run unpadded."""
    model = _tiny_llama()
    compiled = make_engine(model, max_batch_size=8, max_seq_len=64, compile=True, attention="auto")
    assert compiled.buckets == [1, 2, 4, 8] and not compiled.compile_cached
    eager = make_engine(model, max_batch_size=8, max_seq_len=64, attention="auto")
    assert eager.buckets == list(range(1, 9)) and eager.compile_cached


def test_bf16_with_kernels_and_compile_follows_torch_bf16(prompts):
    """Teacher-forced: the compiled batch with roofserve's GEMM and slot-attention kernels gives the
    logits of the plain torch bf16 batch (eager, SDPA, torch matmuls) within bf16's tolerance, at a
    batch of 2 sequences of different lengths (one compiled graph: the bucket of 2 rows). The first 6
    layers of the model (first_layers)."""
    from roofserve.llm.kernels import load_kernel, use_gemv_kernel

    load_kernel()
    plain = make_engine(first_layers(load("default", "bf16").model, 6), max_batch_size=2, max_seq_len=128)
    fast_model = first_layers(load("default", "bf16").model, 6)  # compiling all 30 layers took 90 s
    use_gemv_kernel(fast_model, max_rows=16)  # 2-row steps through our GEMM kernel
    fast = make_engine(fast_model, max_batch_size=2, max_seq_len=128, compile=True, attention="roofserve")
    for engine in (plain, fast):  # both prompts prefilled by hand, so that only the 2-row step compiles
        engine.add(0, prompts[0], Sampling(12, 0.0))
        engine.add(1, prompts[3], Sampling(12, 0.0))
        engine.admit()
        for seq in engine.running.values():
            with torch.inference_mode():
                logits = plain.slots.prefill(torch.tensor(seq.prompt), 0, seq.slot) if engine is plain else \
                    fast.slots.prefill(torch.tensor(seq.prompt), 0, seq.slot)
            seq.filled, seq.token, seq.generated = len(seq.prompt), int(logits.argmax()), 1
    for _ in range(6):  # feed both engines the same tokens, compare the logits of every decode step
        rows = list(plain.running.values())
        tokens = torch.tensor([s.token for s in rows])
        positions = torch.tensor([len(s.prompt) + s.generated - 1 for s in rows])
        slots = torch.tensor([s.slot for s in rows])
        with torch.inference_mode():
            want, _ = plain.slots.decode(tokens, positions, slots)
            got, _ = fast._decode(tokens, positions, slots)
        assert (got - want).abs().max() < 0.05 * want.abs().max()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.5
        for i, s in enumerate(rows):  # advance both by the plain engine's greedy choice
            s.generated, s.token = s.generated + 1, int(want[i].argmax())
            fast.running[s.id].generated, fast.running[s.id].token = s.generated, s.token


def test_compiled_prefill_is_one_graph_for_every_chunk_length_start_and_slot(caplog):
    """--compile-prefill: after warm-up, one graph (dynamic shapes) prefills chunks of any length, start
    and slot with the eager prefill's logits and cache entries, and the engine's greedy tokens are the
    eager engine's; nothing compiles again while serving (a recompile would stall every user for
    minutes). A small random Llama, fp32, so that compiling takes seconds."""
    from torch._dynamo.utils import counters

    model = _tiny_llama()
    eager = make_engine(model, max_batch_size=4, max_seq_len=128, prefill_chunk=16)
    compiled = make_engine(model, max_batch_size=4, max_seq_len=128, prefill_chunk=16, compile_prefill=True)
    with caplog.at_level("INFO", logger="roofserve.llm.engine"):
        compiled.warm_up()
    assert "compiling the prefill step" in caplog.text  # what a user waits for, said before it starts
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for (length, start, slot), got, want in _prefills(compiled, eager, [(5, 0, 0), (20, 0, 1), (7, 16, 3),
                                                                            (30, 40, 2)]):
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (length, start, slot)
            for ours, theirs in zip(compiled.slots.caches(1), eager.slots.caches(1)):
                assert torch.allclose(ours[slot, :, start:start + length], theirs[slot, :, start:start + length],
                                      atol=1e-5)
    prompts = [list(torch.randint(0, 512, (n,)).tolist()) for n in (40, 9, 23)]  # chunks of 16, 8, 7 and 9 tokens
    greedy = Sampling(8, 0.0)
    outs = [_run(engine, {0: [(0, prompts[0], greedy)], 2: [(1, prompts[1], greedy), (2, prompts[2], greedy)]})
            for engine in (eager, compiled)]
    assert outs[0] == outs[1] and all(len(t) == 8 for t in outs[1].values())
    assert counters["stats"]["unique_graphs"] == graphs, "nothing compiled after warm-up"


def test_logprobs_are_the_models_own_teacher_forced_and_agree_across_engines(loaded, prompts):
    """Sampling.observe sees the logits each token came from: both engines report, for every token,
    the log-probability a plain forward over prompt + the tokens before it gives (fp32)."""
    from roofserve.llm.sampling import scorer

    prompt = prompts[1]
    one, batched = [], []
    tokens = run_alone(make_engine(loaded.model, max_batch_size=1, max_seq_len=256), prompt,
                       Sampling(6, 1.0, seed=5, observe=scorer(3, one)))
    engine = make_engine(loaded.model, max_batch_size=2, max_seq_len=256, prefill_chunk=16)
    sampling = Sampling(6, 1.0, seed=5, observe=scorer(3, batched))
    out = _run(engine, {0: [(0, prompts[0], Sampling(6, 0.0)), (1, prompt, sampling)]})
    assert out[1] == tokens and [t for t, _, _ in one] == tokens == [t for t, _, _ in batched]
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt + tokens])).logits[0].float()
    expected = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)  # the position before each token
    for i, token in enumerate(tokens):
        for record in (one[i], batched[i]):
            assert record[1] == pytest.approx(float(expected[i, token]), abs=1e-3)
            top = torch.topk(expected[i], 3)
            assert [t for t, _ in record[2]] == top.indices.tolist()


def test_compiled_bf16_prefill_through_our_kernel_is_one_graph_too():
    """Where our GEMM kernel takes every chunk length (GemvLinear's max_rows >= the chunk, as with AMX),
    the compiled prefill starts at 2 tokens and one graph with the kernel inside prefills every chunk
    length, start and slot with the eager bf16 prefill's logits (within bf16's tolerance: inductor fuses
    the small ops in fp32). A small random Llama whose shapes pack (multiples of 16)."""
    from torch._dynamo.utils import counters

    from roofserve.llm.kernels import load_kernel, use_gemv_kernel

    load_kernel()
    model = _tiny_llama().bfloat16()
    assert use_gemv_kernel(model, max_rows=16) == 2 * 7 + 1
    eager = make_engine(model, max_batch_size=4, max_seq_len=128, prefill_chunk=16)
    compiled = make_engine(model, max_batch_size=4, max_seq_len=128, prefill_chunk=16, compile_prefill=True)
    assert compiled.compiled_prefill_min == 2
    assert make_engine(model, max_batch_size=2, max_seq_len=64, prefill_chunk=32).compiled_prefill_min == 17
    compiled.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for case, got, want in _prefills(compiled, eager, [(2, 0, 0), (16, 0, 1), (7, 16, 3), (11, 40, 2)]):
            assert (got - want).abs().max() < 0.05 * want.abs().max(), case
    assert counters["stats"]["unique_graphs"] == graphs, "nothing compiled after warm-up"


def test_the_slot_cache_takes_memory_only_as_far_as_it_is_written():
    """zeros_on_demand: 256 MB of zeros cost no resident memory until written, then about what was written."""
    from roofserve.llm.engine import zeros_on_demand

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) / 1024

    before = rss_mb()
    cache = zeros_on_demand((16, 8, 1024, 1024), torch.bfloat16, torch.device("cpu"))  # 256 MiB
    assert rss_mb() - before < 16
    cache[:2].fill_(1.0)  # two slots: 32 MiB
    grown = rss_mb() - before
    assert 28 < grown < 60, grown
    assert bool((cache[:2] == 1).all()) and not cache[2:4].any()
