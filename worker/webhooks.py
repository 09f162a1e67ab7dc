"""The webhook sender: one Celery task on its own queue (``MUDSC_WEBHOOKS__QUEUE``, default ``webhooks``).

``celery -A worker.celery_app:app worker -Q webhooks -c 4 -n webhooks@%h``: these workers need no GPU, and the
merge workers never wait on a receiver (they only send this task's message).

One task run is one attempt: it takes the delivery's lease, signs the stored body, resolves the host once,
checks the address and connects to that address (TLS still verified for the host name), follows no redirect,
reads no response body, and records the attempt. A 2xx ends the delivery, a 410 disables it for the job, a
refused address fails it; anything else is retried with exponential backoff and jitter until
``MUDSC_WEBHOOKS__RETRY_WINDOW_S`` after the event (the task sends itself again with a countdown; should that
message be lost, the reconciler sends it again).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from billiard.exceptions import SoftTimeLimitExceeded

from mudsc_jobs import metrics
from mudsc_jobs.settings import Settings
from mudsc_jobs.store import JobNotFound
from mudsc_jobs.webhooks import (
    WEBHOOK_TASK_NAME,
    WebhookRefused,
    backoff_s,
    check_url,
    event_body,
    headers,
    pinned_address,
    send_delivery,
    url_parts,
)
from worker import context
from worker.celery_app import app, settings

logger = logging.getLogger(__name__)
# The task's soft time limit (a receiver that trickles its answer); the hard one is 5 s later.
_ATTEMPT_LIMIT_S = settings.webhooks.connect_timeout_s + settings.webhooks.timeout_s + 5


@dataclass(frozen=True)
class Outcome:
    response_code: int | None
    error: str | None
    final: bool = False  # no retry can help (a refused address, a host no longer allowed)


def _target(url: str, address: str) -> str:
    """``url`` with its host replaced by the pinned address (the Host header and SNI keep the name)."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


def post(url: str, body: bytes, signed: dict[str, str], settings: Settings) -> Outcome:
    """One POST to the checked address of ``url``; the response body is never read."""
    scheme, host, port = url_parts(url)
    try:
        address = pinned_address(host, port, allow_private=settings.webhooks.allow_private_addresses)
    except WebhookRefused as exc:
        return Outcome(None, str(exc), final=True)
    except OSError as exc:
        return Outcome(None, f"{host} did not resolve: {exc}")
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    timeout = httpx.Timeout(
        settings.webhooks.timeout_s, connect=settings.webhooks.connect_timeout_s, pool=settings.webhooks.timeout_s
    )
    request_headers = {**signed, "host": netloc, "user-agent": "mudsc-webhooks/1"}
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    try:
        # trust_env=False: no proxy from the environment (it would connect elsewhere than the checked address).
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            request = client.build_request(
                "POST", _target(url, address), content=body, headers=request_headers, extensions=extensions
            )
            response = client.send(request, stream=True)
            response.close()  # status only: a huge or slow body is neither read nor stored
    except httpx.TimeoutException as exc:
        return Outcome(None, f"timed out ({type(exc).__name__})")
    except httpx.HTTPError as exc:
        return Outcome(None, f"{type(exc).__name__}: {str(exc)[:200]}")
    return Outcome(response.status_code, None)


def attempt_delivery(job_id: str, owner: str) -> str:
    """One attempt of the job's delivery. Returns what happened (begun outcome or the new delivery status)."""
    ctx = context.get()
    config = ctx.settings.webhooks
    deliveries = ctx.store.webhooks
    delivery = deliveries.get(job_id)
    if delivery is None:
        return "missing"
    try:
        job = ctx.store.get(job_id)
    except JobNotFound:
        return "missing"
    begun = deliveries.begin(
        job_id,
        owner=owner,
        lease_s=_ATTEMPT_LIMIT_S + 10,  # beyond the hard time limit: a live attempt is never taken over
        body=event_body(job, delivery.type),
        deadline_ms=delivery.created_ms + int(config.retry_window_s * 1000),
    )
    if begun.outcome != "begun":
        logger.info("webhook of %s: %s, nothing to do", job_id, begun.outcome)
        return begun.outcome
    tenant = config.tenant(job["tenant"])
    started = time.monotonic()
    try:
        check_url(delivery.url, tenant, ctx.settings, job["tenant"])  # refuses a tenant without secrets
        secrets = tenant.secrets if tenant is not None else []
        signed = headers(secrets, delivery.webhook_id, int(time.time()), begun.body)
        outcome = post(delivery.url, begun.body, signed, ctx.settings)
    except WebhookRefused as exc:  # the tenant's settings changed since the submission
        outcome = Outcome(None, str(exc), final=True)
    except SoftTimeLimitExceeded:
        outcome = Outcome(None, "timed out (attempt time limit)")
    duration_ms = round((time.monotonic() - started) * 1000, 1)
    now_ms = begun.now_ms + int(duration_ms)
    next_attempt_ms = 0
    code = outcome.response_code
    if code is not None and 200 <= code < 300:
        status, attempt_status = "delivered", "succeeded"
    elif code == 410:
        status, attempt_status = "disabled", "disabled"
    elif outcome.final or now_ms >= begun.deadline_ms:
        status, attempt_status = "failed", "failed"
    else:
        delay_ms = int(backoff_s(begun.attempt, config.backoff_base_s, config.backoff_max_s) * 1000)
        next_attempt_ms = min(now_ms + delay_ms, begun.deadline_ms)
        status, attempt_status = "retrying", "retrying"
    record: dict[str, Any] = {
        "attempt": begun.attempt,
        "status": attempt_status,
        "started_ms": begun.now_ms,
        "response_code": code,
        "duration_ms": duration_ms,
        "error": outcome.error if outcome.error else (None if attempt_status == "succeeded" else f"HTTP {code}"),
        "next_attempt_ms": next_attempt_ms or None,
    }
    recorded = deliveries.finish(job_id, owner=owner, attempt=record, status=status, next_attempt_ms=next_attempt_ms)
    logger.info(
        "webhook of %s attempt %d: %s (%s, %.0f ms)",
        job_id,
        begun.attempt,
        attempt_status,
        code or outcome.error,
        duration_ms,
    )
    metrics.MetricsRecorder(ctx.store.redis, ctx.store.prefix).inc(metrics.WEBHOOK_ATTEMPTS, [attempt_status])
    if recorded == "ok" and status == "retrying":
        try:
            send_delivery(app, ctx.settings, job_id, countdown=max(0.0, (next_attempt_ms - now_ms) / 1000))
        except Exception as exc:  # noqa: BLE001 - kombu raises several types; the reconciler re-sends it
            logger.warning("webhook of %s: retry not scheduled (%s); the reconciler will send it", job_id, exc)
    return status


@app.task(
    name=WEBHOOK_TASK_NAME,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=_ATTEMPT_LIMIT_S,
    time_limit=_ATTEMPT_LIMIT_S + 5,
)
def deliver(self: Any, job_id: str) -> None:
    attempt_delivery(job_id, f"{socket.gethostname()}:{os.getpid()}:{self.request.id}")
