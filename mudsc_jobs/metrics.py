"""Job metrics shared by every process: recorded into Redis, rendered by the API's ``/metrics``.

Merge workers are Celery prefork children on any number of hosts, and the webhook sender is another pool:
none of them is scraped. Each observation is instead a few ``HINCRBYFLOAT`` in one pipelined round trip
into hashes under ``<prefix>metrics:``, and every API process renders those hashes, at scrape time, beside
its own metrics (:class:`RedisMetricsCollector`). The values are cluster-wide totals: each API replica shows
the same numbers, so aggregate across replicas with ``max without (instance)``, not ``sum``.

Series (label values are bounded: registered method names, stage names, statuses, error codes):

- ``mudsc_job_queue_wait_seconds{method}``: histogram, submission to the first attempt running;
- ``mudsc_job_stage_duration_seconds{method,stage}``: histogram, seconds each attempt spent per stage;
- ``mudsc_jobs_finished_total{method,outcome,error_code}``: counter of terminal statuses
  (``error_code`` is ``none`` unless the job failed);
- ``mudsc_job_peak_memory_bytes{method,memory}``: histogram of an attempt's peak memory, ``memory`` being
  ``rss`` (the pool process's resident set) or ``cuda`` (torch's peak allocation);
- ``mudsc_worker_last_job_peak_memory_bytes{worker,memory}``: gauge, the latest job's on each worker host;
- ``mudsc_webhook_delivery_attempts_total{outcome}``: counter of webhook attempts by outcome
  (``succeeded``, ``retrying``, ``failed``, ``disabled``).

Recording never raises: metrics are lost rather than a job failed when Redis is briefly away.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from mudsc_jobs.store import JobStore

logger = logging.getLogger(__name__)

_SECONDS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
_BYTES = tuple(float(2**p) for p in range(26, 39))  # 64 MiB .. 256 GiB


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "counter" | "histogram" | "gauge"
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


QUEUE_WAIT = Family(
    "mudsc_job_queue_wait_seconds", "histogram", "Submission to running (first attempt)", ("method",), _SECONDS
)
STAGE_DURATION = Family(
    "mudsc_job_stage_duration_seconds", "histogram", "Seconds per stage of an attempt", ("method", "stage"), _SECONDS
)
JOBS_FINISHED = Family(
    "mudsc_jobs_finished", "counter", "Jobs that reached a terminal status", ("method", "outcome", "error_code")
)
PEAK_MEMORY = Family(
    "mudsc_job_peak_memory_bytes", "histogram", "Peak memory of a merge attempt", ("method", "memory"), _BYTES
)
LAST_PEAK_MEMORY = Family(
    "mudsc_worker_last_job_peak_memory_bytes", "gauge", "Peak memory of a worker's latest job", ("worker", "memory")
)
WEBHOOK_ATTEMPTS = Family("mudsc_webhook_delivery_attempts", "counter", "Webhook delivery attempts", ("outcome",))
FAMILIES = (QUEUE_WAIT, STAGE_DURATION, JOBS_FINISHED, PEAK_MEMORY, LAST_PEAK_MEMORY, WEBHOOK_ATTEMPTS)
_SUM, _COUNT = "sum", "count"


def _key(prefix: str, family: Family) -> str:
    return f"{prefix}metrics:{family.name}"


def _labels(family: Family, values: Sequence[str]) -> str:
    if len(values) != len(family.labels):
        raise ValueError(f"{family.name} takes labels {family.labels}")
    return json.dumps([str(v) for v in values])


class MetricsRecorder:
    """Writes observations into Redis (one pipelined round trip per call); never raises on a Redis error."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix

    def inc(self, family: Family, labels: Sequence[str], amount: float = 1.0) -> None:
        self._write([(family, labels, amount)], [])

    def observe(self, family: Family, labels: Sequence[str], value: float) -> None:
        self.observe_many(family, [(labels, value)])

    def observe_many(self, family: Family, observations: Iterable[tuple[Sequence[str], float]]) -> None:
        self._write([], [(family, labels, value) for labels, value in observations])

    def set(self, family: Family, labels: Sequence[str], value: float) -> None:
        try:
            self.redis.hset(_key(self.prefix, family), _labels(family, labels), repr(float(value)))
        except redis.RedisError as exc:
            logger.warning("metric %s not recorded: %s", family.name, exc)

    def _write(
        self,
        increments: Sequence[tuple[Family, Sequence[str], float]],
        observations: Sequence[tuple[Family, Sequence[str], float]],
    ) -> None:
        if not increments and not observations:
            return
        pipe = self.redis.pipeline(transaction=False)
        for family, labels, amount in increments:
            pipe.hincrbyfloat(_key(self.prefix, family), _labels(family, labels), amount)
        for family, labels, value in observations:
            key, field = _key(self.prefix, family), _labels(family, labels)
            # per-bucket counts (not cumulative: one write per observation); cumulated when rendered
            bucket = next((b for b in family.buckets if value <= b), math.inf)
            pipe.hincrbyfloat(key, f"{field}|{float(bucket)!r}", 1)
            pipe.hincrbyfloat(key, f"{field}|{_SUM}", value)
            pipe.hincrbyfloat(key, f"{field}|{_COUNT}", 1)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            logger.warning("metrics not recorded: %s", exc)


def method_of(job: Mapping[str, Any]) -> str:
    """The job's method name (its label value)."""
    return str(((job.get("spec") or {}).get("method") or {}).get("name") or "unknown")


def record_finished(store: JobStore, job: Mapping[str, Any], outcome: str, error_code: str | None = None) -> None:
    """Count a job that reached a terminal status (wherever that status was written)."""
    MetricsRecorder(store.redis, store.prefix).inc(JOBS_FINISHED, [method_of(job), outcome, error_code or "none"])


class RedisMetricsCollector(Collector):
    """The recorded families, read from Redis at every scrape (nothing when Redis cannot be read)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        pipe = self.redis.pipeline(transaction=False)
        for family in FAMILIES:
            pipe.hgetall(_key(self.prefix, family))
        try:
            stored: list[Mapping[Any, Any]] = pipe.execute()
        except redis.RedisError as exc:
            logger.warning("recorded job metrics unavailable: %s", exc)
            return
        for family, raw in zip(FAMILIES, stored):
            fields = {_text(k): float(_text(v)) for k, v in raw.items()}
            yield _render(family, fields)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _render(family: Family, fields: Mapping[str, float]) -> Metric:
    if family.kind == "counter":
        counter = CounterMetricFamily(family.name, family.help, labels=family.labels)
        for labels, value in sorted(fields.items()):
            counter.add_metric(json.loads(labels), value)
        return counter
    if family.kind == "gauge":
        gauge = GaugeMetricFamily(family.name, family.help, labels=family.labels)
        for labels, value in sorted(fields.items()):
            gauge.add_metric(json.loads(labels), value)
        return gauge
    histogram = HistogramMetricFamily(family.name, family.help, labels=family.labels)
    series: dict[str, dict[str, float]] = {}
    for field, value in fields.items():
        labels, _, part = field.rpartition("|")
        series.setdefault(labels, {})[part] = value
    for labels, parts in sorted(series.items()):
        cumulative, buckets = 0.0, []
        for bound in (*family.buckets, math.inf):
            cumulative += parts.get(repr(float(bound)), 0.0)
            buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), cumulative))
        histogram.add_metric(json.loads(labels), buckets, parts.get(_SUM, 0.0))
    return histogram
