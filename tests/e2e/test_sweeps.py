"""Tiny ladders end to end: real servers, real load, a report whose numbers come from the rows."""

import json
import os
import subprocess
import sys

import pytest

from roofserve.report.markdown import format_value


def _roofserve(*args: str, timeout: int = 900, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "roofserve", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


TINY_VISION_LADDER = (
    '[bench]\nconcurrency = [1, 4]\nrequests = 24\nwarmup = 2\npayload = "base64"\n'
    '[model]\nruntimes = ["torch", "openvino"]\nprecisions = ["fp32"]\nbatch_sizes = [1, 4]\nrounds = 2\n'
    'pipeline_batch_sizes = [4]\npipeline_runtime = "torch"\npipeline_precision = "fp32"\n'
    "min_time_s = 0.2\n"
    '[server]\nworkers_per_device = 1\nmax_batch_size = 1\nprecision = "fp32"\n'
    '[[step]]\nname = "one"\n[[step]]\nname = "two"\nserver = { max_batch_size = 4 }\npayload = "raw"\n'
)


def test_vision_sweep_of_two_steps_writes_rows_and_report(tmp_path):
    ladder = tmp_path / "ladder.toml"
    ladder.write_text(TINY_VISION_LADDER)
    out = tmp_path / "sweep.json"
    # a server key from the environment: each step's server requires it, and the load sends it
    _roofserve("sweep", "vision", str(ladder), "--out", str(out), "--report", str(tmp_path / "report"),
               env={"ROOFSERVE_API_KEY": "vision-sweep-key"})
    rows = json.loads(out.read_text())["rows"]
    api = [r for r in rows if r["kind"] == "vision-api"]
    assert [(r["step"], r["concurrency"]) for r in api] == [("one", 1), ("one", 4), ("two", 1), ("two", 4)]
    assert all(r["errors"] == 0 and r["ok"] == 24 for r in api)
    assert api[2]["config"]["max_batch_size"] == 4 and api[2]["payload"] == "raw"
    for r in api:  # the server's own CPU per request, by process role (the client is not in it)
        split = r["cpu_ms_per_request"]
        assert split["inference workers"] > 0 and split["server processes (main, HTTP, queues)"] > 0, split
    meta = json.loads(out.read_text())["meta"]
    assert meta["versions"]["torch"] and meta["machine"]["cores"]
    model = [(r["runtime"], r["batch_size"], len(r["rounds_img_per_s"])) for r in rows if r["kind"] == "vision-model"]
    assert model == [("torch", 1, 2), ("torch", 4, 2), ("openvino", 1, 2), ("openvino", 4, 2)]
    guard = [(r["runtime"], r["precision"], r["passed"]) for r in rows if r["kind"] == "vision-accuracy"]
    assert guard == [("torch", "fp32", True), ("openvino", "fp32", True)]
    assert {r["lanes"] for r in rows if r["kind"] == "vision-pipeline"} == {1, 2}
    assert len([r for r in rows if r["kind"] == "vision-decode"]) == 6
    report = (tmp_path / "report" / "report.md").read_text()
    best_two = max(r["req_per_s"] for r in api if r["step"] == "two")
    assert f"| two | {format_value(best_two)} |" in report  # as the report prints it, however fast the machine
    assert "| openvino fp32 |" in report and "pass: top-1 20/20" in report
    assert "### Where the CPU goes" in report and "| inference workers |" in report
    for png in ("vision_throughput.png", "vision_latency.png", "vision_model.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000


def test_llm_sweep_of_two_steps_writes_rows_and_report(tmp_path):
    ladder, key = tmp_path / "ladder.toml", tmp_path / "key"
    key.write_text("llm-sweep-key\n")
    ladder.write_text(
        "[bench]\nruns = 2\nrounds = 2\nmax_tokens = 8\nprompt_lengths = [16]\n"
        '[server]\nmax_seq_len = 256\nprecision = "fp32"\nstatic_cache = false\nmax_batch_size = 1\n'
        f'api_key_file = "{key}"\n'  # the servers require the key in this file, and the load sends it
        '[[step]]\nname = "fp32"\n[[step]]\nname = "bf16 kernels"\n'
        'server = { precision = "bf16", static_cache = true, gemv = "roofserve", attention = "roofserve", '
        'stream_interval = 4 }\n'
    )
    out = tmp_path / "llm.json"
    _roofserve("sweep", "llm", str(ladder), "--out", str(out), "--report", str(tmp_path / "report"))
    rows = json.loads(out.read_text())["rows"]
    api = [r for r in rows if r["kind"] == "llm-api"]
    assert [r["step"] for r in api] == ["fp32", "bf16 kernels"]
    assert all(r["ok"] == 2 and r["fixed_length_verified"] and r["output_tokens_mean"] == 8 for r in api)
    assert api[0]["weight_format"] == "fp32" and api[1]["weight_format"] == "bf16"
    assert api[0]["weight_bytes_per_token"] == 2 * api[1]["weight_bytes_per_token"]
    # 8 tokens, the first alone: 1 + 4 + 3 per message with stream_interval 4
    assert api[0]["tokens_per_message"] == 1.0 and api[1]["tokens_per_message"] == pytest.approx(8 / 3, abs=0.01)
    engine = [(r["step"], r["prompt"]) for r in rows if r["kind"] == "llm-engine"]
    assert engine == [("fp32", "16 tokens"), ("fp32", "chat"), ("bf16 kernels", "16 tokens"), ("bf16 kernels", "chat")]
    chat = [r for r in rows if r["kind"] == "llm-engine" and r["prompt"] == "chat"]
    assert chat[0]["prompt_tokens"] == api[0]["prompt_tokens"], "in-process TTFT is measured on the served prompt"
    # served and in-process alternate in 2 rounds, each with its own bandwidth measurement
    assert all(len(r["rounds_decode_tokens_per_s"]) == 2 and len(r["rounds_bandwidth_gb_s"]) == 2 for r in api + chat)
    # the step with our GEMV kernel is compared with that kernel's own rate, measured in its rounds
    assert "kernel_gemv_gb_s" not in api[0] and api[1]["kernel_gemv_gb_s"] > 0
    # TTFT against the prefill roof: each step's precision has its own measured matmul peak
    assert {p["name"] for p in rows if p["kind"] == "peak" and p["resource"] == "matmul"} == {"fp32", "bf16"}
    assert all(r["prefill_roof_ms"] > 0 and r["prefill_compute_roof_ms"] > 0 for r in api + chat)
    matmul = {p["name"]: p["value"] for p in rows if p["kind"] == "peak" and p["resource"] == "matmul"}
    assert (api[0]["prefill_matmul_tflops"], api[1]["prefill_matmul_tflops"]) == (matmul["fp32"], matmul["bf16"])
    report = (tmp_path / "report" / "report.md").read_text()
    [row] = [line for line in report.splitlines() if line.startswith("| bf16 kernels | bf16 |")]
    assert f"| {format_value(api[1]['decode_tokens_per_s'])} |" in row
    assert f"| {format_value(api[1]['gemv_gb_s'])} | {format_value(api[1]['kernel_gemv_gb_s'])} |" in row
    assert "### Time to first token against the prefill roof" in report
    assert (tmp_path / "report" / "llm_decode.png").stat().st_size > 1000


def test_demo_classifies_the_examples_runs_a_ladder_and_chats(tmp_path):
    """`make demo` as a newcomer runs it (a tiny ladder in place of the CPU one): the bundled photos get
    the right animal, the ladder writes rows and a report, the chat model answers and streams."""
    ladder = tmp_path / "ladder.toml"
    ladder.write_text(TINY_VISION_LADDER)
    out = tmp_path / "demo"
    printed = _roofserve("demo", "--ladder", str(ladder), "--requests", "8", "--concurrency", "1,2", "--out", str(out))
    animals = dict(line.split()[0:3:2] for line in printed.splitlines() if " -> " in line)
    assert animals["chelsea.png"] == "cat" and animals["imagenet_16_251.jpg"] == "dog", printed
    assert "breed dalmatian" in printed and "breed bull mastiff" in printed, printed
    rows = json.loads((out / "vision-sweep.json").read_text())["rows"]
    assert [r["ok"] for r in rows if r["kind"] == "vision-api"] == [8, 8, 8, 8]
    assert (out / "report" / "report.md").read_text().startswith("#")
    answer = next(line for line in printed.splitlines() if "Q: What is the capital of France?" in line)
    assert "Paris" in answer, printed
    decode = float(printed.split("streaming, 64 tokens: ")[1].split()[0])
    assert decode > 0 and "4/4 done" in printed
