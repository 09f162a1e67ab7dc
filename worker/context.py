"""Per-process clients of the worker (created lazily after fork: boto3 clients are not fork-safe)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.s3 import make_client
from app.settings import Settings
from app.store import JobStore


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
            store=JobStore.from_url(settings.redis.url, prefix=settings.redis.key_prefix,
                                    job_ttl_s=settings.job_ttl_s, timeout_s=10.0),
            s3=make_client(settings.s3),
        )
    return _context


def reset() -> None:
    global _context
    _context = None
