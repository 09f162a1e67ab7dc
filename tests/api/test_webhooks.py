"""Webhooks through the API and the job store (real Redis, no worker): the spec's webhook checked at submission
(422 naming the field), the tenant default, the delivery recorded atomically with the terminal status, the
deliveries listing (tenant-scoped), and the reconciler re-sending a delivery whose message was lost."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from fastapi.testclient import TestClient

from app.auth import Tenant
from app.main import create_app
from app.reconcile import sweep
from app.schemas import Job
from app.service import resolve_webhook
from mudsc_core.schema import JobSpec
from mudsc_jobs.dispatch import make_sender
from mudsc_jobs.settings import Settings, WebhookEndpoint
from mudsc_jobs.store import JobStore
from mudsc_jobs.webhooks import public_job
from tests.api.conftest import auth, make_settings, mlp_spec
from tests.api.test_http_contract import assert_problem

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
HOOK = "https://hooks.acme.example/mudsc"


@pytest.fixture(scope="module")
def hook_settings(redis_prefix: str) -> Settings:
    tenants = {
        "acme": {"secrets": [SECRET], "allowed_hosts": ["hooks.acme.example", "127.0.0.1", "*.acme.example"]},
        "rival": {"allowed_hosts": ["hooks.rival.example"], "default": {"url": "https://hooks.rival.example/x"}},
    }
    return make_settings(
        redis_prefix + "wh:",
        MUDSC_WEBHOOKS__TENANTS=json.dumps(tenants),
        MUDSC_RECONCILE__INTERVAL_S="0",
        MUDSC_WEBHOOKS__RESEND_AFTER_S="0.001",
    )


@pytest.fixture(scope="module")
def hook_client(hook_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(hook_settings)) as client:
        yield client


@pytest.fixture(scope="module")
def hook_store(hook_settings: Settings) -> JobStore:
    return JobStore.from_settings(hook_settings)


def _webhook_queue(store: JobStore) -> list[str]:
    return [json.loads(m)["headers"]["argsrepr"] for m in store.redis.lrange(f"{store.prefix}broker:webhooks", 0, -1)]


@pytest.mark.parametrize(
    ("webhook", "loc", "words"),
    [
        ({"url": "http://hooks.acme.example/x"}, ["body", "webhook", "url"], "https"),
        ({"url": "https://evil.example/x"}, ["body", "webhook", "url"], "allowed webhook hosts"),
        ({"url": "https://127.0.0.1/x"}, ["body", "webhook", "url"], "loopback"),
        ({"url": "https://hooks.acme.example/" + "x" * 2100}, ["body", "webhook", "url"], "2048"),
        ({"url": "https://u:p@hooks.acme.example/"}, ["body", "webhook", "url"], "credentials"),
        ({"url": HOOK, "events": ["running"]}, ["body", "webhook", "events", 0], ""),
        ({"url": HOOK, "extra": 1}, ["body", "webhook", "extra"], ""),
    ],
)
def test_refused_webhooks_are_422_naming_the_field(
    hook_client: TestClient, hook_store: JobStore, webhook: dict[str, Any], loc: list[Any], words: str
) -> None:
    before = hook_store.redis.zcard(hook_store.index_key("acme"))
    body = assert_problem(hook_client.post("/v1/merges", json=mlp_spec(webhook=webhook), headers=auth()), 422)
    assert any(error["loc"] == loc for error in body["errors"]), body
    assert words in body["detail"]
    assert hook_store.redis.zcard(hook_store.index_key("acme")) == before  # nothing was created


def test_a_tenant_without_secret_gets_422_naming_webhook(hook_client: TestClient) -> None:
    rival_models = [{"uri": "s3://models/rival/a.safetensors"}, {"uri": "s3://models/rival/b.safetensors"}]
    spec = mlp_spec(models=rival_models, webhook={"url": "https://hooks.rival.example/y"})
    response = hook_client.post("/v1/merges", json=spec, headers=auth("rival"))
    body = assert_problem(response, 422)
    assert body["errors"][0]["loc"] == ["body", "webhook"] and "secret" in body["detail"]


def test_the_tenant_default_applies_and_is_checked(hook_settings: Settings) -> None:
    spec = JobSpec.model_validate(mlp_spec())
    acme = Tenant("acme", (), "s3://results/acme/")
    assert resolve_webhook(spec, acme, hook_settings) is None  # no default for acme
    own = JobSpec.model_validate(mlp_spec(webhook={"url": "https://a.acme.example/h", "events": ["failed"]}))
    assert resolve_webhook(own, acme, hook_settings) == {"url": "https://a.acme.example/h", "events": ["failed"]}
    defaults = hook_settings.model_copy(deep=True)
    defaults.webhooks.tenants["acme"].default = WebhookEndpoint(url=HOOK)
    assert resolve_webhook(spec, acme, defaults) == {"url": HOOK, "events": ["succeeded", "failed", "canceled"]}
    # rival's default names a host it may use, but rival has no secret: refused, naming webhook
    with pytest.raises(Exception, match="default webhook.*secret"):
        resolve_webhook(spec, Tenant("rival", (), "s3://results/rival/"), hook_settings)


def _job(store: JobStore, webhook: dict[str, Any] | None, tenant: str = "acme") -> dict[str, Any]:
    job, _ = store.create(tenant=tenant, spec=mlp_spec(), labels={}, max_active=1000, webhook=webhook)
    return job


def test_cancel_of_a_queued_job_records_and_sends_its_delivery(hook_client: TestClient, hook_store: JobStore) -> None:
    job = _job(hook_store, {"url": HOOK, "events": ["succeeded", "failed", "canceled"]})
    assert hook_store.webhooks.get(job["id"]) is None  # nothing while it runs
    response = hook_client.post(f"/v1/merges/{job['id']}/cancel", headers=auth())
    assert response.status_code == 202 and response.json()["status"] == "canceled"
    delivery = hook_store.webhooks.get(job["id"])
    assert delivery is not None and delivery.type == "merge.canceled" and delivery.url == HOOK
    assert delivery.webhook_id == f"msg_{job['id']}_canceled" and delivery.status == "pending"
    assert any(job["id"] in args for args in _webhook_queue(hook_store))
    assert hook_store.redis.zscore(hook_store.keys.webhooks_pending(), job["id"]) is not None
    listing = hook_client.get(f"/v1/merges/{job['id']}/webhook-deliveries", headers=auth())
    assert listing.status_code == 200
    assert listing.json()["delivery"]["status"] == "pending" and listing.json()["data"] == []


def test_only_the_chosen_events_are_delivered(hook_store: JobStore) -> None:
    job = _job(hook_store, {"url": HOOK, "events": ["succeeded"]})
    hook_store.request_cancel(job["id"], "acme")
    assert hook_store.webhooks.get(job["id"]) is None
    plain = _job(hook_store, None)
    hook_store.request_cancel(plain["id"], "acme")
    assert hook_store.webhooks.get(plain["id"]) is None


def test_a_worker_completion_records_the_delivery_in_the_same_step(hook_store: JobStore) -> None:
    job = _job(hook_store, {"url": HOOK, "events": ["succeeded", "failed"]})
    claim = hook_store.claim(job["id"], owner="test", lease_ttl_s=30, max_attempts=3)
    hook_store.complete(job["id"], "acme", claim.attempt, status="failed", error={"code": "internal"})
    delivery = hook_store.webhooks.get(job["id"])
    assert delivery is not None and delivery.type == "merge.failed" and delivery.status == "pending"


def test_deliveries_listing_shows_every_attempt_and_is_tenant_scoped(
    hook_client: TestClient, hook_store: JobStore
) -> None:
    job = _job(hook_store, {"url": HOOK, "events": ["canceled"]})
    hook_store.request_cancel(job["id"], "acme")
    deliveries = hook_store.webhooks
    body = b'{"type":"merge.canceled"}'
    first = deliveries.begin(job["id"], owner="w", lease_s=30, body=body, deadline_ms=2**50)
    assert first.outcome == "begun" and first.attempt == 1 and first.body == body
    assert deliveries.begin(job["id"], owner="x", lease_s=30, body=b"", deadline_ms=0).outcome == "busy"
    deliveries.finish(
        job["id"],
        owner="w",
        attempt={"attempt": 1, "status": "retrying", "started_ms": first.now_ms, "response_code": 503,
                 "duration_ms": 12.5, "error": "HTTP 503", "next_attempt_ms": first.now_ms},
        status="retrying",
        next_attempt_ms=first.now_ms,
    )  # fmt: skip
    second = deliveries.begin(job["id"], owner="w2", lease_s=30, body=b"other", deadline_ms=0)
    assert second.attempt == 2 and second.body == body and second.deadline_ms == 2**50  # fixed by the first
    deliveries.finish(
        job["id"],
        owner="w2",
        attempt={"attempt": 2, "status": "succeeded", "started_ms": second.now_ms, "response_code": 204,
                 "duration_ms": 3.0, "error": None, "next_attempt_ms": None},
        status="delivered",
    )  # fmt: skip
    listing = hook_client.get(f"/v1/merges/{job['id']}/webhook-deliveries", headers=auth())
    assert listing.status_code == 200, listing.text
    page = listing.json()
    assert page["delivery"]["status"] == "delivered" and page["delivery"]["next_attempt_at"] is None
    assert [(a["attempt"], a["status"], a["response_code"]) for a in page["data"]] == [
        (1, "retrying", 503),
        (2, "succeeded", 204),
    ]
    assert page["data"][0]["next_attempt_at"] and page["data"][0]["duration_ms"] == 12.5
    assert hook_store.redis.zscore(hook_store.keys.webhooks_pending(), job["id"]) is None
    assert deliveries.begin(job["id"], owner="late", lease_s=30, body=b"", deadline_ms=0).outcome == "final"
    # another tenant's job is not found; so is a malformed id
    assert_problem(hook_client.get(f"/v1/merges/{job['id']}/webhook-deliveries", headers=auth("rival")), 404)
    assert_problem(hook_client.get("/v1/merges/nope/webhook-deliveries", headers=auth()), 404)
    plain = _job(hook_store, None)
    empty = hook_client.get(f"/v1/merges/{plain['id']}/webhook-deliveries", headers=auth()).json()
    assert empty == {"delivery": None, "data": [], "has_more": False}


def test_the_reconciler_resends_a_delivery_whose_message_was_lost(
    hook_settings: Settings, hook_store: JobStore
) -> None:
    job = _job(hook_store, {"url": HOOK, "events": ["canceled"]})
    hook_store.request_cancel(job["id"], "acme")  # the store call alone: as if the API died before sending
    before = _webhook_queue(hook_store).count(repr([job["id"]]))
    sender: Celery = make_sender(hook_settings)
    outcomes = sweep(hook_store, sender, hook_settings)
    assert outcomes["webhook_resent"] >= 1
    assert _webhook_queue(hook_store).count(repr([job["id"]])) == before + 1


def test_the_event_data_is_the_job_as_the_api_returns_it(hook_store: JobStore) -> None:
    job = hook_store.get(_job(hook_store, None)["id"])
    assert public_job(job) == Job.model_validate(job).model_dump(mode="json")
