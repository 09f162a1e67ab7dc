"""Faults through real processes: SIGKILL/SIGSTOP of workers, redelivery, the reconciler, a Redis restart,
dead S3, cancellation in each stage, the job time limit, and no secrets in logs or records.

Each scenario runs on a *private* slice of the session stack (its own job-store and broker key prefixes,
so the shared worker never sees these jobs) with its own API and worker processes, started with
``MUDSC_WORKER__DEBUG_STAGE_DELAY_S`` so that every stage lasts long enough to act in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
from safetensors.torch import save as save_safetensors

from mudsc_core import build_model
from tests.integration.faults import (
    assert_clean_success,
    assert_no_result,
    done,
    running,
    status_events,
    submit,
    wait,
)

RUN = uuid.uuid4().hex[:8]
ARCH = {"name": "mlp", "config": {"input_dim": 64, "hidden": [32, 32], "num_classes": 10}}
METHOD = {"name": "mudsc", "params": {"mode": "zip", "beta": 0.5, "seed": 0}}
DELAY_S = 1.5  # per stage: a job lasts ~5 stages x DELAY_S
LEASE_S = 3


# ----------------------------------------------------------------------------------------------- helpers
class Slice:
    """A private API + worker(s) of the session stack: own Redis key prefixes, same Redis and S3."""

    def __init__(self, stack: Any, name: str, env: dict[str, str]) -> None:
        self.stack, self.name = stack, name
        self.prefix = f"mudsc:{name}:"
        self.env = {"MUDSC_REDIS__KEY_PREFIX": self.prefix, "MUDSC_CELERY__KEY_PREFIX": f"celery:{name}:", **env}
        self.redis_url = self.env.get("MUDSC_REDIS__URL", stack.redis_url)
        self.workers: list[str] = []
        self.apis: list[str] = []
        self.api_url = ""

    def start_api(self, **extra: str) -> str:
        name = f"api-{self.name}"
        self.api_url, _ = self.stack.start_api({**self.env, **extra}, name=name)
        self.apis.append(name)
        return self.api_url

    def start_worker(self, suffix: str, concurrency: int = 1, **extra: str) -> str:
        name = f"{self.name}{suffix}"
        self.stack.start_worker(name, env_overrides={**self.env, **extra}, concurrency=concurrency)
        self.workers.append(f"worker-{name}")
        return f"worker-{name}"

    def kill(self, proc_name: str, sig: int = signal.SIGKILL) -> None:
        self.stack.stop_process(proc_name, sig=sig)
        self.workers.remove(proc_name)

    def stop(self) -> None:
        for name in [*self.workers, *self.apis]:
            try:
                self.stack.stop_process(name)
            except KeyError:
                pass
        self.workers.clear()
        self.apis.clear()

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.api_url, headers={"Authorization": f"Bearer {key or self.stack.api_key}"}, timeout=60
        )

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def job_field(self, job_id: str, field: str) -> str | None:
        return self.redis().hget(f"{self.prefix}job:{job_id}", field)

    def pool_pid(self, job_id: str) -> int:
        """Pid of the pool process running the job (the lease owner is ``host:pid:task id``)."""
        return int((self.job_field(job_id, "lease_owner") or "::").split(":")[1])


def _checkpoint(seed: int) -> bytes:
    torch.manual_seed(seed)
    return save_safetensors({k: v.detach().clone().contiguous() for k, v in build_model(ARCH).state_dict().items()})


@pytest.fixture(scope="module")
def uris(stack: Any) -> dict[str, str]:
    s3 = stack.s3_client()
    torch.manual_seed(3)
    objects = {
        "a": ("models", f"rel-{RUN}/a.safetensors", _checkpoint(0)),
        "b": ("models", f"rel-{RUN}/b.safetensors", _checkpoint(1)),
        "calib": ("data", f"rel-{RUN}/calib.safetensors", save_safetensors({"inputs": torch.randn(64, 64)})),
    }
    for bucket, key, body in objects.values():
        s3.put_object(Bucket=stack.buckets[bucket], Key=key, Body=body)
    return {name: f"s3://{stack.buckets[bucket]}/{key}" for name, (bucket, key, _) in objects.items()}


def spec(uris: dict[str, str], **extra: Any) -> dict[str, Any]:
    body = {
        "method": METHOD,
        "architecture": ARCH,
        "models": [{"uri": uris["a"]}, {"uri": uris["b"]}],
        "calibration": {"uri": uris["calib"], "tensor": "inputs", "max_samples": 64, "batch_size": 32},
        "labels": {"run": RUN},
    }
    body.update(extra)
    return body


# ----------------------------------------------------------------------------------------------- redelivery
@pytest.fixture(scope="module")
def rel(stack: Any) -> Iterator[Slice]:
    """API with a 0.5 s reconciler; one worker with two pool processes; 3 s leases; at most 2 attempts."""
    common = {
        "MUDSC_WORKER__LEASE_TTL_S": str(LEASE_S),
        "MUDSC_WORKER__MAX_ATTEMPTS": "2",
        "MUDSC_WORKER__DEBUG_STAGE_DELAY_S": str(DELAY_S),
    }
    part = Slice(stack, f"rel{RUN}", common)
    part.start_api(MUDSC_RECONCILE__INTERVAL_S="0.5")
    part.start_worker("a", concurrency=2)
    yield part
    part.stop()


def test_sigkill_of_the_pool_process_is_redelivered_and_attempt_2_succeeds(
    rel: Slice, uris: dict[str, str], stack: Any
) -> None:
    with rel.client() as api:
        job_id = submit(api, spec(uris))
        wait(api, job_id, running(1, "matching"))
        os.kill(rel.pool_pid(job_id), signal.SIGKILL)  # mid-merge, no chance to clean up
        job = wait(api, job_id, done)
        assert job["attempt"] == 2, job
        assert_clean_success(stack, job)
        statuses = status_events(api, job_id)
        assert [s for s in statuses if s[0] == "running"] == [("running", 1), ("running", 2)], statuses
        assert statuses[-1] == ("succeeded", 2) and sum(s[0] == "succeeded" for s in statuses) == 1


def test_killed_on_every_attempt_fails_worker_lost(rel: Slice, uris: dict[str, str], stack: Any) -> None:
    with rel.client() as api:
        job_id = submit(api, spec(uris))
        wait(api, job_id, running(1, "downloading"))
        os.kill(rel.pool_pid(job_id), signal.SIGKILL)
        wait(api, job_id, running(2, "downloading"), timeout_s=60)
        os.kill(rel.pool_pid(job_id), signal.SIGKILL)
        job = wait(api, job_id, done, timeout_s=60)
        assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
        assert job["attempt"] == 2 and job["error"]["retryable"] is True
        assert_no_result(stack, job)
        # the worker is not stuck: the next job runs to the end on the first attempt
        after = wait(api, submit(api, spec(uris)), done)
        assert after["attempt"] == 1
        assert_clean_success(stack, after)


def test_duplicate_delivery_while_the_first_runs_does_nothing(rel: Slice, uris: dict[str, str]) -> None:
    from mudsc_jobs.dispatch import make_sender, send_merge
    from mudsc_jobs.settings import Settings

    settings = Settings(
        redis={"url": rel.redis_url, "key_prefix": rel.prefix},
        celery={"broker_url": rel.redis_url, "key_prefix": rel.env["MUDSC_CELERY__KEY_PREFIX"]},
    )
    with rel.client() as api:
        job_id = submit(api, spec(uris))
        wait(api, job_id, running(1))
        send_merge(make_sender(settings), settings, job_id)  # the second pool process takes the duplicate
        job = wait(api, job_id, done)
        assert job["status"] == "succeeded" and job["attempt"] == 1, job
        statuses = status_events(api, job_id)
        assert statuses == [("queued", 0), ("running", 1), ("succeeded", 1)], statuses
    # it ran past several lease lifetimes on attempt 1: the running worker renewed its lease
    started = time.mktime(time.strptime(job["started_at"][:19], "%Y-%m-%dT%H:%M:%S"))
    finished = time.mktime(time.strptime(job["finished_at"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert finished - started > LEASE_S
    log = Path(rel.stack.logs / f"{rel.workers[0]}.log").read_text()
    assert f"job {job_id}: leased (attempt 1" in log


def test_a_stale_worker_is_fenced_off(rel: Slice, uris: dict[str, str], stack: Any) -> None:
    """SIGSTOP the pool process: its lease expires, the reconciler re-queues, attempt 2 runs on the other pool
    process; SIGCONT the stale one: it notices it lost the job and writes nothing."""
    with rel.client() as api:
        job_id = submit(api, spec(uris))
        wait(api, job_id, running(1, "downloading"))
        stale = rel.pool_pid(job_id)
        os.kill(stale, signal.SIGSTOP)
        try:
            wait(api, job_id, running(2), timeout_s=30)
        finally:
            os.kill(stale, signal.SIGCONT)
        job = wait(api, job_id, done)
        assert job["attempt"] == 2
        assert_clean_success(stack, job)
        statuses = status_events(api, job_id)
        assert ("queued", 1) in statuses and statuses[-1] == ("succeeded", 2), statuses
    deadline = time.monotonic() + 10
    log_path = Path(rel.stack.logs / f"{rel.workers[0]}.log")
    while f"job {job_id} attempt 1 lost its lease" not in log_path.read_text():
        assert time.monotonic() < deadline, "the stale attempt never noticed it lost its lease"
        time.sleep(0.2)


def test_whole_worker_sigkill_reconciler_requeues_to_another_worker(
    rel: Slice, uris: dict[str, str], stack: Any
) -> None:
    """The whole worker (parent and pool) dies: the message stays unacked until the visibility timeout (an
    hour); the API's reconciler finds the expired lease and re-queues; a new worker runs attempt 2."""
    with rel.client() as api:
        job_id = submit(api, spec(uris))
        wait(api, job_id, running(1, "matching"))
        rel.kill(rel.workers[0])  # SIGKILL to the process group
        requeued = wait(api, job_id, lambda j: j["status"] == "queued", timeout_s=LEASE_S + 10)
        assert requeued["attempt"] == 1
        rel.start_worker("b")
        job = wait(api, job_id, done)
        assert job["attempt"] == 2
        assert_clean_success(stack, job)


@pytest.mark.parametrize("stage", ["downloading", "matching", "uploading"])
def test_cancel_in_each_stage(rel: Slice, uris: dict[str, str], stack: Any, stage: str) -> None:
    with rel.client() as api:
        job_id = submit(api, spec(uris))
        wait(api, job_id, running(1, stage))
        assert api.post(f"/v1/merges/{job_id}/cancel").json()["status"] == "canceling"
        job = wait(api, job_id, done, timeout_s=30)
        assert job["status"] == "canceled" and job["result"] is None, job
        assert_no_result(stack, job)
        assert api.get(f"/v1/merges/{job_id}/artifacts").status_code == 409
    if stage == "uploading":  # the worker moved on: the next job runs to the end
        with rel.client() as api:
            assert_clean_success(stack, wait(api, submit(api, spec(uris)), done))


# ----------------------------------------------------------------------------------------------- time limit, S3
def test_job_time_limit_fails_with_timeout_and_dead_s3_with_storage_unavailable(
    stack: Any,
    uris: dict[str, str],
) -> None:
    timed = Slice(
        stack,
        f"tl{RUN}",
        {
            "MUDSC_WORKER__SOFT_TIME_LIMIT_S": "3",
            "MUDSC_WORKER__TIME_LIMIT_S": "6",
            "MUDSC_WORKER__DEBUG_STAGE_DELAY_S": "2",
        },
    )
    dead = Slice(stack, f"s3{RUN}", {})
    try:
        timed.start_api(MUDSC_RECONCILE__INTERVAL_S="0")
        timed.start_worker("t")
        dead.start_api(MUDSC_RECONCILE__INTERVAL_S="0")  # the API checks inputs against the real S3 ...
        # ... the worker's S3 endpoint refuses connections: boto3 retries with backoff, then the job fails
        dead.start_worker(
            "d",
            MUDSC_S3__ENDPOINT_URL="http://127.0.0.1:9",
            MUDSC_S3__MAX_ATTEMPTS="3",
            MUDSC_S3__CONNECT_TIMEOUT_S="1",
        )
        with timed.client() as api_t, dead.client() as api_d:
            timed_id, dead_id = submit(api_t, spec(uris)), submit(api_d, spec(uris))
            job = wait(api_t, timed_id, done, timeout_s=60)
            assert job["status"] == "failed" and job["error"]["code"] == "timeout", job
            assert_no_result(stack, job)
            job = wait(api_d, dead_id, done, timeout_s=60)
            assert job["status"] == "failed", job
            assert job["error"]["code"] == "storage_unavailable" and job["error"]["retryable"] is True, job
            assert job["error"]["stage"] == "downloading"
            assert_no_result(stack, job)
    finally:
        timed.stop()
        dead.stop()


# ----------------------------------------------------------------------------------------------- Redis restart
def _redis_server(port: int, data: Path) -> subprocess.Popen[bytes]:
    # appendonly yes + appendfsync everysec: what the service relies on to keep terminal states over a restart
    proc = subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--protected-mode",
            "yes",
        ],
        stdout=open(data / "redis.log", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            if redis.Redis(port=port, socket_connect_timeout=0.5).ping():
                return proc
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.1)


def test_redis_restart_during_a_run_loses_nothing(stack: Any, uris: dict[str, str], tmp_path: Path) -> None:
    from scripts.localstack import free_port

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = _redis_server(port, tmp_path)
    part = Slice(
        stack,
        f"rr{RUN}",
        {"MUDSC_REDIS__URL": url, "MUDSC_CELERY__BROKER_URL": url, "MUDSC_WORKER__DEBUG_STAGE_DELAY_S": "1"},
    )
    try:
        part.start_api(MUDSC_RECONCILE__INTERVAL_S="1")
        part.start_worker("w")
        with part.client() as api:
            finished = wait(api, submit(api, spec(uris)), done)
            assert finished["status"] == "succeeded"
            job_id = submit(api, spec(uris))
            wait(api, job_id, running(1, "collecting_activations"))
            server.send_signal(signal.SIGTERM)  # a restart: the AOF is rewritten to disk, then replayed
            server.wait(timeout=20)
            time.sleep(1.0)
            server = _redis_server(port, tmp_path)
            job = wait(api, job_id, done, timeout_s=90)
            assert job["status"] == "succeeded", job
            assert_clean_success(stack, job)
            assert api.get(f"/v1/merges/{finished['id']}").json() == finished  # the terminal record survived
            after = wait(api, submit(api, spec(uris)), done)  # API and worker reconnected to the broker
            assert after["status"] == "succeeded" and after["attempt"] == 1
    finally:
        part.stop()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)


# ----------------------------------------------------------------------------------------------- secrets
def test_no_secrets_in_logs_events_or_records(stack: Any) -> None:
    """Runs last in this module: every process log of the session so far and every job record and event."""
    secrets = {"api key": stack.api_key, "other api key": stack.other_api_key, "s3 secret": stack.secret_key}
    for log in Path(stack.logs).glob("*.log"):
        text = log.read_text(errors="replace")
        for what, secret in secrets.items():
            assert secret not in text, f"{what} in {log.name}"
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    scanned = 0
    for key in client.scan_iter(match="mudsc:*", count=1000):
        kind = client.type(key)
        if kind == "hash":
            blob = repr(client.hgetall(key))
        elif kind == "stream":
            blob = repr(client.xrange(key))
        elif kind == "string":
            blob = client.get(key) or ""
        else:
            continue
        scanned += 1
        for what, secret in secrets.items():
            assert secret not in blob, f"{what} in {key}"
    assert scanned > 0
