"""The report builder on fixed rows: the tables, the verdicts and the files it writes."""

from roofserve.results import write_results
from roofserve.report.markdown import build_report, llm_verdict, verdict

META = {"command": "sweep vision", "created": "2026-01-01T00:00:00+00:00", "config": {},
        "machine": {"cpu": "Test CPU", "cores": 2, "memory_gb": 8.0, "gpu": None}, "versions": {"torch": "x"}}


def _api(step, index, concurrency, rate, cpu, precision="bf16"):
    return {"kind": "vision-api", "step": step, "step_index": index, "mode": "concurrency", "concurrency": concurrency,
            "requests": 100, "ok": 100,
            "req_per_s": rate, "latency_p50_ms": 10.0 * concurrency, "latency_p99_ms": 20.0 * concurrency,
            "errors": 0, "error_kinds": {}, "cpu_percent": cpu, "gpu_percent": None, "why": f"why {step}",
            "config": {"precision": precision}}


ROWS = [
    {"kind": "peak", "resource": "matmul", "name": "bf16", "device": "cpu", "value": 1.0, "unit": "TFLOP/s", "size": 1},
    {"kind": "vision-model", "model": "m", "precision": "bf16", "batch_size": 32, "img_per_s": 300.0,
     "flops_per_image": 10**9,
     "compute_roof_img_per_s": 1000.0, "mfu": 0.3},
    {"kind": "vision-model", "model": "m", "runtime": "openvino", "precision": "int8", "batch_size": 32,
     "img_per_s": 450.0, "flops_per_image": 10**9, "compute_roof_img_per_s": 1000.0, "mfu": 0.45},
    {"kind": "vision-accuracy", "runtime": "torch", "precision": "bf16", "photos": 23, "labelled_photos": 20,
     "top1_agree": 20, "animal_agree": 23, "mean_abs_prob_diff": 2.5e-5, "passed": True},
    {"kind": "vision-accuracy", "runtime": "openvino", "precision": "int8", "photos": 23, "labelled_photos": 20,
     "top1_agree": 17, "animal_agree": 22, "mean_abs_prob_diff": 3e-3, "passed": False},
    {"kind": "vision-pipeline", "precision": "bf16", "batch_size": 8, "lanes": 2, "threads": 1, "img_per_s": 200.0,
     "decode_ms_per_image": 3.0},
    _api("base", 1, 1, 40.0, 50.0, "fp32"), _api("base", 1, 8, 50.0, 60.0, "fp32"),
    _api("best", 2, 1, 60.0, 95.0), _api("best", 2, 8, 180.0, 97.0),
]


def test_report_table_numbers_come_from_the_rows(tmp_path):
    write_results(tmp_path / "r.json", META, ROWS)
    report = build_report([str(tmp_path / "r.json")], str(tmp_path / "out")).read_text()
    assert "| best | 180.0 | 8 | 80.0 | 160.0 | 97.0 | - | 60% | 90% | 18% | CPU-bound at the pipeline ceiling" in report
    assert "| base | 50.0 | 8 |" in report
    assert "3.60x the first step, 90% of the in-process pipeline" in report
    assert "| torch bf16 | 300.0 | 32 | 1000.0 | 0.3 | 1.00x | pass: top-1 20/20, animal 23/23" in report
    assert "| openvino int8 | 450.0 | 32 | 1000.0 | 0.45 | 1.50x | **FAIL**: top-1 17/20, animal 22/23" in report
    for name in ("report.md", "vision_model.png", "vision_throughput.png", "vision_latency.png"):
        assert (tmp_path / "out" / name).stat().st_size > 500


def test_where_the_cpu_goes_lists_each_steps_best_level_by_process_role(tmp_path):
    litserve = {**_api("litserve", 1, 8, 100.0, 95.0),
                "cpu_ms_per_request": {"inference workers": 15.0, "server processes (main, HTTP, queues)": 4.5}}
    ray = {**_api("ray", 2, 8, 50.0, 97.0),
           "cpu_ms_per_request": {"Ray replicas": 30.0, "Ray proxy": 8.5, "server processes (main, HTTP, queues)": 0.5}}
    write_results(tmp_path / "r.json", META, [_api("litserve", 1, 1, 40.0, 50.0), litserve, ray])
    report = build_report([str(tmp_path / "r.json")], str(tmp_path / "out")).read_text()
    assert "### Where the CPU goes" in report
    # roles ordered by their largest share; a role a step did not have is "-"; totals per request
    assert "| step | req/s | Ray replicas | inference workers | Ray proxy | server processes (main, HTTP, queues) |" in report
    assert "| litserve | 100.0 | - | 15.0 | - | 4.5 | 19.5 |" in report
    assert "| ray | 50.0 | 30.0 | - | 8.5 | 0.5 | 39.0 |" in report


def test_peaks_go_to_the_section_of_the_run_that_measured_them(tmp_path):
    """A vision sweep's peaks are in the vision section, an LLM sweep's bandwidth in the LLM section: the
    file's suite says which, whatever the files are called."""
    llm_meta = {**META, "command": "sweep llm", "suite": "llm"}
    llm_peak = {**ROWS[0], "resource": "bandwidth", "name": "read", "value": 77.7, "unit": "GB/s"}
    write_results(tmp_path / "vision-llm-named.json", META, ROWS)
    write_results(tmp_path / "llm.json", llm_meta, [llm_peak, {"kind": "llm-engine", "prompt": "chat",
                                                              "prompt_tokens": 9, "ttft_ms": 5.0,
                                                              "decode_tokens_per_s": 100.0}])
    report = build_report([str(tmp_path)], str(tmp_path / "out")).read_text()
    vision, llm = report.split("## LLM")
    assert "| matmul | bf16 | cpu | 1 | TFLOP/s |" in vision and "77.7" not in vision
    assert "Bandwidth measured in the LLM run: read 77.7 GB/s" in llm and "TFLOP/s" not in llm


API_ROW = next(r for r in ROWS if r["kind"] == "vision-api")


def test_a_row_that_misses_a_field_of_its_kind_is_refused(tmp_path):
    import json

    import pytest

    from roofserve.errors import UserError

    with pytest.raises(ValueError, match="vision-api row without 'req_per_s'"):
        write_results(tmp_path / "r.json", META, [{k: v for k, v in API_ROW.items() if k != "req_per_s"}])
    (tmp_path / "old.json").write_text(json.dumps({"meta": META, "rows": [{"kind": "mystery"}]}))
    with pytest.raises(UserError, match="unknown row kind 'mystery'"):
        build_report([str(tmp_path / "old.json")], str(tmp_path / "out"))


def test_verdicts_follow_the_measurements():
    row = {"errors": 0, "error_kinds": {}, "cpu_percent": 40.0, "gpu_percent": None, "req_per_s": 50.0}
    assert "cores idle" in verdict(row, 200.0, 300.0)
    assert "below the pipeline" in verdict({**row, "cpu_percent": 99.0}, 200.0, 300.0)
    assert "at the pipeline ceiling" in verdict({**row, "cpu_percent": 99.0, "req_per_s": 190.0}, 200.0, 300.0)
    assert "GPU-bound" in verdict({**row, "gpu_percent": 95.0}, 200.0, 300.0)
    assert "failing" in verdict({**row, "errors": 3, "error_kinds": {"HTTP 500": 3}}, 200.0, 300.0)
    assert llm_verdict(0.7).startswith("bandwidth-bound")
    assert llm_verdict(0.2).startswith("overhead-bound")
    assert llm_verdict(0.3, kernel_share=1.1).startswith("matmul-kernel-bound")
    assert llm_verdict(0.55, kernel_share=2.2) == "past the rate of torch's bf16 one-token matmuls alone (2.2x), 55% of the roof"
    assert llm_verdict(0.55, kernel_share=0.9, kernel="roofserve's GEMV kernel") == (
        "matmul-kernel-bound: 55% of the roof, but 90% of the rate of roofserve's GEMV kernel alone")


def test_many_users_table_compares_each_level_with_one_user_and_its_roof(tmp_path):
    meta = {**META, "command": "sweep llm", "suite": "llm"}

    def level(users, tok_s, roof):
        return {"kind": "llm-api", "step": "batch", "step_index": 1, "concurrency": users, "requests": 8, "ok": 8,
                "errors": 0, "decode_tokens_per_s": 100.0, "output_tokens_per_s": tok_s, "ttft_p50_ms": 50.0,
                "tpot_p50_ms": 10.0 * users, "sequences_per_step": min(users, 4), "aggregate_roof_tokens_per_s": roof,
                "aggregate_bandwidth_roof_tokens_per_s": roof, "aggregate_compute_roof_tokens_per_s": 5000.0,
                "crossover_batch_size": 40}

    write_results(tmp_path / "llm.json", meta, [level(1, 100.0, 250.0), level(4, 350.0, 1000.0), level(8, 360.0, 1000.0)])
    report = build_report([str(tmp_path / "llm.json")], str(tmp_path / "out")).read_text()
    assert "| batch | 4 | 4 | 350.0 | 3.50x | 40.0 |" in report and report.count("| batch | 8 | 4 | 360.0 | 3.60x") == 1
    assert "| 1000.0 | 5000.0 | 35% |" in report
    assert "compute roof binds from a batch of 40 sequences" in report
    assert (tmp_path / "out" / "llm_concurrency.png").stat().st_size > 1000
    ladder = [line for line in report.splitlines() if line.startswith("| batch | ")]
    assert ladder[0].startswith("| batch | - | 100.0 |"), "the ladder table shows each step at 1 user"


def test_ttft_is_set_against_the_prefill_roof(tmp_path):
    meta = {**META, "command": "sweep llm", "suite": "llm"}
    roof = {"prefill_compute_roof_ms": 23.26, "prefill_weight_read_ms": 5.38, "prefill_roof_ms": 23.26}
    api = {"kind": "llm-api", "step": "bf16", "step_index": 1, "concurrency": 1, "requests": 4, "ok": 4, "errors": 0,
           "decode_tokens_per_s": 100.0, "ttft_p50_ms": 120.0, "tpot_p50_ms": 10.0, "prompt_tokens": 64, **roof}
    chat = {"kind": "llm-engine", "step": "bf16", "prompt": "chat", "prompt_tokens": 64, "ttft_ms": 50.0,
            "decode_tokens_per_s": 110.0, "prefill_tokens_per_s": 1280.0, **roof}
    write_results(tmp_path / "llm.json", meta, [api, chat])
    report = build_report([str(tmp_path / "llm.json")], str(tmp_path / "out")).read_text()
    assert "### Time to first token against the prefill roof" in report
    assert "| bf16 | served chat | 64 | 120.0 | 23.3 | 5.38 | 23.3 | 5.2x | no |" in report
    assert "| bf16 | in-process chat | 64 | 50.0 | 23.3 | 5.38 | 23.3 | 2.1x | yes |" in report
