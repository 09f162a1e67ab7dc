"""Structured logs: every worker log line names the job and attempt it belongs to.

A pool process runs one task at a time (prefork, one slot per process), so the job being worked on is a
process-wide context (:func:`bind` / :func:`clear`), seen by every thread of the process: the lease keeper,
boto3's transfer threads, the merge's write-behind thread. :class:`JobContextFilter` puts ``job_id`` and
``attempt`` on every record (``None`` outside a job); :class:`JsonFormatter` writes one JSON object per line.
``MUDSC_WORKER__LOG_FORMAT=json`` switches the worker's handlers to it (``worker/celery_app.py``).
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from typing import Any

_context: dict[str, Any] = {}
_lock = threading.Lock()
CONTEXT_FIELDS = ("job_id", "attempt")
# What a LogRecord has on its own; anything else on a record was passed as ``extra=`` and is kept.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def bind(**fields: Any) -> None:
    """Name the job (``job_id``, ``attempt``) that this process's log lines belong to from now on."""
    with _lock:
        _context.update(fields)


def clear() -> None:
    with _lock:
        _context.clear()


def current() -> dict[str, Any]:
    with _lock:
        return dict(_context)


class JobContextFilter(logging.Filter):
    """Sets ``record.job_id`` and ``record.attempt`` (``None`` outside a job) unless the call gave them."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = current()
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, context.get(name))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, job id, attempt, process, thread, extras."""

    def format(self, record: logging.LogRecord) -> str:
        context = current()
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", context.get("job_id")),
            "attempt": getattr(record, "attempt", context.get("attempt")),
            "process": record.processName,
            "pid": record.process,
            "thread": record.threadName,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def install(logger: logging.Logger, log_format: str) -> None:
    """Give every handler of ``logger`` the job-context filter and, for ``json``, the JSON formatter."""
    for handler in logger.handlers:
        if not any(isinstance(f, JobContextFilter) for f in handler.filters):
            handler.addFilter(JobContextFilter())
        if log_format == "json":
            handler.setFormatter(JsonFormatter())
