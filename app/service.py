"""What the routes call: submission (with its webhook), cancellation and artifact URLs (HTTP-free where it can be)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery

from app import metrics
from app.auth import Tenant
from app.inputs import ObjectChecker, check_access, check_limits
from app.problems import ApiProblem
from mudsc_core.schema import JobSpec
from mudsc_jobs.dispatch import send_merge
from mudsc_jobs.metrics import record_finished
from mudsc_jobs.settings import Settings
from mudsc_jobs.store import IdempotencyConflict, JobNotFound, JobStore, OutputTaken, TenantLimitReached, new_job_id
from mudsc_jobs.webhooks import WebhookRefused, check_resolved, check_url, notify

logger = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    store: JobStore
    s3: Any
    s3_public: Any
    sender: Celery


def body_hash(body: bytes) -> str:
    """Hash of the request body as JSON, key order and whitespace ignored."""
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"))
    except ValueError:
        canonical = body.decode("utf-8", "replace")
    return hashlib.sha256(canonical.encode()).hexdigest()


def _idempotency_conflict(job_id: str) -> ApiProblem:
    return ApiProblem(
        422,
        f"Idempotency-Key was already used with a different request body (job {job_id})",
        code="idempotency_conflict",
        errors=[{"loc": ["header", "Idempotency-Key"], "msg": "reused with a different body"}],
    )


def replay(services: Services, tenant: Tenant, idempotency_key: str, digest: str) -> dict[str, Any] | None:
    """The original job of a replayed Idempotency-Key (same body), 422 for a different body, None if unused."""
    record = services.store.idempotency_record(tenant.name, idempotency_key)
    if record is None:
        return None
    job_id, stored_hash = record
    try:
        job = services.store.get(job_id, tenant.name)
    except JobNotFound:
        return None
    if stored_hash != digest:
        raise _idempotency_conflict(job_id)
    return job


def submit(
    services: Services,
    tenant: Tenant,
    spec: JobSpec,
    *,
    idempotency_key: str | None,
    digest: str,
) -> tuple[dict[str, Any], bool]:
    """Validate against limits, rights and S3, create the job, send the task. Returns (job, created)."""
    settings = services.settings
    try:
        if idempotency_key:
            original = replay(services, tenant, idempotency_key, digest)
            if original is not None:
                return original, False
        check_limits(spec, settings)
        job_id = new_job_id()
        default_output = f"s3://{settings.s3.results_bucket}/{tenant.name}/{job_id}/"
        output_uri = spec.output.uri or default_output
        check_access(spec, tenant, output_uri, settings.s3.results_bucket)
        webhook = resolve_webhook(spec, tenant, settings)
        checker = ObjectChecker(services.s3, settings)
        checker.check(spec)
        if spec.output.uri is not None:
            checker.check_output_empty(output_uri)
    except ApiProblem as problem:
        metrics.JOBS_REJECTED.labels(problem.code or str(problem.status)).inc()
        raise
    normalised = spec.model_dump(mode="json")
    normalised["output"]["uri"] = output_uri
    try:
        job, created = services.store.create(
            job_id=job_id,
            tenant=tenant.name,
            spec=normalised,
            labels=spec.labels,
            max_active=settings.limits.max_concurrent_jobs_per_tenant,
            idempotency_key=idempotency_key,
            body_hash=digest,
            output_uri=spec.output.uri,  # reserved in the same atomic step (racing submissions: the first wins)
            webhook=webhook,
        )
    except IdempotencyConflict as conflict:
        raise _idempotency_conflict(conflict.job_id) from None
    except OutputTaken:
        metrics.JOBS_REJECTED.labels("output_conflict").inc()
        raise ApiProblem(
            409,
            f"{output_uri} is already the output of another job",
            code="output_conflict",
            uri=output_uri,
            errors=[{"loc": ["body", "output", "uri"], "msg": "output prefix is taken"}],
        ) from None
    except TenantLimitReached:
        metrics.JOBS_REJECTED.labels("too_many_jobs").inc()
        raise ApiProblem(
            429,
            f"tenant {tenant.name!r} already has {settings.limits.max_concurrent_jobs_per_tenant} "
            "queued or running jobs",
            code="too_many_jobs",
            headers={"Retry-After": "30"},
        ) from None
    if not created:
        return job, False
    try:
        send_merge(services.sender, settings, job["id"])
    except Exception as exc:  # noqa: BLE001 - kombu raises several types; the job must not stay queued forever
        logger.error("could not send job %s to the broker: %s", job["id"], exc)
        services.store.fail_unsent(job["id"], tenant.name, "the job could not be queued (broker unavailable)")
        record_finished(services.store, job, "failed", "broker_unavailable")
        raise ApiProblem(
            503, "the job queue is unavailable; the job was not started", code="broker_unavailable", job_id=job["id"]
        ) from None
    metrics.JOBS_SUBMITTED.labels(spec.method.name).inc()
    return job, True


def resolve_webhook(spec: JobSpec, tenant: Tenant, settings: Settings) -> dict[str, Any] | None:
    """The job's webhook (its own, else the tenant's default), checked against the tenant's secrets and allowed
    hosts and the outbound address policy; a 422 naming ``webhook.url`` (or ``webhook``) when refused."""
    config = settings.webhooks.tenant(tenant.name)
    if spec.webhook is not None:
        webhook: dict[str, Any] = spec.webhook.model_dump(mode="json")
        origin = ""
    elif config is not None and config.default is not None:
        webhook = config.default.model_dump(mode="json")
        origin = "the tenant's default webhook: "
    else:
        return None
    try:
        check_url(webhook["url"], config, settings, tenant.name)
        check_resolved(webhook["url"], settings)
    except WebhookRefused as exc:
        no_secret = config is None or not config.secrets
        loc = ["body", "webhook"] if no_secret or origin else ["body", "webhook", "url"]
        raise ApiProblem(
            422,
            f"{'.'.join(loc[1:])}: {origin}{exc}",
            code="validation_error",
            title="Request validation failed",
            errors=[{"loc": loc, "msg": f"{origin}{exc}"}],
        ) from None
    return webhook


def cancel(services: Services, tenant: Tenant, job_id: str) -> dict[str, Any]:
    """Request cancellation; a job canceled at once (it was queued) has its webhook sent now."""
    job = services.store.request_cancel(job_id, tenant.name)
    if job["status"] == "canceled":
        record_finished(services.store, job, "canceled")
        notify(services.sender, services.settings, services.store.webhooks, job_id)
    return job


def artifact_urls(services: Services, job: dict[str, Any]) -> list[dict[str, Any]]:
    """Presigned GET URLs (signed for the public endpoint) of a succeeded job's artifacts."""
    if job["status"] != "succeeded" or not job.get("result"):
        raise ApiProblem(
            409,
            f"job is {job['status']}; artifacts exist once it succeeded",
            code="not_succeeded",
            status_of_job=job["status"],
        )
    ttl = services.settings.s3.presign_ttl_s
    expires_at = (datetime.now(UTC) + timedelta(seconds=ttl)).isoformat(timespec="seconds")
    expires_at = expires_at.replace("+00:00", "Z")
    out = []
    for artifact in job["result"]["artifacts"]:
        bucket, _, key = artifact["uri"][len("s3://") :].partition("/")
        url = services.s3_public.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=ttl
        )
        out.append(
            {
                "name": artifact["name"],
                "size": artifact["size"],
                "sha256": artifact["sha256"],
                "url": url,
                "expires_at": expires_at,
            }
        )
    return out
