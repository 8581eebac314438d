"""Prometheus metrics of one HTTP process: requests by route and status, latency histograms,
requests in flight (admitted, not yet answered), and for the LLM tokens generated and TTFT."""

from __future__ import annotations

import bisect
import time
from collections import defaultdict

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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
        self.ttft = Histogram()

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
                  "# TYPE roofserve_time_to_first_token_seconds histogram"]
        lines += self.ttft.lines("roofserve_time_to_first_token_seconds", "")
        return "\n".join([*lines, *extra_lines]) + "\n"


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
