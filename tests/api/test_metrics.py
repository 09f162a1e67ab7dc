"""The recorded job metrics (mudsc_jobs.metrics) on the real Redis, rendered by the API's /metrics."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from mudsc_jobs import metrics
from mudsc_jobs.store import JobStore
from tests.api.conftest import auth, mlp_spec, seed_job


def scrape(client: TestClient) -> dict[str, list[tuple[dict[str, str], float]]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict[str, Any], name: str, **labels: str) -> float:
    return sum(v for got, v in samples.get(name, []) if all(got.get(k) == w for k, w in labels.items()))


def test_recorded_histograms_counters_and_gauges_render_with_their_labels(client: TestClient, store: JobStore) -> None:
    record = metrics.MetricsRecorder(store.redis, store.prefix)
    record.observe(metrics.QUEUE_WAIT, ["test-method"], 0.3)
    record.observe(metrics.QUEUE_WAIT, ["test-method"], 7.0)
    record.observe(metrics.QUEUE_WAIT, ["test-method"], 10**6)  # beyond the last bucket: +Inf only
    record.observe_many(metrics.STAGE_DURATION, [(["test-method", "merging"], 2.0), (["test-method", "uploading"], 1)])
    record.inc(metrics.JOBS_FINISHED, ["test-method", "failed", "invalid_checkpoint"])
    record.observe(metrics.PEAK_MEMORY, ["test-method", "rss"], 2.0**30)
    record.set(metrics.LAST_PEAK_MEMORY, ["host-a", "rss"], 2.0**30)
    record.inc(metrics.WEBHOOK_ATTEMPTS, ["retrying"])
    samples = scrape(client)

    wait = "mudsc_job_queue_wait_seconds"
    assert value(samples, wait + "_count", method="test-method") == 3
    assert value(samples, wait + "_sum", method="test-method") == 0.3 + 7.0 + 10**6
    assert value(samples, wait + "_bucket", method="test-method", le="0.5") == 1  # cumulative buckets
    assert value(samples, wait + "_bucket", method="test-method", le="10.0") == 2
    assert value(samples, wait + "_bucket", method="test-method", le="+Inf") == 3
    stage = "mudsc_job_stage_duration_seconds_count"
    assert value(samples, stage, method="test-method", stage="merging") == 1
    assert value(samples, stage, method="test-method", stage="uploading") == 1
    finished = "mudsc_jobs_finished_total"
    assert value(samples, finished, method="test-method", outcome="failed", error_code="invalid_checkpoint") == 1
    assert value(samples, "mudsc_job_peak_memory_bytes_count", method="test-method", memory="rss") == 1
    assert value(samples, "mudsc_worker_last_job_peak_memory_bytes", worker="host-a", memory="rss") == 2.0**30
    assert value(samples, "mudsc_webhook_delivery_attempts_total", outcome="retrying") >= 1
    assert value(samples, "mudsc_http_requests_total", route="/metrics") >= 0  # the API's own metrics stay


def test_a_queued_job_canceled_by_the_api_is_counted(client: TestClient, store: JobStore) -> None:
    before = value(scrape(client), "mudsc_jobs_finished_total", method="mudsc", outcome="canceled")
    job = seed_job(store, spec=mlp_spec())
    assert client.post(f"/v1/merges/{job['id']}/cancel", headers=auth()).status_code == 202
    after = scrape(client)
    assert (
        value(after, "mudsc_jobs_finished_total", method="mudsc", outcome="canceled", error_code="none") == before + 1
    )


def test_metrics_answer_without_the_recorded_ones_when_redis_is_unreachable(client: TestClient) -> None:
    from app.metrics import recorded_metrics
    from mudsc_jobs.store import JobStore as Store

    unreachable = Store.from_url("redis://127.0.0.1:1/0", prefix="x:", job_ttl_s=60, timeout_s=0.2)
    unreachable.redis.connection_pool.connection_kwargs["retry"] = None
    registry = recorded_metrics(unreachable)
    assert list(registry.collect()) == []  # logged, nothing rendered; the API's own metrics are unaffected
    metrics.MetricsRecorder(unreachable.redis, "x:").inc(metrics.WEBHOOK_ATTEMPTS, ["failed"])  # never raises


def test_a_job_a_redelivery_ends_is_counted_with_its_code(client: TestClient, store: JobStore) -> None:
    import time

    from worker import observe

    before = value(scrape(client), "mudsc_jobs_finished_total", method="mudsc", error_code="worker_lost")
    job = seed_job(store, spec=mlp_spec())
    assert store.claim(job["id"], owner="lost-worker", lease_ttl_s=0.05, max_attempts=1).outcome == "claimed"
    time.sleep(0.1)  # the lease runs out: its worker is gone
    assert observe.status_of(store, job["id"]) == "running"
    claim = store.claim(job["id"], owner="next-worker", lease_ttl_s=5, max_attempts=1)
    assert claim.outcome == "terminal" and store.get(job["id"])["error"]["code"] == "worker_lost"
    observe.ended_by_claim(store, job["id"])
    after = value(
        scrape(client), "mudsc_jobs_finished_total", method="mudsc", outcome="failed", error_code="worker_lost"
    )
    assert after == before + 1
