"""Prometheus metrics of the API process (default registry, exposed at ``/metrics``).

``/metrics`` also renders what the workers recorded into Redis (queue wait, seconds per stage, outcomes, peak
memory, webhook attempts: :mod:`mudsc_jobs.metrics`), read at each scrape.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from mudsc_jobs.metrics import RedisMetricsCollector
from mudsc_jobs.store import JobStore

HTTP_REQUESTS = Counter("mudsc_http_requests_total", "HTTP requests answered", ["method", "route", "status"])
HTTP_LATENCY = Histogram("mudsc_http_request_duration_seconds", "Time to the response start", ["method", "route"])
JOBS_SUBMITTED = Counter("mudsc_jobs_submitted_total", "Merge jobs accepted", ["method"])
JOBS_REJECTED = Counter("mudsc_jobs_rejected_total", "Merge submissions refused", ["code"])


def recorded_metrics(store: JobStore) -> CollectorRegistry:
    """A registry of the metrics the workers (and this process) recorded into the job store's Redis."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisMetricsCollector(store.redis, store.prefix))
    return registry


class MetricsMiddleware:
    """Pure ASGI (streams like SSE pass through untouched); labels by route template, not raw path."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                route = getattr(scope.get("route"), "path", "unmatched")
                HTTP_LATENCY.labels(scope["method"], route).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            HTTP_REQUESTS.labels(scope["method"], route, str(status["code"])).inc()
