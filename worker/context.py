"""Per-process clients of the worker (created lazily after fork: boto3 clients are not fork-safe)."""

from __future__ import annotations

import gc
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
        _warm_transfers(ctx)
    except Exception as exc:  # noqa: BLE001 - botocore raises ClientError, EndpointConnectionError, timeouts...
        logger.warning("warm-up: the S3 round trip failed (%s); the first job will pay for its first transfers", exc)
    import mudsc_core.files  # noqa: F401 - torch, safetensors and the readers
    import mudsc_core.permutation.merge  # noqa: F401 - what a permutation job runs
    import mudsc_core.same_base.stream  # noqa: F401 - what a same-base job runs

    try:
        _warm_merge()
    except Exception as exc:  # noqa: BLE001 - a warm-up never stops the worker: the first job pays instead
        logger.warning("warm-up merge failed (%s); the first job will warm up", exc)
    # What the imports and the warm-up left is there for good: collect its garbage now, not in the middle of
    # the first job (Python's first full collection after the import of torch takes a while),
    # and move the survivors out of the collector's sight, so that every later full collection
    # (``_release_memory`` after each job) only walks what the jobs allocate.
    gc.collect()
    gc.freeze()
    logger.info(
        "pool process warmed up in %.1f s (connections open, S3 round trip, merge code imported, a tiny merge run)",
        time.monotonic() - started,
    )


def _warm_transfers(ctx: WorkerContext) -> None:
    """One real round trip through the job's own transfer code (:class:`worker.transfer.Transfers`) on the
    results bucket, under a key of this process's own that is deleted at once: a staged upload with its
    promotion (``upload_file``, ``copy``, ``delete_objects``), a listing, a ``head_object`` and a
    ``download_file``. The first job's transfers then find the connection pool open, the credentials and
    the endpoint rules of each operation resolved, and boto3's transfer machinery loaded (these cost its first
    upload about 0.6 s here)."""
    import os
    import socket
    import tempfile
    from pathlib import Path

    from worker.transfer import Transfers

    bucket = ctx.settings.s3.results_bucket
    ctx.s3.head_bucket(Bucket=bucket)  # S3 answers (else no more tries here: the warm-up must not hang)
    # no transfer started again after a failure (``Transfers.again``): a warm-up that fails gives up at once
    no_retry = ctx.settings.model_copy(update={"s3": ctx.settings.s3.model_copy(update={"transfer_retry_s": 0})})
    transfers = Transfers(ctx.s3, no_retry)
    prefix = f".warm-up/{socket.gethostname()}-{os.getpid()}/"
    with tempfile.TemporaryDirectory(prefix="mudsc-warm-up-s3-") as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        (out / "warm-up.json").write_bytes(b"{}\n")
        keys = transfers.upload_staged(out, f"s3://{bucket}/{prefix}", ".staging", lambda n: None)
        try:
            for _ in ctx.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                pass  # what a model folder's plan lists with
            objects = transfers.plan_file(f"s3://{bucket}/{keys[0]}", Path(tmp) / "in" / "warm-up.json")
            transfers.download(objects, lambda n: None)
        finally:
            transfers.delete_keys(bucket, keys)


def _warm_merge() -> None:
    """One tiny job's merge on local files (two 4-wide MLPs with calibration, through ``merge_files``, the
    worker's entry point): the first real job then finds the tracer, torch's kernels, the writers and the
    report's renderer (:mod:`mudsc_core.charts`, Pillow and its font) loaded."""
    import tempfile
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from mudsc_core import build_model
    from mudsc_core.files import LocalInputs, merge_files
    from mudsc_core.schema import JobSpec

    architecture = {"name": "mlp", "config": {"input_dim": 4, "hidden": [4], "num_classes": 2}}
    spec = JobSpec.model_validate(
        {
            "method": {"name": "mudsc", "params": {"mode": "zip"}},
            "architecture": architecture,
            "models": [{"uri": "s3://warm-up/a.safetensors"}, {"uri": "s3://warm-up/b.safetensors"}],
            "calibration": {"uri": "s3://warm-up/calibration.safetensors", "tensor": "inputs"},
        }
    )
    with tempfile.TemporaryDirectory(prefix="mudsc-warm-up-") as tmp:
        root = Path(tmp)
        models = [root / "a.safetensors", root / "b.safetensors"]
        for path in models:
            save_file({k: v.contiguous() for k, v in build_model(architecture).state_dict().items()}, path)
        save_file({"inputs": torch.randn(8, 4)}, root / "calibration.safetensors")
        inputs = LocalInputs(models=models, calibration=root / "calibration.safetensors")
        merge_files(spec, inputs, root / "out", device="cpu")
