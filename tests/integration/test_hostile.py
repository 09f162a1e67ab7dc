"""Hostile input end to end, through the session stack's API, Celery worker, SeaweedFS and Redis.

Every input is answered either at submission with a 4xx ``application/problem+json`` naming a code, or
by a failed job with a specific ``error.code``: never a 500, never a stuck or crashed worker (a normal job
succeeds after the hostile ones), never a half-written result (no weights under a failed job's output).
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save as save_safetensors

from mudsc_core import build_model

RUN = uuid.uuid4().hex[:8]
ARCH = {"name": "mlp", "config": {"input_dim": 64, "hidden": [32, 32], "num_classes": 10}}
METHOD = {"name": "mudsc", "params": {"mode": "zip", "beta": 0.5, "seed": 0}}
TERMINAL = {"succeeded", "failed", "canceled"}
MARKER = Path(f"/tmp/mudsc-unpickled-{RUN}")


class _Bomb:
    """Unpickling this creates MARKER: proof that something unpickled a checkpoint."""

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(MARKER), "w"))


def _state(seed: int, arch: dict[str, Any] = ARCH) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone().contiguous() for k, v in build_model(arch).state_dict().items()}


def _raw_safetensors(header: dict[str, Any], body: bytes, claimed_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", claimed_len if claimed_len is not None else len(raw)) + raw + body


def _objects() -> dict[str, tuple[str, bytes]]:
    good = _state(0)
    good_bytes = save_safetensors(good)
    header_len = struct.unpack("<Q", good_bytes[:8])[0]
    inf_state = {k: v.clone() for k, v in good.items()}
    next(t for k, t in inf_state.items() if k.endswith("weight")).view(-1)[0] = float("inf")
    wide = {"name": "mlp", "config": {"input_dim": 64, "hidden": [48, 32], "num_classes": 10}}
    pickled = io.BytesIO()
    torch.save({"w": torch.zeros(2), "bomb": _Bomb()}, pickled)  # a torch zip whose data.pkl runs code
    plain_pickle = pickle.dumps(_Bomb())
    n = 4 * 4
    return {
        "a": ("models", good_bytes),
        "b": ("models", save_safetensors(_state(1))),
        "calib": ("data", save_safetensors({"inputs": torch.randn(64, 64)})),
        "calib_shape": ("data", save_safetensors({"inputs": torch.randn(64, 32)})),
        "calib_dtype": ("data", save_safetensors({"inputs": torch.randint(0, 9, (64, 64), dtype=torch.int64)})),
        "calib_nan": ("data", save_safetensors({"inputs": torch.full((64, 64), float("nan"))})),
        "inf": ("models", save_safetensors(inf_state)),
        "wide": ("models", save_safetensors(_state(2, wide))),
        "int_weights": ("models", save_safetensors({k: (v * 100).to(torch.int32) for k, v in good.items()})),
        "bool_weights": ("models", save_safetensors({k: v > 0 for k, v in good.items()})),
        "renamed_keys": ("models", save_safetensors({f"x.{k}": v for k, v in good.items()})),
        "text": ("models", b"this is not a checkpoint at all\n" * 10),
        "truncated": ("models", good_bytes[: 8 + header_len + 100]),
        "huge_header": ("models", struct.pack("<Q", 2**62) + b"{}"),
        "header_past_end": ("models", _raw_safetensors({}, b"", claimed_len=10**6)),
        "overlap": (
            "models",
            _raw_safetensors(
                {
                    "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, n]},
                    "v": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 8 + n]},
                },
                b"\0" * (n + 8),
            ),
        ),
        "outside": (
            "models",
            _raw_safetensors({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 10 * n]}}, b"\0" * n),
        ),
        "shape_mismatch": (
            "models",
            _raw_safetensors({"w": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, n]}}, b"\0" * n),
        ),
        "torch_pickle": ("models", pickled.getvalue()),
        "plain_pickle": ("models", plain_pickle),
    }


@pytest.fixture(scope="module")
def uris(stack: Any) -> dict[str, str]:
    s3 = stack.s3_client()
    out = {}
    for name, (bucket, body) in _objects().items():
        key = f"hostile-{RUN}/{name}.safetensors"
        s3.put_object(Bucket=stack.buckets[bucket], Key=key, Body=body)
        out[name] = f"s3://{stack.buckets[bucket]}/{key}"
    return out


@pytest.fixture(scope="module")
def api(stack: Any) -> httpx.Client:
    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=60
    ) as client:
        yield client


def spec(uris: dict[str, str], a: str = "a", b: str = "b", calib: str = "calib", **extra: Any) -> dict[str, Any]:
    body = {
        "method": METHOD,
        "architecture": ARCH,
        "models": [{"uri": uris.get(a, a)}, {"uri": uris.get(b, b)}],
        "calibration": {"uri": uris.get(calib, calib), "tensor": "inputs", "max_samples": 64, "batch_size": 32},
        "labels": {"run": RUN},
    }
    body.update(extra)
    return body


def assert_problem(response: httpx.Response, status: int | tuple[int, ...], code: str | None = None) -> None:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert {"type", "title", "status", "detail", "instance"} <= set(body) and body["status"] == response.status_code
    if code is not None:
        assert body.get("code") == code, body


def wait(api: httpx.Client, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = api.get(f"/v1/merges/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} is stuck in {job['status']}")


# ------------------------------------------------------------------------------------------ refused at submission
def _body_cases(uris: dict[str, str]) -> list[tuple[str, Any, int | tuple[int, ...], str | None]]:
    good = spec(uris)
    with_method = lambda **params: {**good, "method": {"name": "mudsc", "params": {**METHOD["params"], **params}}}  # noqa: E731
    calib = lambda **fields: {**good, "calibration": {**good["calibration"], **fields}}  # noqa: E731
    return [
        ("malformed json", b'{"method": {"name": "mudsc"', 422, "validation_error"),
        ("not an object", b"[1, 2, 3]", 422, "validation_error"),
        ("empty body", b"", 422, "validation_error"),
        ("binary body", b"\xff\xfe\x00garbage", 422, "validation_error"),
        ("models wrong type", {**good, "models": "s3://models/a.safetensors"}, 422, "validation_error"),
        (
            "weight wrong type",
            {**good, "models": [{"uri": uris["a"], "weight": "heavy"}, {"uri": uris["b"]}]},
            422,
            "validation_error",
        ),
        ("unknown top-level field", {**good, "priority": "urgent"}, 422, "validation_error"),
        ("unknown method param", with_method(turbo=True), 422, "validation_error"),
        ("negative samples", calib(max_samples=-1), 422, "validation_error"),
        ("huge samples", calib(max_samples=10**30), 422, "validation_error"),
        ("NaN beta", json.dumps(with_method(beta=float("nan"))).encode(), 422, "validation_error"),
        ("Infinity beta", json.dumps(with_method(beta=float("inf"))).encode(), 422, "validation_error"),
        (
            "huge weight",
            {**good, "models": [{"uri": uris["a"], "weight": 1e308}, {"uri": uris["b"]}]},
            422,
            "validation_error",
        ),
        ("unknown method", {**good, "method": {"name": "frankenmerge", "params": {}}}, 422, "validation_error"),
        (
            "unknown architecture",
            {**good, "architecture": {"name": "transformer9000", "config": {}}},
            422,
            "validation_error",
        ),
        (
            "absurd architecture",
            {**good, "architecture": {"name": "mlp", "config": {"input_dim": -3, "hidden": [0], "num_classes": 10}}},
            422,
            "validation_error",
        ),
        ("pickle uri .bin", spec(uris, b="s3://models/x/pytorch_model.bin"), 422, "validation_error"),
        ("pickle uri .pt", spec(uris, b="s3://models/x/model.pt"), 422, "validation_error"),
        ("http uri", spec(uris, b="https://evil.example/a.safetensors"), 422, "validation_error"),
        ("path tricks in uri", spec(uris, b="s3://models/x/../../etc/a.safetensors"), 422, "validation_error"),
        ("one model", {**good, "models": [{"uri": uris["a"]}]}, 422, "validation_error"),
        ("not safetensors", spec(uris, b="text"), 422, "invalid_checkpoint"),
        ("truncated", spec(uris, b="truncated"), 422, "invalid_checkpoint"),
        ("header claims huge length", spec(uris, b="huge_header"), 422, "invalid_checkpoint"),
        ("header past the end", spec(uris, b="header_past_end"), 422, "invalid_checkpoint"),
        ("overlapping offsets", spec(uris, b="overlap"), 422, "invalid_checkpoint"),
        ("offsets outside the file", spec(uris, b="outside"), 422, "invalid_checkpoint"),
        ("shape disagrees with offsets", spec(uris, b="shape_mismatch"), 422, "invalid_checkpoint"),
        ("torch pickle renamed", spec(uris, b="torch_pickle"), 422, "invalid_checkpoint"),
        ("plain pickle renamed", spec(uris, b="plain_pickle"), 422, "invalid_checkpoint"),
        ("calibration tensor missing", calib(tensor="nope"), 422, "invalid_calibration"),
        ("missing object", spec(uris, b="s3://models/nothing/here.safetensors"), 422, "object_not_found"),
        ("missing bucket", spec(uris, b="s3://no-such-bucket-x/a.safetensors"), (403, 422), None),
        (
            "other tenant's results as output",
            {**good, "output": {"uri": "s3://results/other/steal/"}},
            403,
            "forbidden_uri",
        ),
        (
            "a job's default output",
            {**good, "output": {"uri": "s3://results/demo/mrg_01J00000000000000000000000/"}},
            422,
            "output_conflict",
        ),
    ]


def test_hostile_bodies_are_4xx_problems(api: httpx.Client, uris: dict[str, str]) -> None:
    failures = []
    for name, body, status, code in _body_cases(uris):
        if isinstance(body, bytes):
            response = api.post("/v1/merges", content=body, headers={"content-type": "application/json"})
        else:
            response = api.post("/v1/merges", json=body)
        try:
            assert_problem(response, status, code)
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)
    assert not MARKER.exists(), "a pickle was unpickled"


def test_other_tenant_cannot_read_or_write_outside_its_prefixes(stack: Any, uris: dict[str, str]) -> None:
    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.other_api_key}"}, timeout=60
    ) as other:
        assert_problem(other.post("/v1/merges", json=spec(uris)), 403, "forbidden_uri")  # demo's inputs
        own = {k: v.replace(f"hostile-{RUN}/", f"other/hostile-{RUN}/") for k, v in uris.items()}
        s3 = stack.s3_client()
        for name in ("a", "b", "calib"):
            src_bucket, _, key = uris[name][len("s3://") :].partition("/")
            s3.copy_object(Bucket=src_bucket, Key=f"other/{key}", CopySource={"Bucket": src_bucket, "Key": key})
        for output in ("s3://results/demo/x/", "s3://models/elsewhere/", "s3://data/other-not-mine/"):
            assert_problem(
                other.post("/v1/merges", json={**spec(own), "output": {"uri": output}}), 403, "forbidden_uri"
            )


def test_output_that_would_overwrite_results_is_refused(api: httpx.Client, uris: dict[str, str], stack: Any) -> None:
    target = f"s3://results/demo/hostile-{RUN}/shared/"
    first = api.post("/v1/merges", json={**spec(uris), "output": {"uri": target}})
    assert first.status_code == 202, first.text
    second = api.post("/v1/merges", json={**spec(uris), "output": {"uri": target}})  # while the first runs
    assert_problem(second, 409, "output_conflict")
    assert wait(api, first.json()["id"])["status"] == "succeeded"
    third = api.post("/v1/merges", json={**spec(uris), "output": {"uri": target}})  # after: results exist
    assert_problem(third, 409, "output_conflict")


def test_artifact_names_with_path_tricks(api: httpx.Client, uris: dict[str, str]) -> None:
    job = api.post("/v1/merges", json=spec(uris)).json()
    job = wait(api, job["id"])
    assert job["status"] == "succeeded"
    for name in (
        "../../other/x",
        "..%2F..%2Fx",
        "%2e%2e/model.safetensors",
        ".staging-x/model.safetensors",
        "a/../../b",
        "model.safetensors%00.json",
        "~root",
    ):
        response = api.get(f"/v1/merges/{job['id']}/artifacts/{name}", follow_redirects=False)
        assert response.status_code in (404, 422), (name, response.status_code)
        assert response.headers["content-type"].startswith("application/problem+json")


# ------------------------------------------------------------------------------------------ failed jobs
RUNTIME_CASES = [
    # (name, spec overrides, accepted error codes)
    ("Inf weights", {"b": "inf"}, {"invalid_checkpoint"}),
    ("models of different shapes", {"b": "wide"}, {"incompatible_models", "architecture_mismatch"}),
    (
        "architecture does not match the checkpoint",
        {"architecture": {"name": "mlp", "config": {"input_dim": 64, "hidden": [16, 16, 16], "num_classes": 10}}},
        {"architecture_mismatch"},
    ),
    (
        "parameter names do not match the architecture",
        {"a": "renamed_keys", "b": "renamed_keys"},
        {"architecture_mismatch", "invalid_checkpoint"},
    ),
    ("integer weights", {"b": "int_weights"}, {"invalid_checkpoint"}),
    ("bool weights", {"a": "bool_weights", "b": "bool_weights"}, {"invalid_checkpoint"}),
    ("calibration of the wrong shape", {"calib": "calib_shape"}, {"invalid_calibration"}),
    ("calibration of the wrong dtype", {"calib": "calib_dtype"}, {"invalid_calibration"}),
    ("calibration of NaNs", {"calib": "calib_nan"}, {"invalid_calibration"}),
]


@pytest.mark.parametrize("name,overrides,codes", RUNTIME_CASES, ids=[c[0] for c in RUNTIME_CASES])
def test_hostile_checkpoints_fail_the_job_with_a_code(
    api: httpx.Client, uris: dict[str, str], stack: Any, name: str, overrides: dict[str, Any], codes: set[str]
) -> None:
    keys = {k: overrides[k] for k in ("a", "b", "calib") if k in overrides}
    body = spec(uris, **keys, **{k: v for k, v in overrides.items() if k not in keys})
    response = api.post("/v1/merges", json=body)
    if response.status_code != 202:  # refused at submission is fine too, if it is a clear 4xx
        assert_problem(response, 422)
        assert response.json()["code"] in codes, response.json()
        return
    job = wait(api, response.json()["id"])
    assert job["status"] == "failed", job
    assert job["error"]["code"] in codes, job["error"]
    assert job["error"]["retryable"] is False
    bucket, _, prefix = job["spec"]["output"]["uri"][len("s3://") :].partition("/")
    keys_left = [o["Key"] for o in stack.s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert not any(k.endswith(".safetensors") or ".staging-" in k for k in keys_left), keys_left


def test_worker_still_merges_after_hostile_jobs(api: httpx.Client, uris: dict[str, str]) -> None:
    job = wait(api, api.post("/v1/merges", json=spec(uris)).json()["id"])
    assert job["status"] == "succeeded" and job["attempt"] == 1
    assert not MARKER.exists(), "a pickle was unpickled"
