"""A cancel racing the promotion of a result, 200 times, on the stack's real Redis and S3.

The worker's cut-over point is the promotion: a cancel that the fence sees before it wins (nothing is
promoted, the staged copies are deleted); one that arrives after it loses (the job succeeds with its
result). Whatever the timing, a job ends either ``succeeded`` with every artifact under its output prefix,
or ``canceled`` with nothing there but the manifest that says so.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from mudsc_core.errors import MergeCanceled
from mudsc_jobs.settings import Settings
from mudsc_jobs.store import JobStore, TransitionConflict
from worker.context import WorkerContext
from worker.tasks import JobRunner
from worker.transfer import Transfers

RUNS = 200


@pytest.fixture(scope="module")
def context(stack: Any) -> WorkerContext:
    env = {**stack.settings_env(), "MUDSC_REDIS__KEY_PREFIX": f"race-{uuid.uuid4().hex[:8]}:"}
    settings = Settings.model_validate(
        {
            "redis": {"url": env["MUDSC_REDIS__URL"], "key_prefix": env["MUDSC_REDIS__KEY_PREFIX"]},
            "s3": {
                "endpoint_url": env["MUDSC_S3__ENDPOINT_URL"],
                "access_key_id": env["MUDSC_S3__ACCESS_KEY_ID"],
                "secret_access_key": env["MUDSC_S3__SECRET_ACCESS_KEY"],
                "region": env["MUDSC_S3__REGION"],
                "results_bucket": env["MUDSC_S3__RESULTS_BUCKET"],
            },
            "worker": {"lease_ttl_s": 30},
        }
    )
    return WorkerContext(settings=settings, store=JobStore.from_settings(settings), s3=stack.s3_client())


def _keys(s3: Any, bucket: str, prefix: str) -> set[str]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {obj["Key"][len(prefix) :] for obj in listing.get("Contents", [])}


def _one_race(context: WorkerContext, work: Path, delay_s: float) -> str:
    bucket = context.settings.s3.results_bucket
    prefix = f"race/{uuid.uuid4().hex}/"
    output_uri = f"s3://{bucket}/{prefix}"
    spec = {"output": {"uri": output_uri}, "method": {"name": "linear"}}
    job, _ = context.store.create(tenant="race", spec=spec, labels={}, max_active=RUNS + 10)
    runner = JobRunner(job["id"], context, owner="race-test")
    runner.attempt = context.store.claim(job["id"], owner="race-test", lease_ttl_s=30, max_attempts=3).attempt
    out_dir = work / job["id"]
    out_dir.mkdir()
    for name, size in (("model.safetensors", 4096), ("report.json", 64), ("spec.json", 64)):
        (out_dir / name).write_bytes(b"x" * size)
    record = context.store.get(job["id"])

    def cancel_later() -> None:
        time.sleep(delay_s)
        try:
            context.store.request_cancel(job["id"], "race")
        except TransitionConflict:  # the job already succeeded: the API answers 409, the cancel lost
            return
        runner.observe("canceling")  # what the lease keeper's next beat would report

    canceller = threading.Thread(target=cancel_later)
    canceller.start()
    try:
        artifacts = runner.publish(out_dir, output_uri, record, Transfers(context.s3, context.settings))
        runner.cancellation_point()
        runner.finish("succeeded", result={"artifacts": artifacts, "metrics": {}})
    except MergeCanceled:
        runner._write_manifest_quietly(record, "canceled", None, None)
        runner.finish("canceled")
    canceller.join()
    status = context.store.get(job["id"])["status"]
    present = _keys(context.s3, bucket, prefix)
    if status == "succeeded":
        assert {"model.safetensors", "report.json", "spec.json", "manifest.json"} <= present, present
        manifest = json.loads(context.s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
        assert manifest["status"] == "succeeded"
    else:
        assert status == "canceled", status
        assert present <= {"manifest.json"}, present  # not a byte of the result
        if present:
            manifest = json.loads(context.s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
            assert manifest["status"] == "canceled"
    assert not any(".staging-" in key for key in present)
    return status


def test_a_cancel_racing_the_promotion_ends_one_way_or_the_other(context: WorkerContext, tmp_path: Path) -> None:
    rng = random.Random(0)
    outcomes = [_one_race(context, tmp_path, rng.uniform(0.0, 0.08)) for _ in range(RUNS)]
    print(f"cancel race: {outcomes.count('succeeded')} succeeded, {outcomes.count('canceled')} canceled")
    # Both sides of the cut-over were exercised (the delays straddle the promotion).
    assert outcomes.count("succeeded") > 0 and outcomes.count("canceled") > 0, outcomes
