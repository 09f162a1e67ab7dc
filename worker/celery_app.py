"""The worker's Celery app, built from Settings.

``celery -A worker.celery_app:app worker -Q gpu -c 1 --pool prefork -n w1@%h``
(and the webhook sender: ``-Q webhooks -c 4 -n webhooks@%h``, ``worker/webhooks.py``)

Late acks with a prefetch of one: a message is acknowledged only after its task returns, so
a worker that dies mid-merge leaves the message to be redelivered (``reject_on_worker_lost``),
and the job record's attempt number and lease decide what the redelivery does. The broker's
visibility timeout is above the hard time limit so that a running task is not redelivered
while it still runs. Nothing here imports torch or touches CUDA: the device is resolved
inside the task, in the pool process.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init

from mudsc_jobs.dispatch import celery_config
from mudsc_jobs.settings import Settings

settings = Settings()

app = Celery("mudsc-worker", include=["worker.tasks", "worker.webhooks"], set_as_current=True)
app.conf.update(celery_config(settings))
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_soft_time_limit=settings.worker.effective_soft_time_limit_s,
    task_time_limit=settings.worker.time_limit_s,
    worker_max_tasks_per_child=100,  # bounds slow leaks of a long-lived pool process
    worker_send_task_events=False,
)


@worker_process_init.connect
def _reset_clients(**_: object) -> None:
    """Network clients are per process: drop any inherited from the parent after fork."""
    from worker import context

    context.reset()
