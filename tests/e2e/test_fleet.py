"""The fleet contract without a cluster: two vision replicas behind haproxy on 127.0.0.1, restarted one
after the other under load, answer every request with a 2xx."""

import json
import subprocess
import sys

import pytest

from roofserve.errors import UserError
from roofserve.load.fleet import DRAIN_S, haproxy_binary


def test_rolling_restart_behind_haproxy_loses_no_request(tmp_path):
    try:
        haproxy_binary()
    except UserError as e:
        pytest.skip(str(e))
    out = tmp_path / "fleet.json"
    done = subprocess.run([sys.executable, "-m", "roofserve", "bench", "fleet", "--replicas", "2", "--concurrency", "4",
                           "--server-args", "--workers-per-device=1 --max-batch-size=4", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [row] = json.loads(out.read_text())["rows"]
    assert row["errors"] == 0 and row["status_5xx"] == 0 and row["error_kinds"] == {}
    assert row["requests"] == row["ok"] >= 40, "load ran through both restarts"
    assert [r["replica"] for r in row["restarts"]] == [0, 1]
    assert all(r["exit_code"] == 0 and r["back_in_balancer_s"] > r["stop_s"] >= DRAIN_S for r in row["restarts"])
