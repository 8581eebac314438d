"""The pieces of `roofserve bench gguf` that do not need llama.cpp: a child's peak RSS and the summary."""

import sys

import pytest

from roofserve.errors import UserError
from roofserve.measure.gguf_bench import _run, summarize


def test_a_childs_peak_memory_is_its_own():
    """Its own high-water mark: not this process's (which wait4's ru_maxrss would start from after fork)."""
    ballast = b"\x01" * (800 * 2**20)  # this process: 800 MB more, written
    child = "import time; b = b'\\x01' * (300 * 2**20); time.sleep(0.5); print(len(b))"
    out, wall, rss_gb = _run([sys.executable, "-c", child], 60)
    assert out.strip() == str(300 * 2**20) and ballast[0] == 1
    assert 0.3 <= rss_gb < 0.6 and wall > 0


def test_a_failing_or_hanging_child_is_a_one_line_error():
    with pytest.raises(UserError, match="failed"):
        _run([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], 60)
    with pytest.raises(UserError, match="ran past"):
        _run([sys.executable, "-c", "import time; time.sleep(30)"], 1)


def test_the_summary_takes_each_engines_best_round():
    def row(engine, r, decode, prefill):
        return {"file": "a.gguf", "engine": engine, "round": r, "decode_tokens_per_s": decode,
                "prefill_tokens_per_s": prefill, "peak_rss_gb": 1.0, "share_of_dram": 0.5}

    rows = [row("roofserve", 0, 20, 200), row("llama.cpp", 0, 10, 100), row("roofserve", 1, 24, 180),
            row("llama.cpp", 1, 12, 90)]
    [s] = summarize(rows)
    assert (s["decode_ours"], s["decode_llama_cpp"], s["decode_x"]) == (24, 12, 2.0)
    assert (s["prefill_ours"], s["prefill_llama_cpp"], s["prefill_x"]) == (200, 100, 2.0)
