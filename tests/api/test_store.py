"""Job-store transitions against the real Redis: atomic, attempt-checked, terminal states final."""

from __future__ import annotations

import json
import time

import pytest
import redis

from app.reconcile import sweep
from mudsc_jobs.dispatch import make_sender
from mudsc_jobs.settings import Settings
from mudsc_jobs.store import IdempotencyConflict, JobStore, StaleAttempt, TenantLimitReached, TransitionConflict
from tests.api.conftest import seed_job


def test_stale_attempt_cannot_overwrite_newer_one(store: JobStore) -> None:
    job = seed_job(store)
    first = store.claim(job["id"], owner="w1", lease_ttl_s=0.2, max_attempts=3)
    time.sleep(0.3)  # w1's lease runs out (its worker "died")
    second = store.claim(job["id"], owner="w2", lease_ttl_s=30, max_attempts=3)
    assert (first.attempt, second.outcome, second.attempt) == (1, "claimed", 2)
    with pytest.raises(StaleAttempt):
        store.heartbeat(job["id"], first.attempt, lease_ttl_s=30, progress={"stage": "x", "percent": 1, "message": ""})
    with pytest.raises(StaleAttempt):
        store.complete(job["id"], "acme", first.attempt, status="succeeded", result={"artifacts": [], "metrics": {}})
    assert store.get(job["id"])["status"] == "running"
    store.complete(
        job["id"],
        "acme",
        second.attempt,
        status="failed",
        error={"code": "invalid_checkpoint", "message": "m", "stage": "merging", "retryable": False},
    )
    assert store.get(job["id"])["error"]["code"] == "invalid_checkpoint"


def test_live_lease_makes_a_second_delivery_do_nothing(store: JobStore) -> None:
    job = seed_job(store)
    store.claim(job["id"], owner="w1", lease_ttl_s=30, max_attempts=3)
    before = store.events(job["id"])
    duplicate = store.claim(job["id"], owner="w2", lease_ttl_s=30, max_attempts=3)
    assert duplicate.outcome == "leased" and duplicate.attempt == 1 and 0 < duplicate.lease_remaining_s <= 30
    assert store.events(job["id"]) == before


def test_terminal_states_never_change(store: JobStore) -> None:
    job = seed_job(store)
    claim = store.claim(job["id"], owner="w", lease_ttl_s=30, max_attempts=3)
    store.complete(job["id"], "acme", claim.attempt, status="succeeded", result={"artifacts": [], "metrics": {}})
    for status in ("failed", "canceled"):
        with pytest.raises(TransitionConflict):
            store.complete(job["id"], "acme", claim.attempt, status=status)
    with pytest.raises(TransitionConflict):
        store.request_cancel(job["id"], "acme")
    assert store.claim(job["id"], owner="w", lease_ttl_s=30, max_attempts=3).outcome == "terminal"
    assert store.get(job["id"])["status"] == "succeeded"
    assert 0 < store.redis.ttl(store.job_key(job["id"])) <= store.job_ttl_s  # finished jobs expire
    assert store.redis.sismember(store.active_key("acme"), job["id"]) == 0


def test_lost_worker_fails_after_max_attempts(store: JobStore) -> None:
    job = seed_job(store)
    for _ in range(2):
        assert store.claim(job["id"], owner="w", lease_ttl_s=0.1, max_attempts=2).outcome == "claimed"
        time.sleep(0.15)
    final = store.claim(job["id"], owner="w", lease_ttl_s=0.1, max_attempts=2)
    assert (final.outcome, final.status) == ("terminal", "failed")
    error = store.get(job["id"])["error"]
    assert error["code"] == "worker_lost" and error["retryable"] is True


def test_canceling_job_whose_worker_died_becomes_canceled(store: JobStore) -> None:
    job = seed_job(store)
    store.claim(job["id"], owner="w", lease_ttl_s=0.1, max_attempts=3)
    assert store.request_cancel(job["id"], "acme")["status"] == "canceling"
    time.sleep(0.15)
    assert store.claim(job["id"], owner="w2", lease_ttl_s=5, max_attempts=3).status == "canceled"


def test_idempotency_and_tenant_limit_are_atomic(store: JobStore) -> None:
    tenant = "limited"
    first, created = store.create(tenant=tenant, spec={}, labels={}, max_active=2, idempotency_key="k1", body_hash="h")
    again, created_again = store.create(
        tenant=tenant, spec={}, labels={}, max_active=2, idempotency_key="k1", body_hash="h"
    )
    assert created and not created_again and again["id"] == first["id"]
    with pytest.raises(IdempotencyConflict):
        store.create(tenant=tenant, spec={}, labels={}, max_active=2, idempotency_key="k1", body_hash="other")
    store.create(tenant=tenant, spec={}, labels={}, max_active=2)
    with pytest.raises(TenantLimitReached):
        store.create(tenant=tenant, spec={}, labels={}, max_active=2)
    store.request_cancel(first["id"], tenant)  # a finished job frees its slot
    store.create(tenant=tenant, spec={}, labels={}, max_active=2)


def test_reconciler_resends_a_job_left_queued_by_a_lost_broker_message(store: JobStore, settings: Settings) -> None:
    """The broker lost the message (e.g. Redis crashed between fsyncs): the sweep sends the task again, once."""
    job = seed_job(store)  # created, but no task was ever sent: as if the broker lost it
    broker = redis.Redis.from_url(settings.broker_url)
    queue = settings.celery.key_prefix + settings.celery.queue
    time.sleep(0.05)
    eager = settings.model_copy(
        update={"reconcile": settings.reconcile.model_copy(update={"resend_queued_after_s": 0.01})}
    )
    sender = make_sender(settings)
    outcomes = sweep(store, sender, eager)
    assert outcomes["resent"] >= 1
    sent_ids = [json.loads(message)["headers"]["id"] for message in broker.lrange(queue, 0, -1)]
    assert job["id"] in sent_ids
    # Sent just now: not stale again until the threshold has passed once more.
    assert job["id"] not in store.stale_queued(60.0)
    assert store.get(job["id"])["status"] == "queued"


def test_a_stale_attempt_cannot_append_log_events(store: JobStore) -> None:
    job, _ = store.create(tenant="logger", spec={}, labels={}, max_active=1000)
    first = store.claim(job["id"], owner="a", lease_ttl_s=0.05, max_attempts=3)
    store.log(job["id"], first.attempt, "merging on cpu", device="cpu")
    time.sleep(0.1)
    assert store.reap(job["id"], max_attempts=3) == "requeued"
    second = store.claim(job["id"], owner="b", lease_ttl_s=30, max_attempts=3)
    before = store.events(job["id"])
    with pytest.raises(StaleAttempt):
        store.log(job["id"], first.attempt, "late line of the lost worker")
    assert store.events(job["id"]) == before
    store.log(job["id"], second.attempt, "merging on cpu")
    assert [e["data"]["attempt"] for e in store.events(job["id"]) if e["type"] == "log"] == [1, 2]
