"""In-process fixtures: the bundled chat model, loaded once for every module that needs it."""

import pytest
import torch

from roofserve.llm.model import load


def chat_ids(tokenizer, question: str) -> list[int]:
    """The prompt ids of one user message through the model's chat template."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def first_layers(model, n: int):
    """The model cut, in place, to its first n decoder layers, for tests that torch.compile it: compiling
    grows with the layers (all 30 of SmolLM2 took 90 s on a slow day of this VM), and what a kernel must
    match, it must match in every layer alike."""
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]
    return model


@pytest.fixture(scope="session")
def fp32_model():
    """SmolLM2-135M-Instruct from the bundled GGUF, fp32 (shared: tests must not change its weights)."""
    torch.set_num_threads(2)
    return load("default", "fp32")


def alone(engine, prompt: list[int], sampling) -> list[int]:
    """One sequence's tokens through an engine (llm.engine.Engine or OneAtATime) with nothing else running."""
    engine.add("alone", prompt, sampling)
    out = []
    while engine.has_work():
        out += [token for _, token in engine.step() if token is not None]
    return out


def make_engine(model, **knobs):
    """Our engine over `model`, configured as `roofserve serve llm` would be with these LLMConfig knobs
    (max_batch_size=4, max_seq_len=256, attention="roofserve", ...), the rest at their defaults."""
    from roofserve.config import LLMConfig, make_config
    from roofserve.llm.engine import Engine

    return Engine(model, make_config(LLMConfig, knobs))
