"""The engine at one row (one request at a time) and the transformers baseline against transformers' own
greedy generate, on the real default model."""

from functools import partial

import pytest
import torch

from roofserve.llm.baseline import transformers_tokens
from roofserve.llm.engine import OneAtATime
from roofserve.llm.sampling import Sampling
from tests.integration.conftest import alone, chat_ids, make_engine

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


def _engine(kind: str, model, prefill_chunk: int = 256):
    if kind == "engine":
        return make_engine(model, max_batch_size=1, max_seq_len=256, prefill_chunk=prefill_chunk)
    return OneAtATime(partial(transformers_tokens, model, prefill_chunk=prefill_chunk))


@pytest.mark.parametrize("kind", ["engine", "baseline"])
def test_greedy_tokens_match_transformers_generate(loaded, prompt, reference, kind):
    assert alone(_engine(kind, loaded.model), prompt, Sampling(max_new_tokens=24)) == reference


@pytest.mark.parametrize("kind", ["engine", "baseline"])
def test_a_prompt_prefilled_in_chunks_gives_transformers_tokens(loaded, prompt, reference, kind):
    """Chunks of 5 tokens (the prompt is longer than 3 of them, with a partial last one): each chunk
    attends to the cache the earlier ones wrote."""
    assert len(prompt) > 15 and len(prompt) % 5
    assert alone(_engine(kind, loaded.model, prefill_chunk=5), prompt, Sampling(max_new_tokens=24)) == reference


@pytest.mark.parametrize("kind", ["engine", "baseline"])
def test_seeded_sampling_is_reproducible_and_differs_by_seed(loaded, prompt, kind):
    engine = _engine(kind, loaded.model)
    runs = [alone(engine, prompt, Sampling(16, temperature=1.0, top_p=0.9, seed=s)) for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_one_at_a_time_runs_the_first_and_keeps_the_others_waiting(loaded, prompt, reference):
    """OneAtATime: a second sequence waits until the first has finished; a cancelled one never starts."""
    engine = _engine("baseline", loaded.model)
    for seq_id in ("a", "b", "c"):
        engine.add(seq_id, prompt, Sampling(max_new_tokens=3))
    engine.cancel("c")
    order = []
    while engine.has_work():
        order += engine.step()
    assert order == [*[("a", t) for t in reference[:3]], ("a", None), *[("b", t) for t in reference[:3]], ("b", None)]


def test_context_overflow_is_refused(loaded, prompt):
    engine = make_engine(loaded.model, max_batch_size=1, max_seq_len=len(prompt) + 4)
    with pytest.raises(ValueError, match="exceeds"):
        engine.add(0, prompt, Sampling(max_new_tokens=5))
