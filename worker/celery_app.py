"""The worker's Celery app, built from Settings.

``celery -A worker.celery_app:app worker -Q gpu -c 1 --pool prefork -n w1@%h``
(and the webhook sender: ``-Q webhooks -c 4 -n webhooks@%h``, ``worker/webhooks.py``)

Late acks with a prefetch of one: a message is acknowledged only after its task returns, so
a worker that dies mid-merge leaves the message to be redelivered (``reject_on_worker_lost``),
and the job record's attempt number and lease decide what the redelivery does. The broker's
visibility timeout is above the hard time limit so that a running task is not redelivered
while it still runs. Nothing here imports torch or touches CUDA: a merge pool process imports
torch when it starts (``worker_process_init``), and the device is resolved inside the task.
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    task_postrun,
    task_prerun,
    worker_process_init,
)

from mudsc_jobs import logs
from mudsc_jobs.dispatch import TASK_NAME, celery_config
from mudsc_jobs.settings import Settings
from mudsc_jobs.webhooks import WEBHOOK_TASK_NAME

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
    # A pool process warms up (imports torch) before it reports up; Celery's default 4 s is too short for that.
    worker_proc_alive_timeout=60.0,
)


@worker_process_init.connect
def _reset_clients(**_: object) -> None:
    """Network clients are per process: drop any inherited from the parent after fork. A merge pool process
    then opens its own and imports torch and the merge code now, not in its first job."""
    from worker import context

    context.reset()
    consumed = app.amqp.queues.consume_from  # the -Q selection (None: every queue, the merge queue included)
    if not consumed or settings.celery.queue in consumed:
        context.warm_up()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _structured_logs(logger: logging.Logger, **_: object) -> None:
    """Every handler Celery sets up names the job and attempt of its lines (JSON lines with
    ``MUDSC_WORKER__LOG_FORMAT=json``); pool processes inherit the handlers when they fork."""
    logs.install(logger, settings.worker.log_format)


@task_prerun.connect
def _bind_job(task: object = None, args: tuple[object, ...] | None = None, **_: object) -> None:
    """From the task's start to after Celery's own line about its end, log lines name the job (its first
    argument); the merge task adds the attempt once it has claimed one."""
    if getattr(task, "name", None) in (TASK_NAME, WEBHOOK_TASK_NAME) and args:
        logs.bind(job_id=str(args[0]), attempt=None)


@task_postrun.connect
def _unbind_job(**_: object) -> None:
    logs.clear()
