"""The service end to end: the stack's API, a real Celery worker process, SeaweedFS S3, Redis.

One small MLP merge goes all the way (SSE progress, presigned download, weights equal to the
core's direct output); the other tests cover cancel, idempotency, tenant isolation, bad inputs
and readiness against the same running stack.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
import uuid
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mudsc_core import build_model
from mudsc_core import merge as direct_merge

RUN = uuid.uuid4().hex[:8]
ARCH = {"name": "mlp", "config": {"input_dim": 64, "hidden": [32, 32], "num_classes": 10}}
METHOD = {"name": "mudsc", "params": {"mode": "zip", "beta": 0.5, "seed": 0}}
TERMINAL = {"succeeded", "failed", "canceled"}


def _checkpoint(seed: int, arch: dict[str, Any] = ARCH) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone().contiguous() for k, v in build_model(arch).state_dict().items()}


@pytest.fixture(scope="module")
def api(stack: Any) -> httpx.Client:
    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=30
    ) as client:
        yield client


@pytest.fixture(scope="module")
def inputs(stack: Any) -> dict[str, Any]:
    """Two MLP checkpoints, a calibration set and a NaN-bodied checkpoint, uploaded once."""
    s3 = stack.s3_client()
    models, data = stack.buckets["models"], stack.buckets["data"]
    states = [_checkpoint(0), _checkpoint(1)]
    torch.manual_seed(2)
    calibration = torch.randn(64, 64)
    good = save_safetensors(states[0])
    header_len = struct.unpack("<Q", good[:8])[0]
    nan_body = good[: 8 + header_len] + b"\xff" * (len(good) - 8 - header_len)  # valid header, NaN weights
    objects = {
        "a": (models, f"it-{RUN}/a.safetensors", save_safetensors(states[0])),
        "b": (models, f"it-{RUN}/b.safetensors", save_safetensors(states[1])),
        "nan": (models, f"it-{RUN}/nan.safetensors", nan_body),
        "calib": (data, f"it-{RUN}/calib.safetensors", save_safetensors({"inputs": calibration})),
    }
    for bucket, key, body in objects.values():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    return {
        "uris": {name: f"s3://{bucket}/{key}" for name, (bucket, key, _) in objects.items()},
        "states": states,
        "calibration": calibration,
    }


def _spec(inputs: dict[str, Any], a: str = "a", b: str = "b", **extra: Any) -> dict[str, Any]:
    uris = inputs["uris"]
    spec = {
        "method": METHOD,
        "architecture": ARCH,
        "models": [{"uri": uris.get(a, a)}, {"uri": uris.get(b, b)}],
        "calibration": {"uri": uris["calib"], "tensor": "inputs", "max_samples": 64, "batch_size": 32},
        "labels": {"run": RUN},
    }
    spec.update(extra)
    return spec


def _sse(api: httpx.Client, job_id: str, timeout_s: float = 300) -> list[dict[str, Any]]:
    """Every event of the job's stream until the server closes it (after the terminal event)."""
    events: list[dict[str, Any]] = []
    current: dict[str, str] = {}
    with api.stream("GET", f"/v1/merges/{job_id}/events/stream", timeout=timeout_s) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line:
                if "data" in current:
                    events.append({"sse_id": current.get("id"), **json.loads(current["data"])})
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(":")
                current[field] = value.strip()
    return events


def _wait(api: httpx.Client, job_id: str, predicate: Any, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = api.get(f"/v1/merges/{job_id}").json()
        if predicate(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached the expected state; last: {job['status']} {job.get('error')}")


def test_merge_end_to_end_matches_the_core(api: httpx.Client, inputs: dict[str, Any]) -> None:
    response = api.post("/v1/merges", json=_spec(inputs))
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    events = _sse(api, job_id)
    assert all(e["sse_id"] == e["id"] for e in events)
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses[0] == "queued" and "running" in statuses and statuses[-1] == "succeeded"
    stages = {e["data"]["stage"] for e in events if e["type"] == "progress"}
    assert {"downloading", "collecting_activations", "matching", "merging", "uploading"} <= stages

    job = api.get(f"/v1/merges/{job_id}").json()
    assert job["status"] == "succeeded" and job["attempt"] == 1 and job["finished_at"]
    names = {a["name"] for a in job["result"]["artifacts"]}
    assert {"model.safetensors", "report.json", "spec.json", "manifest.json"} <= names
    assert set(job["result"]["metrics"]["mean_similarity_per_group"]) == {"fc0", "fc1"}
    assert job["result"]["metrics"]["timings_s"]["downloading"] >= 0
    memory = job["result"]["metrics"]["memory"]  # the merge's estimate, the worker's measured peak
    assert memory["estimated_peak_bytes"] > 0 and memory["measured_peak_rss_bytes"] > 0

    listed = {a["name"]: a for a in api.get(f"/v1/merges/{job_id}/artifacts").json()["data"]}
    weights = httpx.get(listed["model.safetensors"]["url"], timeout=30)  # presigned: no API key
    assert weights.status_code == 200
    assert hashlib.sha256(weights.content).hexdigest() == listed["model.safetensors"]["sha256"]
    merged = load_safetensors(weights.content)

    expected = direct_merge(
        inputs["states"], ARCH, METHOD, inputs["calibration"], device="cpu", calibration_batch_size=32
    ).state_dict
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor.to(torch.float32), msg=name)

    redirect = api.get(f"/v1/merges/{job_id}/artifacts/manifest.json", follow_redirects=False)
    assert redirect.status_code == 307
    manifest = httpx.get(redirect.headers["location"], timeout=30).json()
    assert manifest["status"] == "succeeded" and manifest["job_id"] == job_id
    assert {a["name"] for a in manifest["artifacts"]} == names - {"manifest.json"}


def test_cancel_queued_and_running_jobs(api: httpx.Client, inputs: dict[str, Any], stack: Any) -> None:
    # A job big enough to still be running when the cancel arrives (it never gets to finish).
    big = {"name": "mlp", "config": {"input_dim": 64, "hidden": [512, 512, 512], "num_classes": 10}}
    s3 = stack.s3_client()
    for name, seed in (("big_a", 10), ("big_b", 11)):
        s3.put_object(
            Bucket=stack.buckets["models"],
            Key=f"it-{RUN}/{name}.safetensors",
            Body=save_safetensors(_checkpoint(seed, big)),
        )
    s3.put_object(
        Bucket=stack.buckets["data"],
        Key=f"it-{RUN}/big_calib.safetensors",
        Body=save_safetensors({"inputs": torch.randn(4096, 64)}),
    )
    spec = _spec(
        inputs,
        a=f"s3://models/it-{RUN}/big_a.safetensors",
        b=f"s3://models/it-{RUN}/big_b.safetensors",
        architecture=big,
        calibration={"uri": f"s3://data/it-{RUN}/big_calib.safetensors", "max_samples": 4096, "batch_size": 16},
    )
    running_id = api.post("/v1/merges", json=spec).json()["id"]
    _wait(api, running_id, lambda j: j["status"] == "running" and j["progress"] is not None, 120)

    queued = api.post("/v1/merges", json=_spec(inputs))  # the only worker is busy: stays queued
    assert queued.status_code == 202
    canceled = api.post(f"/v1/merges/{queued.json()['id']}/cancel")
    assert canceled.status_code == 202 and canceled.json()["status"] == "canceled"

    canceling = api.post(f"/v1/merges/{running_id}/cancel")
    assert canceling.status_code == 202 and canceling.json()["status"] == "canceling"
    final = _wait(api, running_id, lambda j: j["status"] in TERMINAL, 120)
    assert final["status"] == "canceled" and final["result"] is None
    assert api.post(f"/v1/merges/{running_id}/cancel").status_code == 409
    assert api.get(f"/v1/merges/{running_id}/artifacts").status_code == 409
    # the worker picks the canceled job up afterwards and leaves it alone
    time.sleep(1.0)
    later = api.get(f"/v1/merges/{queued.json()['id']}").json()
    assert later["status"] == "canceled" and later["attempt"] == 0
    # nothing half-written: no weights were promoted under the canceled job's output prefix
    prefix = final["spec"]["output"]["uri"].split("/", 3)[3]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.buckets["results"], Prefix=prefix).get("Contents", [])]
    assert not any(k.endswith(".safetensors") for k in keys), keys


def test_idempotent_resubmission(api: httpx.Client, inputs: dict[str, Any]) -> None:
    headers = {"Idempotency-Key": f"it-{RUN}"}
    first = api.post("/v1/merges", json=_spec(inputs, labels={"run": RUN, "idem": "1"}), headers=headers)
    again = api.post("/v1/merges", json=_spec(inputs, labels={"run": RUN, "idem": "1"}), headers=headers)
    other = api.post("/v1/merges", json=_spec(inputs, labels={"run": RUN, "idem": "2"}), headers=headers)
    assert (first.status_code, again.status_code, other.status_code) == (202, 200, 422)
    assert again.json()["id"] == first.json()["id"]
    assert other.headers["content-type"].startswith("application/problem+json")
    ids = [j["id"] for j in api.get("/v1/merges", params={"label": "idem:1", "limit": 100}).json()["data"]]
    assert ids == [first.json()["id"]]


def test_other_tenant_gets_404_on_every_route(api: httpx.Client, inputs: dict[str, Any], stack: Any) -> None:
    job_id = api.post("/v1/merges", json=_spec(inputs)).json()["id"]
    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.other_api_key}"}, timeout=30
    ) as other:
        for method, suffix in [
            ("GET", ""),
            ("POST", "/cancel"),
            ("GET", "/events"),
            ("GET", "/events/stream"),
            ("GET", "/artifacts"),
            ("GET", "/artifacts/model.safetensors"),
        ]:
            response = other.request(method, f"/v1/merges/{job_id}{suffix}")
            assert response.status_code == 404, (suffix, response.status_code)
            assert response.json()["code"] == "job_not_found"
        assert job_id not in [j["id"] for j in other.get("/v1/merges", params={"limit": 100}).json()["data"]]
        # and its rights stop at its own prefixes
        assert other.post("/v1/merges", json=_spec(inputs)).status_code == 403
    assert api.get(f"/v1/merges/{job_id}").status_code == 200


def test_missing_object_is_422_naming_it(api: httpx.Client, inputs: dict[str, Any]) -> None:
    missing = f"s3://models/it-{RUN}/does-not-exist.safetensors"
    response = api.post("/v1/merges", json=_spec(inputs, b=missing))
    assert response.status_code == 422 and missing in response.json()["detail"]
    assert response.json()["code"] == "object_not_found"


def test_nan_checkpoint_passes_submission_but_fails_the_job(api: httpx.Client, inputs: dict[str, Any]) -> None:
    response = api.post("/v1/merges", json=_spec(inputs, b="nan"))
    assert response.status_code == 202, response.text
    job = _wait(api, response.json()["id"], lambda j: j["status"] in TERMINAL)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_checkpoint" and job["error"]["retryable"] is False
    assert "NaN" in job["error"]["message"]


def test_readyz_fails_when_redis_and_s3_are_down(stack: Any, api: httpx.Client) -> None:
    assert httpx.get(stack.api_url + "/readyz", timeout=10).status_code == 200
    url, _ = stack.start_api(
        {
            "MUDSC_REDIS__URL": "redis://127.0.0.1:1/0",
            "MUDSC_CELERY__BROKER_URL": "",
            "MUDSC_S3__ENDPOINT_URL": "http://127.0.0.1:1",
        },
        name="api-dead",
        wait_path="/livez",
    )
    try:
        response = httpx.get(url + "/readyz", timeout=30)
    finally:
        stack.stop_process("api-dead")
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/problem+json")
    checks = response.json()["checks"]
    assert all(checks[name].startswith("unavailable") for name in ("redis", "broker", "s3")), checks
