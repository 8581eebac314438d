"""Our decode loop against transformers' own greedy generate, on the real default model."""

import pytest
import torch

from roofserve.llm.engine import Engine, Sampling
from tests.integration.conftest import chat_ids

QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def loaded(fp32_model):
    return fp32_model


@pytest.fixture(scope="module")
def prompt(loaded):
    return chat_ids(loaded.tokenizer, QUESTION[0]["content"])


@pytest.fixture(scope="module")
def reference(loaded, prompt):
    out = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("static_cache", [True, False])
def test_greedy_tokens_match_transformers_generate(loaded, prompt, reference, static_cache):
    engine = Engine(loaded.model, max_seq_len=256, static_cache=static_cache)
    ours = list(engine.generate(prompt, Sampling(max_new_tokens=24)))
    assert ours == reference


@pytest.mark.parametrize("static_cache", [True, False])
def test_a_prompt_prefilled_in_chunks_gives_transformers_tokens(loaded, prompt, reference, static_cache):
    """Chunks of 5 tokens (the prompt is longer than 3 of them, with a partial last one): each chunk
    attends to the cache the earlier ones wrote."""
    assert len(prompt) > 15 and len(prompt) % 5
    engine = Engine(loaded.model, max_seq_len=256, static_cache=static_cache, prefill_chunk=5)
    assert list(engine.generate(prompt, Sampling(max_new_tokens=24))) == reference


def test_seeded_sampling_is_reproducible_and_differs_by_seed(loaded, prompt):
    engine = Engine(loaded.model, max_seq_len=256)
    runs = [list(engine.generate(prompt, Sampling(16, temperature=1.0, top_p=0.9, seed=s))) for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_context_overflow_is_refused(loaded, prompt):
    engine = Engine(loaded.model, max_seq_len=len(prompt) + 4)
    with pytest.raises(ValueError, match="exceeds"):
        list(engine.generate(prompt, Sampling(max_new_tokens=5)))
