"""POST /v1/merges against a real S3 server (the stack's SeaweedFS): every check at submission.

The in-process app sends its tasks to this session's own broker prefix, where no worker listens,
so accepted jobs stay queued and nothing else runs.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import save

from app.main import create_app
from mudsc_jobs.store import JobStore
from tests.api.conftest import auth, make_settings, mlp_spec
from tests.api.test_http_contract import assert_problem

RUN = uuid.uuid4().hex[:8]


def _mlp_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return save(
        {
            "layers.0.weight": rng.standard_normal((4, 8), dtype=np.float32),
            "layers.0.bias": np.zeros(4, np.float32),
            "layers.1.weight": rng.standard_normal((3, 4), dtype=np.float32),
            "layers.1.bias": np.zeros(3, np.float32),
        }
    )


@pytest.fixture(scope="module")
def objects(stack: Any) -> dict[str, str]:
    """Upload good and bad objects once; returns their URIs by role."""
    s3 = stack.s3_client()
    base = f"acme/{RUN}"
    good = _mlp_bytes(0)
    header_len = struct.unpack("<Q", good[:8])[0]
    uploads = {
        "a": ("models", f"{base}/a.safetensors", _mlp_bytes(1)),
        "b": ("models", f"{base}/b.safetensors", _mlp_bytes(2)),
        "truncated": ("models", f"{base}/truncated.safetensors", good[: 8 + header_len + 10]),
        "garbage": ("models", f"{base}/garbage.safetensors", b"PK\x03\x04 this is a zip, not safetensors" * 4),
        "calib": ("data", f"{base}/calib.safetensors", save({"inputs": np.zeros((16, 8), np.float32)})),
        "folder_index": (
            "models",
            f"{base}/hf/model.safetensors.index.json",
            json.dumps(
                {
                    "weight_map": {
                        "layers.0.weight": "model-00001-of-00002.safetensors",
                        "layers.1.weight": "model-00002-of-00002.safetensors",
                    }
                }
            ).encode(),
        ),
        "folder_shard": ("models", f"{base}/hf/model-00001-of-00002.safetensors", _mlp_bytes(3)),
        "folder_config": ("models", f"{base}/hf/config.json", b"{}"),
        "ok_folder": ("models", f"{base}/hf2/model.safetensors", _mlp_bytes(4)),
    }
    for bucket, key, body in uploads.values():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    uris = {role: f"s3://{bucket}/{key}" for role, (bucket, key, _) in uploads.items()}
    uris["folder"] = f"s3://models/{base}/hf/"
    uris["ok_folder_uri"] = f"s3://models/{base}/hf2/"
    return uris


@pytest.fixture(scope="module")
def s3_client(stack: Any, redis_prefix: str) -> Iterator[TestClient]:
    settings = make_settings(
        redis_prefix,
        MUDSC_S3__ENDPOINT_URL=stack.s3_endpoint,
        MUDSC_S3__ACCESS_KEY_ID=stack.access_key,
        MUDSC_S3__SECRET_ACCESS_KEY=stack.secret_key,
        MUDSC_LIMITS__MAX_CHECKPOINT_BYTES="100000",
    )
    with TestClient(create_app(settings)) as client:
        yield client


def _spec(objects: dict[str, str], a: str = "a", b: str = "b", **extra: Any) -> dict[str, Any]:
    return mlp_spec(
        models=[{"uri": objects[a] if a in objects else a}, {"uri": objects[b] if b in objects else b}], **extra
    )


def test_valid_submission_is_queued_with_location(s3_client: TestClient, objects: dict[str, str], store: JobStore):
    spec = _spec(objects, calibration={"uri": objects["calib"], "tensor": "inputs"})
    response = s3_client.post("/v1/merges", json=spec, headers=auth())
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/merges/{job['id']}"
    assert job["status"] == "queued" and job["attempt"] == 0 and job["labels"] == {"team": "vision"}
    # normalised: defaults filled, the default output prefix resolved for tenant and job
    assert job["spec"]["output"]["uri"] == f"s3://results/acme/{job['id']}/"
    assert job["spec"]["method"]["params"]["alpha"] == 0.5
    assert job["spec"]["calibration"]["max_samples"] == 1024
    # the task went to the broker's gpu queue under this session's prefix
    broker = store.redis
    queued = broker.lrange(f"{store.prefix}broker:gpu", 0, -1)
    assert any(job["id"] in message for message in queued)


def test_idempotent_resubmission(s3_client: TestClient, objects: dict[str, str]) -> None:
    headers = {**auth(), "Idempotency-Key": f"idem-{RUN}"}
    first = s3_client.post("/v1/merges", json=_spec(objects), headers=headers)
    # same body with keys reordered: same job, 200
    again = s3_client.post(
        "/v1/merges",
        content=json.dumps(dict(reversed(list(_spec(objects).items())))),
        headers={**headers, "Content-Type": "application/json"},
    )
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]
    other = s3_client.post("/v1/merges", json=_spec(objects, labels={"team": "other"}), headers=headers)
    body = assert_problem(other, 422)
    assert body["code"] == "idempotency_conflict"
    # the key is per tenant: the rival may use the same key for its own job (which fails on rights here)
    assert (
        s3_client.post(
            "/v1/merges", json=_spec(objects), headers={**auth("rival"), "Idempotency-Key": f"idem-{RUN}"}
        ).status_code
        == 403
    )


def test_missing_object_is_422_naming_it(s3_client: TestClient, objects: dict[str, str]) -> None:
    missing = f"s3://models/acme/{RUN}/nope.safetensors"
    body = assert_problem(s3_client.post("/v1/merges", json=_spec(objects, b=missing), headers=auth()), 422)
    assert missing in body["detail"] and body["code"] == "object_not_found"
    assert body["errors"][0]["loc"] == ["body", "models", 1, "uri"]
    missing_bucket = "s3://nobucket/acme/x.safetensors"
    # outside the tenant's prefixes comes first: 403 without revealing existence
    assert_problem(s3_client.post("/v1/merges", json=_spec(objects, b=missing_bucket), headers=auth()), 403)


@pytest.mark.parametrize("role, fragment", [("truncated", "truncated"), ("garbage", "header length")])
def test_corrupt_checkpoints_are_422(s3_client: TestClient, objects: dict[str, str], role: str, fragment: str):
    body = assert_problem(s3_client.post("/v1/merges", json=_spec(objects, b=role), headers=auth()), 422)
    assert body["code"] == "invalid_checkpoint" and objects[role] in body["detail"] and fragment in body["detail"]


def test_uri_outside_allowed_prefixes_is_403(s3_client: TestClient, objects: dict[str, str]) -> None:
    body = assert_problem(s3_client.post("/v1/merges", json=_spec(objects), headers=auth("rival")), 403)
    assert body["code"] == "forbidden_uri" and objects["a"] in body["detail"]
    out = _spec(objects, output={"uri": "s3://results/rival/"})
    assert (
        "s3://results/rival/" in assert_problem(s3_client.post("/v1/merges", json=out, headers=auth()), 403)["detail"]
    )


def test_calibration_tensor_must_exist(s3_client: TestClient, objects: dict[str, str]) -> None:
    spec = _spec(objects, calibration={"uri": objects["calib"], "tensor": "images"})
    body = assert_problem(s3_client.post("/v1/merges", json=spec, headers=auth()), 422)
    assert body["code"] == "invalid_calibration" and "'images'" in body["detail"]


def test_folders_need_every_indexed_shard(s3_client: TestClient, objects: dict[str, str]) -> None:
    body = assert_problem(s3_client.post("/v1/merges", json=_spec(objects, b=objects["folder"]), headers=auth()), 422)
    assert "model-00002-of-00002.safetensors" in body["detail"] and body["code"] == "object_not_found"
    ok = s3_client.post("/v1/merges", json=_spec(objects, b=objects["ok_folder_uri"]), headers=auth())
    assert ok.status_code == 202, ok.text


def test_size_and_count_limits(s3_client: TestClient, objects: dict[str, str], stack: Any) -> None:
    big_key = f"acme/{RUN}/big.safetensors"
    stack.s3_client().put_object(
        Bucket="models", Key=big_key, Body=save({"w": np.zeros(30_000, np.float32)})
    )  # 120 kB > 100 kB limit
    body = assert_problem(
        s3_client.post("/v1/merges", json=_spec(objects, b=f"s3://models/{big_key}"), headers=auth()), 422
    )
    assert body["code"] == "limit_exceeded" and "100000" in body["detail"]
    spec = _spec(objects, calibration={"uri": objects["calib"], "max_samples": 1_000_000})
    assert assert_problem(s3_client.post("/v1/merges", json=spec, headers=auth()), 422)["code"] == "limit_exceeded"


def test_readyz_is_ready_with_redis_broker_and_s3(s3_client: TestClient) -> None:
    response = s3_client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"redis": "ok", "broker": "ok", "s3": "ok"}}


def test_broker_down_fails_the_job_and_answers_503(
    stack: Any, redis_prefix: str, objects: dict[str, str], store: JobStore
) -> None:
    settings = make_settings(
        redis_prefix,
        MUDSC_S3__ENDPOINT_URL=stack.s3_endpoint,
        MUDSC_S3__ACCESS_KEY_ID=stack.access_key,
        MUDSC_S3__SECRET_ACCESS_KEY=stack.secret_key,
        MUDSC_CELERY__BROKER_URL="redis://127.0.0.1:1/0",
    )
    with TestClient(create_app(settings)) as client:
        body = assert_problem(client.post("/v1/merges", json=_spec(objects), headers=auth()), 503)
    assert body["code"] == "broker_unavailable"
    job = store.get(body["job_id"], "acme")
    assert job["status"] == "failed" and job["error"]["code"] == "broker_unavailable"


def test_tenant_concurrency_limit_is_429(
    stack: Any, redis_prefix: str, objects: dict[str, str], s3_client: TestClient
) -> None:
    assert s3_client.post("/v1/merges", json=_spec(objects), headers=auth()).status_code == 202  # acme has one
    settings = make_settings(
        redis_prefix,
        MUDSC_S3__ENDPOINT_URL=stack.s3_endpoint,
        MUDSC_S3__ACCESS_KEY_ID=stack.access_key,
        MUDSC_S3__SECRET_ACCESS_KEY=stack.secret_key,
        MUDSC_LIMITS__MAX_CONCURRENT_JOBS_PER_TENANT="1",
    )
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/merges", json=_spec(objects), headers=auth())
    body = assert_problem(response, 429)
    assert body["code"] == "too_many_jobs" and response.headers["retry-after"] == "30"


def test_concurrent_retries_with_an_explicit_output_all_get_the_original_job(
    s3_client: TestClient, objects: dict[str, str]
) -> None:
    """30 retries of one submission racing each other: one 202, the others the same job (never 409)."""
    output = f"s3://models/acme/{RUN}/retried-output/"
    headers = {**auth(), "Idempotency-Key": f"retry-{RUN}"}
    spec = _spec(objects, output={"uri": output})
    with ThreadPoolExecutor(max_workers=30) as pool:
        answers = list(pool.map(lambda _: s3_client.post("/v1/merges", json=spec, headers=headers), range(30)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] * 29 + [202], [a.text for a in answers if a.status_code not in (200, 202)][:2]
    assert len({a.json()["id"] for a in answers}) == 1


def test_a_job_canceled_while_queued_frees_its_explicit_output(s3_client: TestClient, objects: dict[str, str]) -> None:
    output = f"s3://models/acme/{RUN}/freed-output/"
    first = s3_client.post("/v1/merges", json=_spec(objects, output={"uri": output}), headers=auth())
    assert first.status_code == 202, first.text
    taken = s3_client.post("/v1/merges", json=_spec(objects, output={"uri": output}, labels={"n": "2"}), headers=auth())
    assert assert_problem(taken, 409)["code"] == "output_conflict"
    assert s3_client.post(f"/v1/merges/{first.json()['id']}/cancel", headers=auth()).json()["status"] == "canceled"
    again = s3_client.post("/v1/merges", json=_spec(objects, output={"uri": output}, labels={"n": "3"}), headers=auth())
    assert again.status_code == 202, again.text


def _passthrough_yaml(uri: str, ranges: list[list[int]]) -> str:
    slices = "".join(f"  - sources:\n      - model: {uri}\n        layer_range: {r}\n" for r in ranges)
    return f"merge_method: passthrough\nslices:\n{slices}dtype: float32\n"


def test_one_model_passthrough_is_accepted_as_json_and_as_mergekit_yaml(
    s3_client: TestClient, objects: dict[str, str]
) -> None:
    """mergekit's self-stacking frankenmerge: layers 0-1 then 1 of ONE model (any other method needs two)."""
    slices = [{"sources": [{"model": 0, "layer_range": r}]} for r in ([0, 2], [1, 2])]
    spec = {"method": {"name": "passthrough"}, "models": [{"uri": objects["a"]}], "slices": slices}
    response = s3_client.post("/v1/merges", json=spec, headers=auth())
    assert response.status_code == 202, response.text
    job = response.json()
    assert [m["uri"] for m in job["spec"]["models"]] == [objects["a"]] and job["spec"]["slices"] == slices
    response = s3_client.post(
        "/v1/merges",
        content=_passthrough_yaml(objects["a"], [[0, 2], [1, 2]]).encode(),
        headers={**auth(), "Content-Type": "application/yaml"},
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert [m["uri"] for m in job["spec"]["models"]] == [objects["a"]] and job["spec"]["slices"] == slices


def test_one_model_for_another_method_is_a_422_naming_the_method(
    s3_client: TestClient, objects: dict[str, str]
) -> None:
    spec = {"method": {"name": "ties"}, "models": [{"uri": objects["a"]}], "base_model": {"uri": objects["b"]}}
    body = assert_problem(s3_client.post("/v1/merges", json=spec, headers=auth()), 422)
    assert any(
        e["loc"] == ["body", "models"] and "method 'ties' needs at least 2 models, got 1" in e["msg"]
        for e in body["errors"]
    ), body["errors"]
    text = f"merge_method: ties\nbase_model: {objects['b']}\nmodels:\n  - model: {objects['a']}\n"
    response = s3_client.post(
        "/v1/merges", content=text.encode(), headers={**auth(), "Content-Type": "application/yaml"}
    )
    body = assert_problem(response, 422)
    assert any(e["loc"] == ["body", "models"] and "needs at least 2 models" in e["msg"] for e in body["errors"]), body


def test_per_model_lambda_and_mergekit_rescaling_through_the_api(
    s3_client: TestClient, objects: dict[str, str]
) -> None:
    """models[i].parameters.lambda is accepted (JSON and YAML); a mergekit YAML's DARE gets mergekit's rescaling."""
    spec = {
        "method": {"name": "dare_ties", "params": {"density": 0.5}},
        "base_model": {"uri": objects["ok_folder"]},
        "models": [{"uri": objects["a"], "parameters": {"lambda": [0.5, 1.5]}}, {"uri": objects["b"]}],
    }
    response = s3_client.post("/v1/merges", json=spec, headers=auth())
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["spec"]["models"][0]["parameters"] == {"lambda": [0.5, 1.5]}
    assert job["spec"]["method"]["params"]["rescale_rule"] == "keep_probability"
    text = (
        f"merge_method: dare_ties\nbase_model: {objects['ok_folder']}\nmodels:\n"
        f"  - model: {objects['a']}\n    parameters: {{weight: 1.0, density: 0.5, lambda: 0.7}}\n"
        f"  - model: {objects['b']}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
    )
    response = s3_client.post(
        "/v1/merges", content=text.encode(), headers={**auth(), "Content-Type": "application/yaml"}
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["spec"]["models"][0]["parameters"]["lambda"] == 0.7
    assert job["spec"]["method"]["params"]["rescale_rule"] == "l1_norm"
    spec["models"][0]["parameters"] = {"lambda": 500}
    body = assert_problem(s3_client.post("/v1/merges", json=spec, headers=auth()), 422)
    assert any("lambda: 500 is outside [-100, 100]" in e["msg"] for e in body["errors"]), body["errors"]
