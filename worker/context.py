"""Per-process clients of the worker (created lazily after fork: boto3 clients are not fork-safe)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from mudsc_jobs.settings import Settings
from mudsc_jobs.storage import make_client
from mudsc_jobs.store import JobStore

logger = logging.getLogger(__name__)


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


def warm_up() -> None:
    """At a merge pool process's start: open its connections and import the merge code (torch included), so
    that its first job runs as fast as the next ones instead of paying seconds of imports and handshakes."""
    started = time.monotonic()
    ctx = get()
    if not ctx.store.ping():
        logger.warning("warm-up: the job store did not answer; the first job will connect")
    try:
        ctx.s3.head_bucket(Bucket=ctx.settings.s3.results_bucket)  # opens the connection pool
    except Exception as exc:  # noqa: BLE001 - botocore raises ClientError, EndpointConnectionError, timeouts...
        logger.warning("warm-up: S3 did not answer (%s); the first job will connect", exc)
    import mudsc_core.files  # noqa: F401 - torch, safetensors and the readers
    import mudsc_core.permutation.merge  # noqa: F401 - what a permutation job runs
    import mudsc_core.same_base.stream  # noqa: F401 - what a same-base job runs

    try:
        _warm_merge()
    except Exception as exc:  # noqa: BLE001 - a warm-up never stops the worker: the first job pays instead
        logger.warning("warm-up merge failed (%s); the first job will warm up", exc)
    logger.info("pool process warmed up in %.1f s (connections open, merge code imported)", time.monotonic() - started)


def _warm_merge() -> None:
    """One tiny merge in memory (two 4-wide MLPs, with calibration): the first real job then finds the tracer,
    torch's kernels and the lazily built caches ready."""
    import torch

    from mudsc_core import build_model
    from mudsc_core.permutation.merge import merge

    architecture = {"name": "mlp", "config": {"input_dim": 4, "hidden": [4], "num_classes": 2}}
    states = [build_model(architecture).state_dict() for _ in range(2)]
    merge(states, architecture, {"name": "mudsc", "params": {"mode": "zip"}}, torch.randn(8, 4), device="cpu")
