"""CPU and GPU utilisation sampled in a background thread while a benchmark runs, and the CPU seconds
each kind of server process spent in it (where an engine's cost per request goes)."""

from __future__ import annotations

import statistics
import threading

import psutil


class Monitor:
    """Samples system CPU % (of all cores) and GPU % (NVML, where present) every interval_s; given the
    server's pid, also the CPU seconds its process tree spent, by role (`cpu_s_by_role`)."""

    def __init__(self, interval_s: float = 0.25, server_pid: int | None = None):
        self.interval_s = interval_s
        self.server_pid = server_pid
        self._before: dict = {}
        self.cpu_s_by_role: dict[str, float] = {}
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
        if self.server_pid:
            self._before = tree_cpu_s(self.server_pid)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.server_pid:
            after = tree_cpu_s(self.server_pid)
            for pid, (role, seconds) in after.items():
                start = self._before.get(pid, (role, 0.0))[1]  # a process started in the window: all of it
                self.cpu_s_by_role[role] = self.cpu_s_by_role.get(role, 0.0) + max(0.0, seconds - start)

    def summary(self) -> dict:
        return {
            "cpu_percent": round(statistics.fmean(self.cpu), 1) if self.cpu else None,
            "gpu_percent": round(statistics.fmean(self.gpu), 1) if self.gpu else None,
        }


def process_role(cmdline: str) -> str:
    """What a process in a server's tree does, from its command line: Ray sets its actors' titles
    (ray::ServeReplica..., ray::ProxyActor), LitServe's inference workers are spawned processes, and the
    rest (the main process, the forked HTTP process, queue managers) run roofserve itself."""
    if "ServeReplica" in cmdline:
        return "Ray replicas"
    if "ProxyActor" in cmdline:
        return "Ray proxy"
    if "ray::" in cmdline or "/ray/" in cmdline or "raylet" in cmdline or "gcs_server" in cmdline:
        return "Ray system (controller, raylet, GCS)"
    if "multiprocessing.spawn" in cmdline:
        return "inference workers"
    if "resource_tracker" in cmdline:
        return "other"
    return "server processes (main, HTTP, queues)"


def tree_cpu_s(pid: int) -> dict[int, tuple[str, float]]:
    """{pid: (role, user + system CPU seconds)} for a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    out = {}
    for proc in procs:
        try:
            times = proc.cpu_times()
            out[proc.pid] = (process_role(" ".join(proc.cmdline())), times.user + times.system)
        except psutil.Error:  # it ended meanwhile
            continue
    return out


def _nvml_handle():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:
        return None
