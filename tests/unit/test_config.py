import pytest

from roofserve.cli import build_parser
from roofserve.config import VisionConfig, as_dict, make_config
from roofserve.errors import UserError


def test_cli_flag_beats_file_beats_default():
    args = build_parser().parse_args(["serve", "vision", "--max-batch-size", "16", "--no-channels-last"])
    cli = {k: v for k, v in vars(args).items() if k in VisionConfig.__dataclass_fields__}
    cfg = make_config(VisionConfig, {"max_batch_size": 4, "precision": "bf16"}, cli)
    assert cfg.max_batch_size == 16 and cfg.precision == "bf16" and cfg.channels_last is False
    assert cfg.workers_per_device == VisionConfig().workers_per_device


@pytest.mark.parametrize(
    "layer, message",
    [
        ({"max_batch_sise": 4}, "unknown VisionConfig key 'max_batch_sise'"),
        ({"precision": "int3"}, "precision must be one of"),
        ({"max_batch_size": 0}, "max_batch_size must be >= 1"),
        ({"max_batch_size": "8"}, "max_batch_size must be int"),
        ({"port": 70000}, "port must be in"),
    ],
)
def test_bad_config_is_one_clear_error(layer, message):
    with pytest.raises(UserError, match=message):
        make_config(VisionConfig, layer)


def test_secrets_stay_out_of_result_files():
    assert as_dict(make_config(VisionConfig, {"api_key": "s3cret"}))["api_key"] == "***"


def test_llm_config_refuses_combinations_that_cannot_run():
    from roofserve.config import LLMConfig

    with pytest.raises(UserError, match="compile needs the static KV cache"):
        make_config(LLMConfig, {"compile": True, "static_cache": False})
    with pytest.raises(UserError, match="bnb4 runs eager"):
        make_config(LLMConfig, {"quantize": "bnb4", "compile": True})
    with pytest.raises(UserError, match="attention must be one of"):
        make_config(LLMConfig, {"attention": "flash"})
    with pytest.raises(UserError, match="gemv roofserve is for plain bf16 weights"):
        make_config(LLMConfig, {"gemv": "roofserve", "quantize": "int4"})
    with pytest.raises(UserError, match="attention roofserve is a bf16 kernel"):
        make_config(LLMConfig, {"attention": "roofserve", "precision": "fp32"})
    make_config(LLMConfig, {"gemv": "roofserve", "attention": "roofserve", "compile": True})


def test_user_mistakes_are_one_line_errors_not_tracebacks():
    import subprocess
    import sys

    cases = [
        (["serve", "llm", "--quantize", "bnb4", "--device", "cpu"], "bitsandbytes 4-bit needs a CUDA GPU"),
        (["serve", "llm", "--model", "random:gpt-9"], "unknown random config"),
        (["serve", "llm", "--lora", "random:many"], "needs a positive integer rank"),
        (["serve", "llm", "--lora", "/nope"], "no PEFT adapter"),
        (["serve", "llm", "--gemv", "roofserve", "--precision", "fp16"], "needs --precision bf16"),
        (["bench", "llm-engine", "--quantize", "bnb4", "--device", "cpu"], "bitsandbytes 4-bit needs a CUDA GPU"),
        (["bench", "llm-engine", "--device", "cuda"], "torch sees no GPU"),
        (["serve", "vision", "--weights", "/nope.pth"], "weights file not found"),
        (["serve", "vision", "--model", "not_a_model"], "unknown timm model"),
        (["serve", "vision", "--precision", "fp16", "--device", "cpu"], "fp16 is slow or unsupported on CPU"),
        (["report", "/nope"], "no result file or folder"),
    ]
    for args, message in cases:
        done = subprocess.run([sys.executable, "-m", "roofserve", *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (args, done.stderr[-500:])
        assert message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr[-500:])


@pytest.mark.parametrize("name", ["vision-cpu", "vision-gpu", "llm-cpu", "llm-gpu"])
def test_shipped_ladders_load_and_every_step_is_a_valid_config(name):
    """A typo in a shipped ladder would otherwise surface minutes into a sweep, at its step."""
    from pathlib import Path

    from roofserve.config import LLMConfig
    from roofserve.sweep.ladder import load_ladder

    path = Path(__file__).parents[2] / "experiments" / f"{name}.toml"
    steps = load_ladder(str(path), LLMConfig if name.startswith("llm") else VisionConfig).steps
    assert len(steps) >= 2 and len({s.name for s in steps}) == len(steps)
    assert all(s.why for s in steps), "every step says what it changes"
