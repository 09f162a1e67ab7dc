"""Celery configuration shared by the API (which only sends) and the worker (which consumes)."""

from __future__ import annotations

from typing import Any

from celery import Celery

from mudsc_jobs.settings import Settings
from mudsc_jobs.webhooks import WEBHOOK_TASK_NAME

TASK_NAME = "mudsc.merge"


def celery_config(settings: Settings) -> dict[str, Any]:
    transport: dict[str, Any] = {
        # Above the hard time limit, so a running task is never redelivered while it still runs.
        "visibility_timeout": int(settings.worker.time_limit_s * 1.25) + 60,
    }
    if settings.celery.key_prefix:
        transport["global_keyprefix"] = settings.celery.key_prefix
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.celery.queue,
        "task_routes": {
            TASK_NAME: {"queue": settings.celery.queue},
            WEBHOOK_TASK_NAME: {"queue": settings.webhooks.queue},  # its own workers: GPU ones never wait on HTTP
        },
        "task_ignore_result": True,
        "result_backend": None,
    }


def make_sender(settings: Settings) -> Celery:
    sender = Celery("mudsc-api", set_as_current=False)
    sender.conf.update(celery_config(settings))
    return sender


def send_merge(sender: Celery, settings: Settings, job_id: str) -> None:
    sender.send_task(
        TASK_NAME,
        args=[job_id],
        queue=settings.celery.queue,
        task_id=job_id,
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
    )
