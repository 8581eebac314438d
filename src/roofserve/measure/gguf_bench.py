"""Ours against llama.cpp on the same GGUF file, alternated round by round (a shared machine's bandwidth
can drift within minutes): `roofserve bench gguf`.

Each round runs, as separate processes on all cores, `roofserve bench llm-engine --gguf-weights packed`
(prefill of a P-token prompt, then decode) and `llama-bench -p P -n N` (prefill of P tokens; decode of N
from an empty context). Files
missing from the list of shapes and types are written first with random weights (llm/random_gguf.py).
Peak RSS is each process's own high-water mark (VmHWM), read while it runs; for llama.cpp it includes the
pages of the file it memory-maps.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from roofserve.errors import UserError

log = logging.getLogger(__name__)

RANDOM_DIR = Path(".cache/gguf-random")
OUR_FLAGS = ["--gguf-weights", "packed", "--compile", "--attention", "roofserve", "--max-batch-size", "1"]


def random_file(shape: str, kind: str) -> Path:
    """.cache/gguf-random/SHAPE-KIND.gguf, written once."""
    from roofserve.llm.random_gguf import write_random

    path = RANDOM_DIR / f"{shape}-{kind.lower()}.gguf"
    if not path.is_file():
        log.info("writing %s (random weights)", path)
        write_random(shape, kind, path)
    return path


def _peak_rss_gb(pid: int) -> float | None:
    """VmHWM of a live process: its own peak. (wait4's ru_maxrss is no good here: after fork and exec it
    starts from the parent's resident size, torch included.)"""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6  # kB -> GB
    except OSError:
        pass
    return None


def _run(command: list[str], timeout_s: float) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS in GB: the last VmHWM read, every 0.1 s) of one process; a failure
    is a UserError with its last line."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout_s
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, _peak_rss_gb(proc.pid) or 0.0)
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise UserError(f"{Path(command[0]).name} ran past {timeout_s:.0f} s: stopped")
            time.sleep(0.1)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    if proc.returncode:
        tail = (errors or text).strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"{' '.join(command[:3])} ... failed ({proc.returncode}): {tail[0][:200]}")
    return text, wall, peak


def ours(path: Path, prompt_tokens: int, max_tokens: int, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "engine.json"
        command = [sys.executable, "-m", "roofserve", "bench", "llm-engine", "--model", str(path), *OUR_FLAGS,
                   "--max-seq-len", str(prompt_tokens + max_tokens + 64), "--prompt-lengths", str(prompt_tokens),
                   "--max-tokens", str(max_tokens), "--runs", "1", "--out", str(result)]
        _, wall, rss = _run(command, timeout_s)
        rows = json.loads(result.read_text())["rows"]
    row = next(r for r in rows if r["prompt_tokens"] == prompt_tokens)
    return {"engine": "roofserve", "prefill_tokens_per_s": row["prefill_tokens_per_s"], "ttft_ms": row["ttft_ms"],
            "decode_tokens_per_s": row["decode_tokens_per_s"], "startup_s": row.get("startup_s"),
            "peak_rss_gb": round(rss, 2), "process_s": round(wall, 1), "bytes_per_token": row["bytes_per_token"]}


def llama_cpp(path: Path, prompt_tokens: int, max_tokens: int, threads: int, timeout_s: float,
              binary: str | None = None) -> dict:
    from roofserve.llm.llama_server import find_llama_tool

    tool = binary or find_llama_tool("llama-bench")
    text, wall, rss = _run([tool, "-m", str(path), "-t", str(threads), "-p", str(prompt_tokens), "-n",
                            str(max_tokens), "-r", "1", "-o", "json"], timeout_s)
    tests = json.loads(text)
    prefill = next(t for t in tests if t["n_prompt"] == prompt_tokens and t["n_gen"] == 0)
    decode = next(t for t in tests if t["n_gen"] == max_tokens and t["n_prompt"] == 0)
    return {"engine": "llama.cpp", "prefill_tokens_per_s": round(prefill["avg_ts"], 1),
            "ttft_ms": round(prompt_tokens / prefill["avg_ts"] * 1e3, 1),
            "decode_tokens_per_s": round(decode["avg_ts"], 1), "peak_rss_gb": round(rss, 2),
            "process_s": round(wall, 1)}


def measure_dram_read_gb_s() -> float:
    """This machine's read bandwidth now (a buffer several times the last-level cache)."""
    import torch

    from roofserve.measure.peaks import dram_buffer_bytes, measure_read_gb_s

    cpu = torch.device("cpu")
    return round(measure_read_gb_s(dram_buffer_bytes(cpu), cpu), 1)


def dram_read_gb_s(timeout_s: float = 120.0) -> float:
    """measure_dram_read_gb_s in a child process, before each engine's run (the roof its decode is held
    against), so that this process stays small and holds no buffer while the engines run."""
    code = "from roofserve.measure.gguf_bench import measure_dram_read_gb_s as m; print(m())"
    text, _, _ = _run([sys.executable, "-c", code], timeout_s)
    return float(text.strip().splitlines()[-1])


def bench_gguf(files: list[Path], prompt_tokens: int, max_tokens: int, rounds: int, threads: int,
               timeout_s: float = 1200.0, progress=None) -> list[dict]:
    """Rows per file, engine and round, the two engines alternating within each round; each row holds the
    DRAM read rate measured just before it and the share of it its decode reached (weight bytes read per
    token: ours as packed, llama.cpp's as stored in the file)."""
    from roofserve.measure import roofline

    rows = []
    for path in files:
        stored = roofline.gguf_bytes_per_token(str(path))
        for r in range(rounds):
            for name, run in (("roofserve", lambda: ours(path, prompt_tokens, max_tokens, timeout_s)),
                              ("llama.cpp", lambda: llama_cpp(path, prompt_tokens, max_tokens, threads, timeout_s))):
                dram = dram_read_gb_s()
                row = {"kind": "gguf-engine", "file": path.name, "round": r, **run(), "prompt_tokens": prompt_tokens,
                       "max_tokens": max_tokens, "file_gb": round(path.stat().st_size / 1e9, 2),
                       "dram_read_gb_s": dram}
                row.setdefault("bytes_per_token", stored)
                row["share_of_dram"] = round(row["decode_tokens_per_s"] * row["bytes_per_token"] / (dram * 1e9), 2)
                rows.append(row)
                if progress:
                    progress(row)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per file: each engine's best round, and ours over llama.cpp."""
    out = []
    for name in dict.fromkeys(r["file"] for r in rows):
        best = {}
        for engine in ("roofserve", "llama.cpp"):
            mine = [r for r in rows if r["file"] == name and r["engine"] == engine]
            best[engine] = {k: max(r[k] for r in mine) for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
            best[engine]["peak_rss_gb"] = max(r["peak_rss_gb"] for r in mine)
            best[engine]["share_of_dram"] = max(r["share_of_dram"] for r in mine)
        a, b = best["roofserve"], best["llama.cpp"]
        out.append({"kind": "gguf-summary", "file": name, "decode_ours": a["decode_tokens_per_s"], "decode_llama_cpp": b["decode_tokens_per_s"],
                    "decode_x": round(a["decode_tokens_per_s"] / b["decode_tokens_per_s"], 2),
                    "prefill_ours": a["prefill_tokens_per_s"], "prefill_llama_cpp": b["prefill_tokens_per_s"],
                    "prefill_x": round(a["prefill_tokens_per_s"] / b["prefill_tokens_per_s"], 2),
                    "rss_gb_ours": a["peak_rss_gb"], "rss_gb_llama_cpp": b["peak_rss_gb"],
                    "dram_share_ours": a["share_of_dram"], "dram_share_llama_cpp": b["share_of_dram"]})
    return out
