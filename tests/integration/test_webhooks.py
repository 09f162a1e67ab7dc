"""Signed webhooks through real processes: the API, a merge worker, a webhook worker (queue ``webhooks``) and a
receiver process that verifies each delivery with the ``standardwebhooks`` package.

Runs on a private slice of the session stack (own job-store and broker key prefixes, own API with a 0.5 s
reconciler, own workers) with a short retry window, and two signing secrets for the tenant (a rotation: the
receiver knows only the newer one). Covered: delivery on success, failure and cancel; a receiver down for a
while, then up (delivered once, same webhook-id); a receiver that never comes up (the delivery ends failed, the
job is untouched); 410 (disabled); the webhook worker killed mid-delivery (delivered after its restart).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.numpy import save

from scripts.localstack import REPO_ROOT, free_port
from tests.integration.faults import done, submit, wait

RUN = uuid.uuid4().hex[:8]
OLD_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
NEW_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
WINDOW_S = 8.0
STAGE_DELAY_S = 1.5


class Receiver:
    """A receiver process on ``port`` (verifying with ``secret``), logging to ``log``."""

    def __init__(self, port: int, secret: str, log: Path) -> None:
        self.port, self.log = port, log
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        cmd = [sys.executable, "-m", "tests.integration.webhook_receiver", "--port", str(port)]
        self.proc = subprocess.Popen(
            [*cmd, "--secret", secret, "--log", str(log)], env=env, cwd=REPO_ROOT, start_new_session=True
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url("/"), timeout=1)
                return
            except httpx.HTTPError:
                assert self.proc.poll() is None, "the receiver exited"
                time.sleep(0.1)
        raise AssertionError("the receiver did not start")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def entries(self, path: str, phase: str = "received") -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        lines = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        return [e for e in lines if e["path"] == path and e["phase"] == phase]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


class HookSlice:
    def __init__(self, stack: Any, tmp: Path) -> None:
        self.stack, self.tmp = stack, tmp
        self.name = f"wh{RUN}"
        tenants = {stack.tenant: {"secrets": [OLD_SECRET, NEW_SECRET], "allowed_hosts": ["127.0.0.1"]}}
        self.env = {
            "MUDSC_REDIS__KEY_PREFIX": f"mudsc:{self.name}:",
            "MUDSC_CELERY__KEY_PREFIX": f"celery:{self.name}:",
            "MUDSC_WEBHOOKS__TENANTS": json.dumps(tenants),
            "MUDSC_WEBHOOKS__ALLOW_HTTP": "true",
            "MUDSC_WEBHOOKS__ALLOW_PRIVATE_ADDRESSES": "true",
            "MUDSC_WEBHOOKS__RETRY_WINDOW_S": str(WINDOW_S),
            "MUDSC_WEBHOOKS__BACKOFF_BASE_S": "0.5",
            "MUDSC_WEBHOOKS__BACKOFF_MAX_S": "1.5",
            "MUDSC_WEBHOOKS__CONNECT_TIMEOUT_S": "1",
            "MUDSC_WEBHOOKS__TIMEOUT_S": "2",
            "MUDSC_WEBHOOKS__RESEND_AFTER_S": "1",
        }
        self.procs: list[str] = []
        self.receivers: list[Receiver] = []

    def start(self) -> None:
        api = f"api-{self.name}"
        self.api_url, _ = self.stack.start_api({**self.env, "MUDSC_RECONCILE__INTERVAL_S": "0.5"}, name=api)
        self.procs.append(api)
        merge_env = {**self.env, "MUDSC_WORKER__DEBUG_STAGE_DELAY_S": str(STAGE_DELAY_S)}
        self.stack.start_worker(f"{self.name}m", env_overrides=merge_env)
        self.procs.append(f"worker-{self.name}m")
        self.start_webhook_worker()

    def start_webhook_worker(self) -> None:
        self.stack.start_worker(f"{self.name}h", env_overrides=self.env, queues="webhooks", concurrency=2)
        self.procs.append(f"worker-{self.name}h")

    def kill_webhook_worker(self) -> None:
        self.stack.stop_process(f"worker-{self.name}h", sig=signal.SIGKILL)
        self.procs.remove(f"worker-{self.name}h")

    def receiver(self, port: int | None = None) -> Receiver:
        port = port or free_port()
        receiver = Receiver(port, NEW_SECRET, self.tmp / f"receiver-{port}-{len(self.receivers)}.jsonl")
        self.receivers.append(receiver)
        return receiver

    def stop(self) -> None:
        for receiver in self.receivers:
            receiver.stop()
        for name in reversed(self.procs):
            try:
                self.stack.stop_process(name)
            except KeyError:
                pass

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.api_url, headers={"Authorization": f"Bearer {self.stack.api_key}"}, timeout=30
        )


@pytest.fixture(scope="module")
def hooks(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HookSlice]:
    part = HookSlice(stack, tmp_path_factory.mktemp("webhooks"))
    try:
        part.start()
        yield part
    finally:
        part.stop()


@pytest.fixture(scope="module")
def receiver(hooks: HookSlice) -> Receiver:
    return hooks.receiver()


@pytest.fixture(scope="module")
def api(hooks: HookSlice) -> Iterator[httpx.Client]:
    with hooks.api() as client:
        yield client


@pytest.fixture(scope="module")
def models(stack: Any) -> dict[str, str]:
    rng = np.random.default_rng(0)

    def checkpoint(nan: bool = False) -> bytes:
        weight = rng.standard_normal((8, 8)).astype(np.float32)
        if nan:
            weight[0, 0] = np.nan
        return save({"layer.weight": weight, "layer.bias": np.zeros(8, np.float32)})

    s3 = stack.s3_client()
    uris = {}
    for name, body in (("a", checkpoint()), ("b", checkpoint()), ("nan", checkpoint(nan=True))):
        s3.put_object(Bucket=stack.buckets["models"], Key=f"wh-{RUN}/{name}.safetensors", Body=body)
        uris[name] = f"s3://{stack.buckets['models']}/wh-{RUN}/{name}.safetensors"
    return uris


def _spec(models: dict[str, str], url: str, b: str = "b") -> dict[str, Any]:
    return {
        "method": {"name": "linear"},
        "models": [{"uri": models["a"]}, {"uri": models[b]}],
        "webhook": {"url": url},
        "labels": {"run": RUN},
    }


def _deliveries(api: httpx.Client, job_id: str) -> dict[str, Any]:
    response = api.get(f"/v1/merges/{job_id}/webhook-deliveries")
    assert response.status_code == 200, response.text
    return response.json()


def _until(what: str, check: Callable[[], Any], timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _delivery_ends(api: httpx.Client, job_id: str, timeout_s: float = 60) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        page = _deliveries(api, job_id)
        delivery = page["delivery"]
        return page if delivery and delivery["status"] in ("delivered", "failed", "disabled") else None

    return _until(f"the delivery of {job_id} to end", ended, timeout_s)


def _assert_delivered_once(receiver: Receiver, path: str, job: dict[str, Any], page: dict[str, Any]) -> None:
    received = receiver.entries(path)
    assert len(received) == 1, received
    entry = received[0]
    assert entry["verified"], entry  # with the newer secret: the signature of each valid secret is sent
    assert entry["signatures"] == 2
    assert entry["type"] == f"merge.{job['status']}" and entry["job_id"] == job["id"]
    assert entry["status"] == job["status"] and entry["timestamp"] == job["finished_at"]
    assert entry["webhook_id"] == page["delivery"]["webhook_id"]
    assert page["delivery"]["status"] == "delivered"
    assert [(a["status"], a["response_code"]) for a in page["data"]][-1] == ("succeeded", 204)


def test_success_is_delivered_signed(hooks: HookSlice, api: httpx.Client, receiver: Receiver, models: Any) -> None:
    path = f"/ok/{RUN}/success"
    job_id = submit(api, _spec(models, receiver.url(path)))
    job = wait(api, job_id, done)
    assert job["status"] == "succeeded"
    page = _delivery_ends(api, job_id)
    _assert_delivered_once(receiver, path, job, page)
    attempt = page["data"][0]
    assert len(page["data"]) == 1 and attempt["duration_ms"] >= 0 and attempt["next_attempt_at"] is None
    assert receiver.entries(path)[0]["host"] == f"127.0.0.1:{receiver.port}"


def test_failure_is_delivered(hooks: HookSlice, api: httpx.Client, receiver: Receiver, models: Any) -> None:
    path = f"/ok/{RUN}/failure"
    job = wait(api, submit(api, _spec(models, receiver.url(path), b="nan")), done)
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_checkpoint"
    _assert_delivered_once(receiver, path, job, _delivery_ends(api, job["id"]))


def test_cancel_is_delivered(hooks: HookSlice, api: httpx.Client, receiver: Receiver, models: Any) -> None:
    path = f"/ok/{RUN}/cancel"
    job_id = submit(api, _spec(models, receiver.url(path)))
    wait(api, job_id, lambda j: j["status"] == "running")
    assert api.post(f"/v1/merges/{job_id}/cancel").status_code == 202
    job = wait(api, job_id, done)
    assert job["status"] == "canceled"
    _assert_delivered_once(receiver, path, job, _delivery_ends(api, job_id))


def test_receiver_down_then_up_gets_it_once(hooks: HookSlice, api: httpx.Client, models: Any) -> None:
    port = free_port()
    path = f"/ok/{RUN}/later"
    job_id = submit(api, _spec(models, f"http://127.0.0.1:{port}{path}"))
    job = wait(api, job_id, done)

    def failed_twice() -> list[dict[str, Any]] | None:
        data = _deliveries(api, job_id)["data"]
        return data if len(data) >= 2 else None

    failures = _until("two failed attempts", failed_twice, 30)
    assert all(a["status"] == "retrying" and a["response_code"] is None and a["error"] for a in failures)
    assert all(a["next_attempt_at"] for a in failures)
    late = hooks.receiver(port)
    page = _delivery_ends(api, job_id)
    _assert_delivered_once(late, path, job, page)
    assert page["data"][0]["started_at"] < page["data"][-1]["started_at"]


def test_receiver_never_up_ends_failed_and_the_job_is_untouched(
    hooks: HookSlice, api: httpx.Client, models: Any
) -> None:
    job_id = submit(api, _spec(models, f"http://127.0.0.1:{free_port()}/ok/{RUN}/never"))
    job = wait(api, job_id, done)
    started = time.monotonic()
    page = _delivery_ends(api, job_id, timeout_s=WINDOW_S + 30)
    assert time.monotonic() - started < WINDOW_S + 15
    assert page["delivery"]["status"] == "failed" and page["delivery"]["next_attempt_at"] is None
    statuses = [a["status"] for a in page["data"]]
    assert len(statuses) >= 3 and set(statuses[:-1]) == {"retrying"} and statuses[-1] == "failed"
    assert page["data"][-1]["next_attempt_at"] is None
    assert api.get(f"/v1/merges/{job_id}").json() == job  # the job is untouched


def test_410_disables_the_endpoint_for_the_job(
    hooks: HookSlice, api: httpx.Client, receiver: Receiver, models: Any
) -> None:
    path = f"/gone/{RUN}"
    job_id = submit(api, _spec(models, receiver.url(path)))
    wait(api, job_id, done)
    page = _delivery_ends(api, job_id)
    assert page["delivery"]["status"] == "disabled"
    assert [(a["status"], a["response_code"]) for a in page["data"]] == [("disabled", 410)]
    time.sleep(2)  # no retry follows
    assert len(receiver.entries(path)) == 1


def test_webhook_worker_killed_mid_delivery_delivers_after_restart(
    hooks: HookSlice, api: httpx.Client, receiver: Receiver, models: Any
) -> None:
    path = f"/hang-once/{RUN}"
    job_id = submit(api, _spec(models, receiver.url(path)))
    job = wait(api, job_id, done)
    _until("the first attempt to reach the receiver", lambda: receiver.entries(path), 30)
    hooks.kill_webhook_worker()  # mid-delivery: the receiver holds the request unanswered
    hooks.start_webhook_worker()
    page = _delivery_ends(api, job_id, timeout_s=60)
    assert page["delivery"]["status"] == "delivered"
    assert [a["status"] for a in page["data"]] == ["interrupted", "succeeded"]
    received = receiver.entries(path)
    assert len(received) == 2 and {e["webhook_id"] for e in received} == {page["delivery"]["webhook_id"]}
    assert all(e["verified"] and e["job_id"] == job["id"] for e in received)
    assert len(receiver.entries(path, "answered")) == 1
