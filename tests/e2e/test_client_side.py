"""The client side on a machine without torch: `bench vision-api` against a real server and the report
from its rows, both with torch blocked in the client's process."""

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import running_server
from tests.unit.test_layout import BLOCK_TORCH, SRC


def test_load_and_report_run_without_torch(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {"PYTHONPATH": f"{tmp_path}:{SRC}", "PATH": "/usr/bin:/bin"}
    out = tmp_path / "api.json"
    with running_server(["vision", "--workers-per-device", "1"]) as url:
        done = subprocess.run(
            [sys.executable, "-m", "roofserve", "bench", "vision-api", "--url", url + "/predict", "--concurrency", "1,4",
             "--requests", "12", "--warmup", "2", "--out", str(out)],
            capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert [r["concurrency"] for r in doc["rows"]] == [1, 4] and all(r["ok"] == 12 for r in doc["rows"])
    assert doc["meta"]["suite"] == "vision" and doc["meta"]["machine"]["gpu"] is None
    report = subprocess.run([sys.executable, "-m", "roofserve", "report", str(out), "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "| manual |" in Path(tmp_path / "r" / "report.md").read_text()
