"""The reconciler: no job stays ``running`` after its worker is gone.

A worker renews its job's lease every ``lease_ttl_s / 3``. When a whole worker host or process dies (SIGKILL,
OOM killer, a lost machine), Celery's late-acked message only comes back after the broker's visibility timeout
(above the hard time limit, i.e. about an hour), so the job would sit ``running`` until then. This sweep runs on
a timer in every API process (``MUDSC_RECONCILE__INTERVAL_S``, 0 = off; several API processes sweeping at
once is harmless: each step is one atomic Lua script) and, for every running/canceling job whose lease expired
by the Redis clock:

- ``canceling`` (or cancel requested) -> ``canceled``;
- attempts used up (``MUDSC_WORKER__MAX_ATTEMPTS``) -> ``failed`` with ``worker_lost``;
- otherwise -> ``queued`` again and the task re-sent; the next claim makes it attempt + 1, and the lost
  worker, should it come back, is fenced off (its heartbeat and completion name the old attempt).

A job still ``queued`` ``MUDSC_RECONCILE__RESEND_QUEUED_AFTER_S`` after its task was last sent has the task
sent again (a broker that lost messages, e.g. a Redis crash between fsyncs). A duplicate message (that one,
or the original redelivered after the visibility timeout) finds the job leased or terminal and does nothing.
Webhook deliveries overdue by ``MUDSC_WEBHOOKS__RESEND_AFTER_S`` (never sent, or their task or worker lost)
are sent again to the webhooks queue. ``sweep()`` can also be called once by hand (``python -m app.reconcile``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter

from celery import Celery
from redis import RedisError

from mudsc_jobs.dispatch import send_merge
from mudsc_jobs.metrics import record_finished
from mudsc_jobs.settings import Settings
from mudsc_jobs.store import JobNotFound, JobStore
from mudsc_jobs.webhooks import notify, send_delivery

logger = logging.getLogger(__name__)


def sweep(store: JobStore, sender: Celery, settings: Settings) -> Counter[str]:
    """One pass over the active jobs; returns how many ended in each outcome."""
    outcomes: Counter[str] = Counter()
    for job_id in store.expired_leases():
        outcome = store.reap(job_id, max_attempts=settings.worker.max_attempts)
        outcomes[outcome] += 1
        if outcome == "requeued":
            logger.warning("job %s: lease expired with no live worker; re-queued", job_id)
            try:
                send_merge(sender, settings, job_id)
            except Exception as exc:  # noqa: BLE001 - kombu raises several types; the next sweep cannot resend
                logger.error("job %s re-queued but its task could not be sent: %s", job_id, exc)
                store.fail_unsent(
                    job_id,
                    store.tenant_of(job_id) or "",
                    "the job was re-queued after its worker was lost, but the queue is unavailable",
                )
                with contextlib.suppress(JobNotFound):
                    record_finished(store, store.get(job_id), "failed", "broker_unavailable")
        elif outcome in ("failed", "canceled"):
            logger.warning("job %s: lease expired with no live worker; %s", job_id, outcome)
            with contextlib.suppress(JobNotFound):  # counted unless the record expired meanwhile
                record_finished(store, store.get(job_id), outcome, "worker_lost" if outcome == "failed" else None)
            notify(sender, settings, store.webhooks, job_id)
    if settings.reconcile.resend_queued_after_s > 0:
        for job_id in store.stale_queued(settings.reconcile.resend_queued_after_s):
            logger.warning(
                "job %s: still queued %.0f s after its task was sent; sending it again",
                job_id,
                settings.reconcile.resend_queued_after_s,
            )
            try:
                send_merge(sender, settings, job_id)
            except Exception as exc:  # noqa: BLE001 - kombu raises several types; the next sweep tries again
                logger.error("job %s: its task could not be sent again: %s", job_id, exc)
                continue
            store.mark_sent(job_id)
            outcomes["resent"] += 1
    # Webhook deliveries overdue (never sent: the process died after the status write; or their task or the
    # worker delivering them was lost) are sent again; a duplicate finds the delivery leased or done.
    for job_id in store.webhooks.overdue(settings.webhooks.resend_after_s):
        try:
            send_delivery(sender, settings, job_id)
        except Exception as exc:  # noqa: BLE001 - kombu raises several types; the next sweep tries again
            logger.error("job %s: its webhook delivery could not be sent again: %s", job_id, exc)
            continue
        store.webhooks.resent(job_id)
        outcomes["webhook_resent"] += 1
    return outcomes


class Reconciler(threading.Thread):
    """Runs :func:`sweep` every ``interval_s`` until stopped; Redis outages are logged and outlived."""

    def __init__(self, store: JobStore, sender: Celery, settings: Settings) -> None:
        super().__init__(name="reconciler", daemon=True)
        self.store, self.sender, self.settings = store, sender, settings
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.settings.reconcile.interval_s):
            try:
                sweep(self.store, self.sender, self.settings)
            except RedisError as exc:
                logger.warning("reconciler sweep failed (Redis): %s", exc)
            except Exception:  # noqa: BLE001 - the sweep must outlive any one bad record
                logger.exception("reconciler sweep failed")

    def stop(self) -> None:
        self.stopped.set()


def main() -> int:
    from mudsc_jobs.dispatch import make_sender

    logging.basicConfig(level=logging.INFO)
    settings = Settings()
    store = JobStore.from_settings(settings)
    print(dict(sweep(store, make_sender(settings), settings)))  # noqa: T201 - a command's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
