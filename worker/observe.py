"""What the merge worker measures about each attempt: queue wait, seconds per stage, outcome, peak memory.

Recorded into Redis (:mod:`mudsc_jobs.metrics`) and rendered by the API's ``/metrics``. Peak memory is per
attempt, not per process lifetime: a pool process runs many jobs, so its resident-set high-water mark is
reset when an attempt starts and read when it ends (``mudsc_core.permutation.memory``: Linux's
``/proc/self/clear_refs`` and ``VmHWM``), and torch's CUDA peak statistics likewise. Where the reset is
refused the process's lifetime peak is reported.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from mudsc_jobs import metrics
from mudsc_jobs.store import JobNotFound, JobStore, utcnow

logger = logging.getLogger(__name__)


def recorder(store: JobStore) -> metrics.MetricsRecorder:
    return metrics.MetricsRecorder(store.redis, store.prefix)


def reset_peak_memory() -> None:
    """Restart the peak statistics (resident set, CUDA) at the start of an attempt."""
    from mudsc_core.permutation.memory import reset_peak_rss  # imports torch: only in the pool process

    reset_peak_rss()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, int]:
    """``rss``: this process's peak resident set since the last reset (the merge resets it again when it
    starts); ``cuda``: torch's peak allocation, where CUDA was used."""
    from mudsc_core.permutation.memory import peak_rss_bytes

    peaks = {"rss": peak_rss_bytes()}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["cuda"] = int(torch.cuda.max_memory_allocated())
    return peaks


def queue_wait(store: JobStore, job: Mapping[str, Any]) -> None:
    """Submission to running of the job's first attempt (later attempts waited on a lost worker, not the queue)."""
    try:
        waited = (datetime.fromisoformat(utcnow()) - datetime.fromisoformat(str(job["created_at"]))).total_seconds()
    except (KeyError, ValueError):
        return
    recorder(store).observe(metrics.QUEUE_WAIT, [metrics.method_of(job)], max(waited, 0.0))


def attempt_ended(
    store: JobStore,
    job: Mapping[str, Any],
    outcome: str,
    error_code: str | None,
    timings_s: Mapping[str, float],
    peaks: Mapping[str, int],
) -> None:
    method = metrics.method_of(job)
    metrics.record_finished(store, job, outcome, error_code)
    record = recorder(store)
    record.observe_many(metrics.STAGE_DURATION, [([method, stage], s) for stage, s in timings_s.items()])
    record.observe_many(metrics.PEAK_MEMORY, [([method, kind], float(b)) for kind, b in peaks.items()])
    for kind, value in peaks.items():  # per host: the latest job of any of its pool processes
        record.set(metrics.LAST_PEAK_MEMORY, [socket.gethostname(), kind], float(value))


def status_of(store: JobStore, job_id: str) -> str | None:
    try:
        return str(store.get(job_id)["status"])
    except JobNotFound:
        return None


def ended_by_claim(store: JobStore, job_id: str) -> None:
    """Count a job that a redelivery's claim ended (canceled, or ``worker_lost``: the last attempt's worker died)."""
    try:
        job = store.get(job_id)
    except JobNotFound:
        return
    metrics.record_finished(store, job, str(job["status"]), (job.get("error") or {}).get("code"))
