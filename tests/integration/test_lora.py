"""A LoRA adapter applied unmerged (the reference deployment's row) on the real default model, on CPU."""

import torch
from peft import LoraConfig, get_peft_model

from roofserve.config import LLMConfig
from roofserve.llm.model import load
from roofserve.llm.runtime import LORA_TARGETS, TorchGenerator
from tests.integration.conftest import chat_ids

QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


def test_adapter_folder_is_applied_as_transformers_applies_it(tmp_path):
    torch.set_num_threads(2)
    loaded = load("default", "fp32")
    ids = chat_ids(loaded.tokenizer, QUESTION[0]["content"])  # what the generator's prompt_ids gives

    # an adapter folder as a user brings it (trained elsewhere; random here, with B != 0 so that it acts)
    torch.manual_seed(0)
    reference = get_peft_model(loaded.model,
                               LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights=False))
    reference.save_pretrained(tmp_path)
    adapted = TorchGenerator(LLMConfig(precision="fp32", max_batch_size=1, max_seq_len=256, lora=str(tmp_path)), "cpu")
    assert adapted.prompt_ids(QUESTION) == ids
    ours = list(adapted.tokens(ids, 12, ignore_eos=True))

    def greedy() -> list[int]:
        out = reference.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        return out[0, len(ids):].tolist()

    assert ours == greedy()
    with reference.disable_adapter():
        assert ours != greedy(), "the adapter must change the answer"


def test_random_rank_adapter_serves_tokens():
    generator = TorchGenerator(LLMConfig(precision="bf16", max_batch_size=1, max_seq_len=128, lora="random:4"), "cpu")
    tokens = list(generator.tokens(generator.prompt_ids(QUESTION), 6, ignore_eos=True))
    assert len(tokens) == 6
