"""The LLM engine in a long-lived subprocess, driven one command at a time.

The sweep compares served and in-process decode speed. On a shared VM both drift by 10-30% within
minutes, so measuring one after the other compares two machine states. With the engine kept loaded
(and compiled) in its own process, the sweep can alternate: a few served requests, a few in-process
runs, a bandwidth measurement, and again; each side is idle while the other runs.

Protocol: one JSON object per line on stdin ({"cmd": "bench", ...} or {"cmd": "bandwidth"}), one JSON
line back on stdout; EOF ends the process. `python -m roofserve.measure.engine_process CONFIG_JSON`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from typing import Any

from roofserve.errors import UserError


class EngineProcess:
    """Starts loading at once; `wait_ready()` blocks until the model is loaded and compiled."""

    def __init__(self, cfg: Any):
        from roofserve.config import as_dict

        self.log = tempfile.NamedTemporaryFile("w+", prefix="roofserve-engine-", suffix=".log")  # never a full pipe
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "roofserve.measure.engine_process", json.dumps(as_dict(cfg, hide=()))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
        )

    def wait_ready(self) -> None:
        self._read()  # {"ready": true}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            tail = self.log.read()[-1500:].strip()
            raise UserError(f"in-process engine stopped (exit {self.proc.returncode}): {tail}")
        return json.loads(line)

    def _call(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def bench(self, prompt_lengths: list[int], max_tokens: int, runs: int, chat_prompt: str | None) -> list[dict]:
        """measure.llm.bench_llm_engine's rows: per prompt length, and for chat_prompt where given."""
        return self._call(cmd="bench", prompt_lengths=prompt_lengths, max_tokens=max_tokens, runs=runs,
                          chat_prompt=chat_prompt)["rows"]

    def bandwidth_gb_s(self, working_set_bytes: int | None = None) -> dict:
        """{"read_gb_s": plain reads from DRAM, "gemv_gb_s": torch's one-token bf16 linear layers, with
        `--gemv roofserve` "kernel_gemv_gb_s": ours, and given a working set smaller than the DRAM test's
        buffer "working_set_read_gb_s": reads of a buffer that size} measured now."""
        return self._call(cmd="bandwidth", working_set_bytes=working_set_bytes)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> None:
    import torch

    from roofserve.measure.llm import bench_llm_engine
    from roofserve.config import LLMConfig, make_config
    from roofserve.measure.peaks import dram_buffer_bytes, measure_bandwidth_gb_s, measure_read_gb_s
    from roofserve.llm.runtime import build_in_process

    cfg = make_config(LLMConfig, None, json.loads(sys.argv[1]))
    generator, device = build_in_process(cfg)
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else that prints must not break the protocol
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "bench":
            rows = bench_llm_engine(generator, command["prompt_lengths"], command["max_tokens"], command["runs"],
                                    command["chat_prompt"])
            reply = {"rows": rows}
        elif command["cmd"] == "bandwidth":
            peaks = {p.name: p.value for p in measure_bandwidth_gb_s(torch.device(device), copy=False)}
            reply = {"read_gb_s": peaks["read"], "gemv_gb_s": peaks["gemv-bf16"]}
            working_set = command.get("working_set_bytes")
            if working_set and working_set < dram_buffer_bytes(torch.device(device)):
                reply["working_set_read_gb_s"] = measure_read_gb_s(working_set, torch.device(device))
            if cfg.gemv == "roofserve":
                from roofserve.llm.kernels import measure_gemv_peak

                reply["kernel_gemv_gb_s"] = measure_gemv_peak().value
        else:
            reply = {"error": f"unknown command {command['cmd']!r}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
