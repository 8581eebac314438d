import os
from pathlib import Path

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
        ({"transport": "zmq"}, "transport must be one of"),
        ({"fast_queue": True}, "fast_queue is gone: LitServe 0.2.19 ignores it"),
        ({"engine": "ray"}, "engine is gone: where a server runs is now `platform"),
    ],
)
def test_bad_config_is_one_clear_error(layer, message):
    with pytest.raises(UserError, match=message):
        make_config(VisionConfig, layer)


def test_secrets_stay_out_of_result_files():
    assert as_dict(make_config(VisionConfig, {"api_key": "s3cret"}))["api_key"] == "***"


def test_a_key_never_goes_on_a_child_command_line():
    from roofserve.config import config_flags, secret_env

    cfg = make_config(VisionConfig, {"api_key": "hunter2"})
    assert "hunter2" not in config_flags(cfg) and "--api-key" not in config_flags(cfg)
    assert secret_env(cfg) == {"ROOFSERVE_API_KEY": "hunter2"}


def test_llm_config_refuses_combinations_that_cannot_run():
    from roofserve.config import LLMConfig

    with pytest.raises(UserError, match="compile needs the static KV cache"):
        make_config(LLMConfig, {"compile": True, "static_cache": False, "max_batch_size": 1})
    # knobs of the transformers baseline that would do nothing in our engine (the default) say so
    with pytest.raises(UserError, match="no-static-cache is transformers' decode, one request at a time"):
        make_config(LLMConfig, {"static_cache": False})
    for batch in (1, 4):
        with pytest.raises(UserError, match="attention sdpa is transformers' attention, for --no-static-cache"):
            make_config(LLMConfig, {"attention": "sdpa", "max_batch_size": batch})
    assert make_config(LLMConfig, {"static_cache": False, "attention": "eager", "max_batch_size": 1}).attention == "eager"
    with pytest.raises(UserError, match="bnb4 runs eager"):
        make_config(LLMConfig, {"quantize": "bnb4", "compile": True})
    with pytest.raises(UserError, match="attention must be one of"):
        make_config(LLMConfig, {"attention": "flash"})
    with pytest.raises(UserError, match="gemv roofserve is for plain bf16 weights"):
        make_config(LLMConfig, {"gemv": "roofserve", "quantize": "int4"})
    with pytest.raises(UserError, match="attention roofserve is a bf16 kernel"):
        make_config(LLMConfig, {"attention": "roofserve", "precision": "fp32"})
    with pytest.raises(UserError, match="max-batch-size > 1 is continuous batching"):
        make_config(LLMConfig, {"backend": "llamacpp", "max_batch_size": 4})
    with pytest.raises(UserError, match="compile-prefill compiles our engine's prefill"):
        make_config(LLMConfig, {"compile_prefill": True, "static_cache": False, "max_batch_size": 1})
    assert make_config(LLMConfig, {"compile_prefill": True, "max_batch_size": 1}).compile_prefill
    with pytest.raises(UserError, match="prefill_chunk must be >= 1"):
        make_config(LLMConfig, {"max_batch_size": 4, "prefill_chunk": 0})
    with pytest.raises(UserError, match="gemv_rows must be >= 0"):
        make_config(LLMConfig, {"gemv": "roofserve", "gemv_rows": -1})
    make_config(LLMConfig, {"gemv": "roofserve", "attention": "roofserve", "compile": True})
    make_config(LLMConfig, {"backend": "llama-server", "max_batch_size": 8})


def test_bench_settings_are_configs_with_the_same_clear_errors():
    from roofserve.config import LLMLoadConfig, VisionLoadConfig

    assert make_config(VisionLoadConfig).concurrency == [1, 8, 32, 64]  # the one default, wherever it is used
    assert make_config(LLMLoadConfig, {"concurrency": 4}).concurrency == [4]  # one level where a list is expected
    with pytest.raises(UserError, match="payload must be one of"):
        make_config(VisionLoadConfig, {"payload": "xml"})
    with pytest.raises(UserError, match="concurrency must be a list of int"):
        make_config(LLMLoadConfig, {"concurrency": ["many"]})
    with pytest.raises(UserError, match="unknown LLMLoadConfig key 'rounds'"):
        make_config(LLMLoadConfig, {"rounds": 3})  # a ladder key is not a plain load key


def test_a_ladder_typo_names_the_step_and_the_key(tmp_path):
    from roofserve.sweep.ladder import load_ladder

    path = tmp_path / "ladder.toml"
    path.write_text('[bench]\nrequests = 4\n[[step]]\nname = "one"\n[[step]]\nname = "two"\n'
                    'server = { max_batch_sise = 4 }\n')
    with pytest.raises(UserError, match="step 'two' in .*unknown VisionConfig key 'max_batch_sise'"):
        load_ladder(str(path))
    path.write_text('[bench]\nrequest = 4\n[[step]]\nname = "one"\n')
    with pytest.raises(UserError, match=r"\[bench\]: unknown VisionLoadConfig key 'request'"):
        load_ladder(str(path))


def test_a_ladder_key_that_does_nothing_where_it_is_set_is_refused(tmp_path):
    """`rounds` alternates served and in-process runs: with engine = false it used to be accepted and do
    nothing (a ladder of ours claimed A B A B that way and ran A B)."""
    from roofserve.config import LLMConfig
    from roofserve.sweep.ladder import load_ladder

    path = tmp_path / "ladder.toml"
    path.write_text('[bench]\nrounds = 2\nengine = false\n[[step]]\nname = "A"\n[[step]]\nname = "B"\n')
    with pytest.raises(UserError, match=r"\[bench\]: rounds only apply with engine = true.*repeat"):
        load_ladder(str(path), LLMConfig)
    path.write_text('[bench]\nengine = true\n[[step]]\nname = "A"\n'
                    '[[step]]\nname = "B"\nengine = false\nprompt_lengths = [64]\n')
    with pytest.raises(UserError, match="step 'B' in .*: prompt_lengths only apply with engine = true"):
        load_ladder(str(path), LLMConfig)
    # where some step runs in-process, [bench]'s rounds do something (for that step)
    path.write_text('[bench]\nrounds = 2\n[[step]]\nname = "A"\n[[step]]\nname = "B"\nengine = false\n')
    assert [s.bench.rounds for s in load_ladder(str(path), LLMConfig).steps] == [2, 2]


def test_ladder_steps_are_cumulative_and_repeat_starts_from_an_earlier_step(tmp_path):
    """A B A B: without `repeat` the second A would keep B's change (that is how two of our own A/B runs
    compared B with B)."""
    from roofserve.config import LLMConfig
    from roofserve.sweep.ladder import load_ladder

    path = tmp_path / "ladder.toml"
    path.write_text('[server]\nmax_batch_size = 1\n'
                    '[[step]]\nname = "A"\n'
                    '[[step]]\nname = "B"\nserver = { max_batch_size = 8, compile_prefill = true }\n'
                    '[[step]]\nname = "B, chunk 64"\nserver = { prefill_chunk = 64 }\n'
                    '[[step]]\nname = "A again"\nrepeat = "A"\n'
                    '[[step]]\nname = "A, chunk 32"\nserver = { prefill_chunk = 32 }\n'
                    '[[step]]\nname = "B again"\nrepeat = "B"\n')
    steps = {s.name: s.config for s in load_ladder(str(path), LLMConfig).steps}
    assert [(c.max_batch_size, c.compile_prefill, c.prefill_chunk) for c in steps.values()] == [
        (1, False, 256), (8, True, 256), (8, True, 64), (1, False, 256), (1, False, 32), (8, True, 256)]
    path.write_text('[[step]]\nname = "A"\n[[step]]\nname = "B"\nrepeat = "C"\n')
    with pytest.raises(UserError, match="step 'B' in .*repeat = 'C' names no step before it"):
        load_ladder(str(path), LLMConfig)


def test_user_mistakes_are_one_line_errors_not_tracebacks():
    import concurrent.futures
    import subprocess
    import sys

    cases = [
        (["serve", "llm", "--quantize", "bnb4", "--device", "cpu"], "bitsandbytes 4-bit needs a CUDA GPU"),
        (["serve", "llm", "--model", "random:gpt-9"], "unknown random config"),
        (["serve", "llm", "--lora", "random:many"], "needs a positive integer rank"),
        (["serve", "llm", "--lora", "/nope"], "no PEFT adapter"),
        (["serve", "llm", "--gemv", "roofserve", "--precision", "fp16"], "needs --precision bf16"),
        (["serve", "llm", "--backend", "llamacpp", "--max-batch-size", "4"], "max-batch-size > 1 is continuous"),
        (["bench", "llm", "--concurrency", "1,x"], "expected comma-separated int values"),
        (["bench", "llm-engine", "--quantize", "bnb4", "--device", "cpu"], "bitsandbytes 4-bit needs a CUDA GPU"),
        (["bench", "llm-engine", "--device", "cuda"], "torch sees no GPU"),
        (["serve", "vision", "--weights", "/nope.pth"], "weights file not found"),
        (["serve", "vision", "--model", "not_a_model"], "unknown timm model"),
        (["serve", "vision", "--precision", "fp16", "--device", "cpu"], "fp16 is slow or unsupported on CPU"),
        (["report", "/nope"], "no result file or folder"),
        (["serve", "vision", "--api-key-file", "/nope"], "api_key_file not found"),
        (["serve", "vision", "--platform", "spark"], "platform must be one of litserve, ray"),
        (["serve", "vision", "--platform", "ray", "--ray-replicas", "3", "--ray-max-replicas", "2"],
         "ray_max_replicas must be 0 (fixed) or >= ray_replicas"),
    ]

    def run(args):
        return subprocess.run([sys.executable, "-m", "roofserve", *args], capture_output=True, text=True, timeout=180)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # each mostly imports: overlap them
        runs = list(pool.map(run, [args for args, _ in cases]))
    for (args, message), done in zip(cases, runs):
        assert done.returncode == 2, (args, done.stderr[-500:])
        assert message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr[-500:])


def test_the_api_key_comes_from_the_flag_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("ROOFSERVE_API_KEY", raising=False)
    assert make_config(VisionConfig).resolved_api_key() is None
    monkeypatch.setenv("ROOFSERVE_API_KEY", "from-env")
    assert make_config(VisionConfig).resolved_api_key() == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert make_config(VisionConfig, {"api_key_file": str(key_file)}).resolved_api_key() == "from-file"
    assert make_config(VisionConfig, {"api_key": "flag", "api_key_file": str(key_file)}).resolved_api_key() == "flag"
    key_file.write_text("\n")
    with pytest.raises(UserError, match="is empty"):
        make_config(VisionConfig, {"api_key_file": str(key_file)}).resolved_api_key()


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[2] / "experiments").glob("*.toml")))
def test_shipped_ladders_load_and_every_step_is_a_valid_config(name):
    """A typo in a shipped ladder would otherwise surface minutes into a sweep, at its step."""
    from roofserve.config import LLMConfig
    from roofserve.sweep.ladder import load_ladder

    path = Path(__file__).parents[2] / "experiments" / f"{name}.toml"
    steps = load_ladder(str(path), LLMConfig if name.startswith("llm") else VisionConfig).steps
    assert len(steps) >= 2 and len({s.name for s in steps}) == len(steps)
    assert all(s.why for s in steps), "every step says what it changes"


def test_llama_server_backend_checks_our_api_key_and_keeps_it_off_its_command_line(tmp_path):
    """`serve llm --backend llama-server --api-key-file F` execs llama-server with the key in its
    environment (which it reads as LLAMA_API_KEY), never in argv. The binary is a stand-in that records
    what it was given: the real one is built only by `make llama-server`."""
    import os
    import subprocess
    import sys

    record, fake, key = tmp_path / "seen", tmp_path / "llama-server", tmp_path / "key"
    fake.write_text(f'#!/bin/sh\necho "$LLAMA_API_KEY" > {record}\necho "$*" >> {record}\n')
    fake.chmod(0o755)
    key.write_text("s3cret-key\n")
    env = {**os.environ, "ROOFSERVE_LLAMA_SERVER": str(fake)}
    subprocess.run([sys.executable, "-m", "roofserve", "serve", "llm", "--backend", "llama-server",
                    "--api-key-file", str(key)], env=env, check=True, timeout=120, capture_output=True)
    seen_key, argv = record.read_text().splitlines()
    assert seen_key == "s3cret-key" and "s3cret" not in argv and "--parallel" in argv


def test_compiled_graphs_are_kept_with_roofserves_caches_unless_the_user_says_where(monkeypatch, tmp_path):
    from roofserve.config import inductor_cache

    monkeypatch.setenv("ROOFSERVE_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert inductor_cache() == str(tmp_path / "inductor") == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    assert inductor_cache() == "/elsewhere"
