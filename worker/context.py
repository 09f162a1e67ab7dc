"""Per-process clients of the worker (created lazily after fork: boto3 clients are not fork-safe)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mudsc_jobs.settings import Settings
from mudsc_jobs.storage import make_client
from mudsc_jobs.store import JobStore


@dataclass
class WorkerContext:
    settings: Settings
    store: JobStore
    s3: Any


_context: WorkerContext | None = None


def get() -> WorkerContext:
    global _context
    if _context is None:
        settings = Settings()
        _context = WorkerContext(
            settings=settings,
            store=JobStore.from_settings(settings, timeout_s=10.0),
            s3=make_client(settings.s3),
        )
    return _context


def reset() -> None:
    global _context
    _context = None
