"""Prometheus metrics of one HTTP process: requests by route and status, latency histograms,
requests in flight (admitted, not yet answered), the process's CPU time and memory, and for the LLM
prompt and generated tokens, TTFT and TPOT."""

from __future__ import annotations

import bisect
import resource
import time
from collections import defaultdict

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS_S):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{le}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.total}", f"{name}_count{braces} {running}"]
        return out


class Metrics:
    def __init__(self, routes: tuple[str, ...]):
        self.routes = set(routes)
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = defaultdict(Histogram)
        self.in_flight = 0
        self.rejected_overload = 0
        self.worker_deaths = 0
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.ttft = Histogram()
        self.tpot = Histogram(TPOT_BUCKETS_S)

    def route(self, path: str) -> str:
        return path if path in self.routes else "other"  # bounded label values

    def observe(self, path: str, status: int, seconds: float) -> None:
        route = self.route(path)
        self.requests[(route, status)] += 1
        self.latency[route].observe(seconds)

    def render(self, extra_lines: list[str] = ()) -> str:
        lines = ["# TYPE roofserve_requests_total counter"]
        lines += [f'roofserve_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())]
        lines.append("# TYPE roofserve_request_duration_seconds histogram")
        for route, hist in sorted(self.latency.items()):
            lines += hist.lines("roofserve_request_duration_seconds", f'route="{route}"')
        lines += ["# TYPE roofserve_requests_in_flight gauge", f"roofserve_requests_in_flight {self.in_flight}",
                  "# TYPE roofserve_rejected_overload_total counter",
                  f"roofserve_rejected_overload_total {self.rejected_overload}",
                  "# TYPE roofserve_worker_deaths_total counter",
                  f"roofserve_worker_deaths_total {self.worker_deaths}",
                  "# TYPE roofserve_tokens_generated_total counter",
                  f"roofserve_tokens_generated_total {self.tokens_generated}",
                  "# TYPE roofserve_prompt_tokens_total counter",
                  f"roofserve_prompt_tokens_total {self.prompt_tokens}",
                  "# TYPE roofserve_time_to_first_token_seconds histogram"]
        lines += self.ttft.lines("roofserve_time_to_first_token_seconds", "")
        lines.append("# HELP roofserve_time_per_output_token_seconds per streamed request: (last - first token) / (tokens - 1)")
        lines.append("# TYPE roofserve_time_per_output_token_seconds histogram")
        lines += self.tpot.lines("roofserve_time_per_output_token_seconds", "")
        lines += _process_lines()
        return "\n".join([*lines, *extra_lines]) + "\n"


def _process_lines() -> list[str]:
    """This HTTP process's own CPU time and resident memory, in the names Prometheus' client libraries use."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/self/statm") as f:  # Linux: pages; resident is the second field
        rss = int(f.read().split()[1]) * resource.getpagesize()
    return ["# TYPE process_cpu_seconds_total counter", f"process_cpu_seconds_total {usage.ru_utime + usage.ru_stime}",
            "# TYPE process_resident_memory_bytes gauge", f"process_resident_memory_bytes {rss}"]


class MetricsMiddleware:
    """Pure ASGI: status and latency of every HTTP request (streams are timed to their last byte)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.observe(scope["path"], status, time.perf_counter() - start)
