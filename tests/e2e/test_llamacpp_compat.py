"""Our LLM client against a server we did not write: llama.cpp's own OpenAI-compatible server.

Needs the optional llamacpp extra and llama_cpp.server's dependencies; skipped without them."""

import sys

import pytest

from roofserve.load.process import free_port, start_process, stop_process_group

pytest.importorskip("llama_cpp")
pytest.importorskip("sse_starlette")
pytest.importorskip("starlette_context")
pytest.importorskip("pydantic_settings")


def test_bench_llm_measures_llama_cpp_server():
    from roofserve.config import LLMLoadConfig, make_config
    from roofserve.llm.model import bundled_gguf
    from roofserve.load.llm import bench_llm_api

    port = free_port()
    server = start_process([sys.executable, "-m", "llama_cpp.server", "--model", str(bundled_gguf()), "--host",
                            "127.0.0.1", "--port", str(port), "--n_ctx", "512"], port, ready_path="/v1/models",
                           ready_timeout_s=60)
    try:
        url = server.url
        load = make_config(LLMLoadConfig, {"runs": 3, "max_tokens": 16})
        row, results = bench_llm_api(url + "/v1/chat/completions", load, progress=False)
        assert row["ok"] == 3 and row["errors"] == 0
        assert row["fixed_length_verified"] and row["output_tokens_mean"] == 16
        assert all(r.ttft_ms > 0 and r.tpot_ms > 0 for r in results)
    finally:
        stop_process_group(server.proc)
