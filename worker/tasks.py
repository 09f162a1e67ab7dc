"""The merge task: claim the job, fetch inputs, call the core, upload outputs, record the outcome.

The merge logic lives in ``mudsc_core.files.merge_files``; this module only moves files and
records state. torch is imported inside the task (in the pool process), never at import time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery import Task
from pydantic import ValidationError
from redis import RedisError

from mudsc_core.errors import MergeCanceled, MergeError
from mudsc_core.schema import JobSpec
from mudsc_jobs import logs
from mudsc_jobs.dispatch import TASK_NAME
from mudsc_jobs.metrics import method_of
from mudsc_jobs.store import TERMINAL, Claim, JobNotFound, StaleAttempt, TransitionConflict
from mudsc_jobs.webhooks import notify
from worker import context, observe
from worker.celery_app import app
from worker.transfer import Transfers, describe_outputs

logger = logging.getLogger(__name__)
PROGRESS_INTERVAL_S = 0.5
MANIFEST_NAME = "manifest.json"


class LeaseLost(Exception):
    """A newer attempt owns the job (or it ended elsewhere): stop without writing anything."""


def notify_webhook(ctx: context.WorkerContext, job_id: str) -> None:
    """After a terminal status: hand the job's webhook delivery (if any) to the webhooks queue, never waiting on
    HTTP here; a message that cannot be sent now is sent by the reconciler (the delivery is recorded pending)."""
    notify(app, ctx.settings, ctx.store.webhooks, job_id)


def _release_memory() -> None:
    """After a job (finished, failed or canceled): drop its tensors before the next one starts."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class LeaseKeeper(threading.Thread):
    """Renews the job's lease every ttl/3 while the merge runs; notices cancellation and lost leases."""

    def __init__(self, runner: JobRunner) -> None:
        super().__init__(name=f"lease-{runner.job_id}", daemon=True)
        self.runner = runner
        self.stopped = threading.Event()

    def run(self) -> None:
        interval = max(self.runner.lease_ttl_s / 3, 0.2)
        while not self.stopped.wait(interval):
            try:
                self.runner.observe(
                    self.runner.ctx.store.heartbeat(
                        self.runner.job_id, self.runner.attempt, lease_ttl_s=self.runner.lease_ttl_s
                    )
                )
            except (StaleAttempt, JobNotFound, TransitionConflict):
                self.runner.lease_lost.set()
                return
            except RedisError as exc:  # transient: the next beat may succeed before the lease runs out
                logger.warning("lease renewal of %s failed: %s", self.runner.job_id, exc)

    def stop(self) -> None:
        self.stopped.set()


class JobRunner:
    def __init__(self, job_id: str, ctx: context.WorkerContext, owner: str) -> None:
        self.job_id = job_id
        self.ctx = ctx
        self.owner = owner
        self.lease_ttl_s = float(ctx.settings.worker.lease_ttl_s)
        self.attempt = 0
        self.stage = "downloading"
        self.cancel_requested = threading.Event()
        self.lease_lost = threading.Event()
        self._last_publish = 0.0
        self._last_stage = ""
        self.timings: dict[str, float] = {}
        self._stage_started = time.monotonic()
        self._task_thread = threading.get_ident()
        self._delayed_stages: set[str] = set()
        self.committed = False  # the result is promoted: nothing can take the success back

    # ------------------------------------------------------------------ state helpers
    def observe(self, status: str) -> None:
        if status == "canceling":
            self.cancel_requested.set()

    def cancellation_point(self) -> None:
        """Between units of work: stop on cancel or on a lost lease (a cancel after promotion is too late)."""
        if self.lease_lost.is_set():
            raise LeaseLost(self.job_id)
        if self.cancel_requested.is_set() and not self.committed:
            raise MergeCanceled("canceled on request", stage=self.stage)

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        """The core's progress callback (also used for downloading/uploading). May raise MergeCanceled."""
        if stage != self.stage:
            now = time.monotonic()
            self.timings[self.stage] = self.timings.get(self.stage, 0.0) + now - self._stage_started
            self._stage_started = now
            self.stage = stage
        now = time.monotonic()
        fraction = min(max(float(fraction), 0.0), 1.0)
        if stage != self._last_stage or fraction >= 1.0 or now - self._last_publish >= PROGRESS_INTERVAL_S:
            self._last_stage, self._last_publish = stage, now
            try:
                status = self.ctx.store.heartbeat(
                    self.job_id,
                    self.attempt,
                    lease_ttl_s=self.lease_ttl_s,
                    progress={"stage": stage, "percent": round(fraction * 100, 2), "message": message[:500]},
                )
            except (StaleAttempt, JobNotFound, TransitionConflict):
                self.lease_lost.set()
                raise LeaseLost(self.job_id) from None
            except RedisError as exc:  # Redis restarting: progress is best effort, the lease keeper retries
                logger.warning("progress of %s not recorded: %s", self.job_id, exc)
            else:
                self.observe(status)
        self.cancellation_point()
        if (
            self.ctx.settings.worker.debug_stage_delay_s > 0
            and stage not in self._delayed_stages
            and threading.get_ident() == self._task_thread
        ):
            self._delayed_stages.add(stage)
            self._debug_delay(self.ctx.settings.worker.debug_stage_delay_s)

    def fence(self, strict: bool = True) -> None:
        """Confirm with the store, now, that this attempt still owns the job and was not canceled.

        ``strict``: an unreachable Redis raises (nothing may be promoted unconfirmed); else it is only logged.
        """
        try:
            self.observe(self.ctx.store.heartbeat(self.job_id, self.attempt, lease_ttl_s=self.lease_ttl_s))
        except (StaleAttempt, JobNotFound, TransitionConflict):
            self.lease_lost.set()
        except RedisError as exc:
            if strict:
                raise
            logger.warning("fence of %s skipped (Redis unavailable): %s", self.job_id, exc)
        self.cancellation_point()

    def _still_owner(self) -> bool:
        """Whether the store confirms, now, that this attempt owns the job (False when it cannot be reached)."""
        try:
            self.ctx.store.heartbeat(self.job_id, self.attempt, lease_ttl_s=self.lease_ttl_s)
        except (StaleAttempt, JobNotFound, TransitionConflict, RedisError):
            self.lease_lost.set()
            return False
        return True

    def _debug_delay(self, seconds: float) -> None:
        """MUDSC_WORKER__DEBUG_STAGE_DELAY_S (tests only): wait at a stage start, still cancelable and fenced."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(min(0.25, max(deadline - time.monotonic(), 0)))
            self.fence(strict=False)

    def byte_progress(self, stage: str, total: int, what: str) -> Any:
        done = [0]
        lock = threading.Lock()

        def on_bytes(n: int) -> None:
            with lock:
                done[0] += n
                due = time.monotonic() - self._last_publish >= PROGRESS_INTERVAL_S
            # Called from boto3 transfer threads: publish only, never raise there.
            if due:
                try:
                    self.progress(stage, done[0] / max(total, 1), f"{what} {done[0]}/{total} bytes")
                except (MergeCanceled, LeaseLost):
                    pass

        return on_bytes

    def finish(self, status: str, *, result: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> None:
        job = self.ctx.store.get(self.job_id)
        try:
            self.ctx.store.complete(self.job_id, job["tenant"], self.attempt, status=status, result=result, error=error)
        except (StaleAttempt, TransitionConflict) as exc:
            logger.warning("job %s attempt %d: outcome %s not recorded (%s)", self.job_id, self.attempt, status, exc)
            return
        self.close_stage()
        code = (error or {}).get("code")
        logger.info("job %s attempt %d: %s%s", self.job_id, self.attempt, status, f" ({code})" if code else "")
        observe.attempt_ended(self.ctx.store, job, status, code, self.timings, observe.peak_memory())
        notify_webhook(self.ctx, self.job_id)

    def close_stage(self) -> None:
        """Add the current stage's seconds so far to ``timings`` (for the record of an attempt that ends)."""
        now = time.monotonic()
        self.timings[self.stage] = self.timings.get(self.stage, 0.0) + now - self._stage_started
        self._stage_started = now

    # ------------------------------------------------------------------ the run
    def run(self) -> Claim:
        settings = self.ctx.settings
        before = observe.status_of(self.ctx.store, self.job_id)
        claim = self.ctx.store.claim(
            self.job_id, owner=self.owner, lease_ttl_s=self.lease_ttl_s, max_attempts=settings.worker.max_attempts
        )
        if claim.outcome == "terminal" and before in ("running", "canceling"):
            observe.ended_by_claim(self.ctx.store, self.job_id)  # this claim ended it: its worker was gone
        if claim.outcome == "terminal":  # perhaps ended just now (a lost attempt's cancel or worker_lost)
            notify_webhook(self.ctx, self.job_id)
        if claim.outcome != "claimed":
            logger.info(
                "job %s: %s (attempt %d, status %s): nothing to do",
                self.job_id,
                claim.outcome,
                claim.attempt,
                claim.status,
            )
            return claim
        self.attempt = claim.attempt
        logs.bind(attempt=self.attempt)
        job = self.ctx.store.get(self.job_id)
        logger.info("job %s attempt %d: running (%s)", self.job_id, self.attempt, method_of(job))
        if self.attempt == 1:
            observe.queue_wait(self.ctx.store, job)
        observe.reset_peak_memory()
        keeper = LeaseKeeper(self)
        keeper.start()
        scratch_root = Path(settings.worker.scratch_dir) if settings.worker.scratch_dir else None
        if scratch_root is not None:
            scratch_root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{self.job_id}-a{self.attempt}-", dir=scratch_root))
        try:
            self._run(job, scratch)
        except LeaseLost:
            logger.warning("job %s attempt %d lost its lease; stopping without writing", self.job_id, self.attempt)
        except RedisError as exc:  # the store is unreachable: nothing can be confirmed, so nothing is written
            logger.warning(
                "job %s attempt %d: job store unreachable (%s); stopping without writing (the lease expires and "
                "the reconciler re-queues the job)",
                self.job_id,
                self.attempt,
                exc,
            )
        except MergeCanceled:
            self._write_manifest_quietly(job, "canceled", None, None)
            self.finish("canceled")
        except SoftTimeLimitExceeded:
            limit = settings.worker.effective_soft_time_limit_s
            error = {
                "code": "timeout",
                "message": f"the merge exceeded the time limit of {limit} s",
                "stage": self.stage,
                "retryable": False,
            }
            self._write_manifest_quietly(job, "failed", None, error)
            self.finish("failed", error=error)
        except MergeError as exc:
            error = {
                "code": exc.code,
                "message": exc.message,
                "stage": exc.stage or self.stage,
                "retryable": exc.retryable,
            }
            self._write_manifest_quietly(job, "failed", None, error)
            self.finish("failed", error=error)
        except Exception as exc:  # the job must end failed, not stay running, whatever went wrong
            logger.exception("job %s attempt %d failed unexpectedly", self.job_id, self.attempt)
            error = {
                "code": "internal",
                "message": f"internal error ({type(exc).__name__})",
                "stage": self.stage,
                "retryable": False,
            }
            self._write_manifest_quietly(job, "failed", None, error)
            self.finish("failed", error=error)
        finally:
            keeper.stop()
            shutil.rmtree(scratch, ignore_errors=True)
            _release_memory()
        return claim

    def _run(self, job: dict[str, Any], scratch: Path) -> None:
        settings = self.ctx.settings
        transfers = Transfers(self.ctx.s3, settings)
        try:
            spec = JobSpec.model_validate(job["spec"])
        except ValidationError as exc:
            raise MergeError(f"the stored job spec no longer validates: {exc.errors()[:3]}") from None
        self.progress("downloading", 0.0, "listing inputs")

        # ---- inputs
        from mudsc_core.files import LocalInputs, merge_files

        inputs_dir = scratch / "in"
        plan: list[Any] = []
        model_paths: list[Path] = []
        fetched: dict[str, Path] = {}  # a model named twice (a base under two LoRA adapters) is fetched once
        for index, model in enumerate([*spec.models, *([spec.base_model] if spec.base_model else [])]):
            if model.uri in fetched:
                model_paths.append(fetched[model.uri])
                continue
            if model.uri.endswith("/"):
                local = inputs_dir / f"model{index}"
                objects = transfers.plan_folder(model.uri, local)
            else:
                local = inputs_dir / f"model{index}.safetensors"
                objects = transfers.plan_file(model.uri, local)
            transfers.check_size(model.uri, objects)
            plan.extend(objects)
            model_paths.append(local)
            fetched[model.uri] = local
        lora_paths: list[Path | None] = []
        for index, model in enumerate(spec.models):  # each adapter beside the model it applies to
            lora_local = None
            if model.lora is not None:
                lora_local = inputs_dir / f"model{index}.lora"
                objects = transfers.plan_adapter_folder(model.lora.uri, lora_local)
                transfers.check_size(model.lora.uri, objects)
                plan.extend(objects)
            lora_paths.append(lora_local)
        calibration_path = None
        if spec.calibration is not None:
            calibration_path = inputs_dir / "calibration.safetensors"
            plan.extend(transfers.plan_file(spec.calibration.uri, calibration_path))
        total = sum(o.size for o in plan)
        transfers.download(plan, self.byte_progress("downloading", total, "downloaded"))
        self.progress("downloading", 1.0, f"{len(plan)} objects, {total} bytes")
        base = model_paths.pop() if spec.base_model else None
        inputs = LocalInputs(models=model_paths, base_model=base, calibration=calibration_path, loras=lora_paths)

        # ---- merge
        from mudsc_core.devices import resolve_device

        device = str(resolve_device(settings.worker.device))
        try:
            self.ctx.store.log(self.job_id, self.attempt, f"merging on {device}", device=device)
        except (StaleAttempt, JobNotFound, TransitionConflict):
            raise LeaseLost(self.job_id) from None
        out_dir = scratch / "out"
        from mudsc_core.permutation.memory import peak_rss_bytes, reset_peak_rss, resolve_budget

        reset_peak_rss()  # the job's own peak, not the pool process's since it started
        budget = resolve_budget(settings.worker.memory_budget_bytes)
        report = merge_files(spec, inputs, out_dir, device=device, progress=self.progress, memory_budget_bytes=budget)
        measured_peak = peak_rss_bytes()
        self.cancellation_point()

        # ---- outputs
        self.progress("uploading", 0.0, "uploading results")
        output_uri = spec.output.uri or job["spec"]["output"]["uri"]
        artifacts = self.publish(out_dir, output_uri, job, transfers)
        self.progress("uploading", 1.0, f"{len(artifacts)} files")
        self.close_stage()
        metrics = dict(report.get("metrics") or {})
        metrics.setdefault("timings_s", {})
        if isinstance(metrics["timings_s"], dict):
            metrics["timings_s"] = {**{k: round(v, 3) for k, v in self.timings.items()}, **metrics["timings_s"]}
        metrics["device"] = device
        estimated = (metrics.get("memory") or {}).get("estimated_peak_bytes")
        metrics["memory"] = {"estimated_peak_bytes": estimated, "measured_peak_rss_bytes": measured_peak}
        self.finish("succeeded", result={"artifacts": artifacts, "metrics": metrics})

    def publish(
        self, out_dir: Path, output_uri: str, job: dict[str, Any], transfers: Transfers
    ) -> list[dict[str, Any]]:
        """Upload the result with its manifest, then promote it: the cut-over point of the job.

        Everything (the manifest included) is staged under a per-attempt prefix and promoted only if this
        attempt still owns the job and was not canceled (a stale worker that wakes up late never overwrites a
        newer attempt's outputs). Once promoted the job has succeeded: a cancel that arrives later loses, so a
        job never ends canceled with a complete result under its output prefix.
        """
        results = describe_outputs(out_dir, output_uri)
        (out_dir / MANIFEST_NAME).write_bytes(self._manifest(job, "succeeded", results, None))
        artifacts = describe_outputs(out_dir, output_uri)  # the results and the manifest listing them
        out_bytes = sum(a["size"] for a in artifacts)
        transfers.upload_staged(
            out_dir,
            output_uri,
            f".staging-{self.job_id}-a{self.attempt}",
            self.byte_progress("uploading", out_bytes, "uploaded"),
            before_promote=self.fence,
        )
        self.committed = True
        return artifacts

    def _manifest(
        self, job: dict[str, Any], status: str, artifacts: list[dict[str, Any]] | None, error: dict[str, Any] | None
    ) -> bytes:
        return json.dumps(
            {
                "job_id": self.job_id,
                "status": status,
                "attempt": self.attempt,
                "created_at": job["created_at"],
                "artifacts": artifacts or [],
                "error": error,
                "spec_uri": job["spec"]["output"]["uri"] + "spec.json",
            },
            indent=2,
        ).encode()

    def _write_manifest_quietly(self, job: dict[str, Any], status: str, artifacts: Any, error: Any) -> None:
        """Best effort: a failed or canceled job also leaves a manifest saying so beside its (absent) results.

        Only an attempt that still owns the job writes it (confirmed with the store just before): a stale
        worker must never overwrite the manifest of a newer attempt's result.
        """
        if self.lease_lost.is_set() or not self._still_owner():
            return
        try:
            Transfers(self.ctx.s3, self.ctx.settings).put_json(
                job["spec"]["output"]["uri"] + MANIFEST_NAME, self._manifest(job, status, artifacts, error)
            )
        except Exception as exc:  # noqa: BLE001 - best effort: never mask the real outcome
            logger.warning("job %s: could not write the %s manifest: %s", self.job_id, status, exc)


class MergeTask(Task):
    # Redeliveries that meet a live lease re-check later; there is no cap on those re-checks,
    # since each one either finds the job done, finds the lease live again, or takes over.
    max_retries = None

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Runs in the parent on a hard time limit (the pool process was killed): fail the job as `timeout`."""
        if not isinstance(exc, TimeLimitExceeded) or not args:
            return
        job_id = str(args[0])
        store = context.get().store
        try:
            job = store.get(job_id)
            if job["status"] in TERMINAL:
                return
            error = {
                "code": "timeout",
                "message": f"the merge was killed at the hard time limit "
                f"({context.get().settings.worker.time_limit_s} s)",
                "stage": (job.get("progress") or {}).get("stage"),
                "retryable": False,
            }
            store.complete(job_id, job["tenant"], job["attempt"], status="failed", error=error)
            observe.attempt_ended(store, job, "failed", "timeout", {}, {})
            notify_webhook(context.get(), job_id)
        except (JobNotFound, StaleAttempt, TransitionConflict, RedisError) as failure:
            logger.warning("job %s: could not record the hard timeout: %s", job_id, failure)


@app.task(name=TASK_NAME, bind=True, base=MergeTask, acks_late=True, reject_on_worker_lost=True)
def merge(self: MergeTask, job_id: str) -> None:
    owner = f"{socket.gethostname()}:{os.getpid()}:{self.request.id}"
    claim = JobRunner(job_id, context.get(), owner).run()  # (its log lines name the job: celery_app.py)
    if claim.outcome == "leased":
        # Another delivery holds a live lease. Usually it is running; if its worker died, the
        # lease runs out: look again then, and take over (or fail `worker_lost`) if it did.
        raise self.retry(countdown=claim.lease_remaining_s + 1.0)
