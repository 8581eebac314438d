"""Our LLM client against a server we did not write: llama.cpp's own OpenAI-compatible server.

Needs the optional llamacpp extra and llama_cpp.server's dependencies; skipped without them."""

import subprocess
import sys
import time
import urllib.request

import pytest

from roofserve.bench.process import free_port, stop_process_group

pytest.importorskip("llama_cpp")
pytest.importorskip("sse_starlette")
pytest.importorskip("starlette_context")
pytest.importorskip("pydantic_settings")


def test_bench_llm_measures_llama_cpp_server():
    from roofserve.bench.llm import bench_llm_api
    from roofserve.llm.model import bundled_gguf

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(bundled_gguf()), "--host",
                             "127.0.0.1", "--port", str(port), "--n_ctx", "512"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        row, results = bench_llm_api(url + "/v1/chat/completions", runs=3, max_tokens=16, progress=False)
        assert row["ok"] == 3 and row["errors"] == 0
        assert row["fixed_length_verified"] and row["output_tokens_mean"] == 16
        assert all(r.ttft_ms > 0 and r.tpot_ms > 0 for r in results)
    finally:
        stop_process_group(proc)
