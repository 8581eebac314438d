"""Soak runs, shortened: mixed good and bad traffic against each real server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from roofserve.load.process import start_server, stop_process_group
from roofserve.load.soak import soak, vision_cases
from roofserve.examples import example_images


SHORT_TIMEOUTS = "--header-timeout-s 2 --body-timeout-s 2"


@pytest.mark.parametrize("server,server_args", [("vision", SHORT_TIMEOUTS), ("llm", "--max-seq-len 512 " + SHORT_TIMEOUTS)])
def test_soak_has_no_5xx_refuses_every_bad_request_and_keeps_memory_flat(tmp_path, server, server_args):
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, "-m", "roofserve", "bench", "soak", server, "--server-args", server_args,
                          "--duration-s", "9", "--warmup-s", "3", "--concurrency", "3", "--stalled", "200",
                          "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary, *cases = json.loads(out.read_text())["rows"]
    assert summary["passed"] and summary["server_exit_code"] == 0
    assert summary["good_5xx"] == 0 and summary["good_ok"] == summary["good_requests"] > 0
    assert summary["bad_4xx"] == summary["bad_requests"] > 0
    assert summary["rss_growth_pct"] <= 5
    assert all(case["requests"] > 0 for case in cases)  # every kind of request was sent
    # 200 stalled clients, each closed (408) within its 2 s timeout + 5 s and reopened, all run long
    assert summary["stalled_late"] == 0 and summary["stalled_opened"] > 2 * 200
    assert summary["stalled_ended"].get("408", 0) > 200, summary["stalled_ended"]


def test_soak_fails_when_a_good_request_fails():
    server = start_server(["vision", "--workers-per-device", "1"])
    try:
        cases = {case.name: case for case in vision_cases(example_images(), max_payload_bytes=1000)}
        mislabeled = dataclasses.replace(cases["not an image"], name="junk sent as good", good=True)
        summary = soak(server, [cases["jpeg"], mislabeled], duration_s=2, concurrency=2, name="vision", warmup_s=1,
                       progress=False)[0]
    finally:
        stop_process_group(server.proc)
    assert not summary["passed"]
    assert 0 < summary["good_ok"] < summary["good_requests"]


def test_crowd_bench_keeps_classifying_while_stalled_uploads_are_held(tmp_path):
    out = tmp_path / "crowd.json"
    run = subprocess.run([sys.executable, "-m", "roofserve", "bench", "crowd", "--stalled", "300", "--requests", "40",
                          "--concurrency", "4", "--rounds", "1", "--server-args=--workers-per-device 1",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    runs, summary = rows[:-1], rows[-1]
    assert [row["stalled"] for row in runs] == [0, 300]
    assert all(row["ok"] == row["requests"] == 40 for row in runs), runs  # no 503 while 300 uploads stall
    assert runs[1]["stalled_opened"] >= 300 and runs[1]["stalled_late"] == 0
    assert summary["p99_ratio"] is not None and summary["all_ok"]
    assert run.returncode == (0 if summary["passed"] else 1), run.stdout[-2000:] + run.stderr[-2000:]
