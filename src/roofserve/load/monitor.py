"""CPU and GPU utilisation sampled in a background thread while a benchmark runs."""

from __future__ import annotations

import statistics
import threading

import psutil


class Monitor:
    """Samples system CPU % (of all cores) and GPU % (NVML, where present) every interval_s."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.cpu: list[float] = []
        self.gpu: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._nvml = _nvml_handle()

    def _run(self) -> None:
        psutil.cpu_percent(interval=None)
        while not self._stop.wait(self.interval_s):
            self.cpu.append(psutil.cpu_percent(interval=None))
            if self._nvml is not None:
                import pynvml

                self.gpu.append(float(pynvml.nvmlDeviceGetUtilizationRates(self._nvml).gpu))

    def __enter__(self) -> "Monitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {
            "cpu_percent": round(statistics.fmean(self.cpu), 1) if self.cpu else None,
            "gpu_percent": round(statistics.fmean(self.gpu), 1) if self.gpu else None,
        }


def _nvml_handle():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:
        return None
