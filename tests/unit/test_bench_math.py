"""Percentiles, load summaries, TTFT/TPOT math and the result-file schema."""

import json

import numpy as np
import pytest

from roofserve.load.core import RequestResult, percentile, summarize
from roofserve.results import read_results, run_meta, write_results
from roofserve.errors import UserError


@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q):
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_none():
    assert percentile([], 50) is None


def test_summary_counts_failures_as_rows_not_throughput():
    results = [RequestResult(True, status=200, latency_ms=10), RequestResult(True, status=200, latency_ms=30),
               RequestResult(False, "HTTP 503", 503, latency_ms=5), RequestResult(False, "ConnectError", latency_ms=0)]
    row = summarize(results, wall_s=2.0).row()
    assert row["ok"] == 2 and row["errors"] == 2 and row["req_per_s"] == 1.0
    assert row["error_kinds"] == {"HTTP 503": 1, "ConnectError": 1}
    assert row["latency_p50_ms"] == 20.0 and row["latency_mean_ms"] == 20.0 and row["latency_std_ms"] == 10.0
    assert "ttft_p50_ms" not in row  # not streamed


def test_ttft_tpot_itl():
    r = RequestResult(ok=True, ttft_ms=100.0, latency_ms=1000.0, output_tokens=10, itl_ms=[100.0] * 9)
    assert r.tpot_ms == pytest.approx(100.0)  # (1000 - 100) / (10 - 1)
    assert r.decode_tokens_per_s == pytest.approx(10.0)
    assert RequestResult(ok=True, ttft_ms=5, latency_ms=5, output_tokens=1).tpot_ms is None
    row = summarize([r, RequestResult(ok=False, error="HTTP 500")], wall_s=2.0, streamed=True).row()
    assert row["ok"] == 1 and row["errors"] == 1 and row["error_kinds"] == {"HTTP 500": 1}
    assert row["ttft_p50_ms"] == 100.0 and row["tpot_p99_ms"] == pytest.approx(100.0)
    assert row["latency_p50_ms"] == 1000.0 and row["itl_mean_ms"] == 100.0
    assert row["output_tokens_per_s"] == 5.0
    assert row["tokens_per_message"] == 1.0
    grouped = RequestResult(ok=True, ttft_ms=100.0, latency_ms=1000.0, output_tokens=10, itl_ms=[300.0] * 3)
    assert summarize([grouped], wall_s=1.0, streamed=True).row()["tokens_per_message"] == 2.5  # 10 tokens, 4 messages


def test_every_summary_spells_its_statistics_one_way():
    """Vision and LLM rows, and the streamed metrics, all name a statistic {metric}_{stat}_ms."""
    import re

    r = RequestResult(ok=True, ttft_ms=10.0, latency_ms=100.0, output_tokens=4, itl_ms=[30.0] * 3)
    for row in (summarize([r], 1.0).row(), summarize([r], 1.0, streamed=True).row()):
        timed = [k for k in row if k.endswith("_ms")]
        assert timed and all(re.fullmatch(r"(latency|ttft|tpot|itl)_(mean|std|p\d+)_ms", k) for k in timed)


def test_result_files_embed_machine_versions_and_config(tmp_path):
    peak = {"kind": "peak", "resource": "bandwidth", "name": "read", "device": "cpu", "value": 50.0, "unit": "GB/s"}
    path = write_results(tmp_path / "r.json", run_meta("peak", {"a": 1}), [peak])
    doc = json.loads(path.read_text())
    assert doc["meta"]["command"] == "peak" and doc["meta"]["config"] == {"a": 1}
    assert doc["meta"]["machine"]["cores"] >= 1 and doc["meta"]["versions"]["torch"]
    metas, rows = read_results([tmp_path])
    assert rows == [{**peak, "source": "peak", "suite": "machine"}] and len(metas) == 1  # which run made them
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="not a roofserve result file"):
        read_results([tmp_path / "bad.json"])
