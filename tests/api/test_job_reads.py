"""``GET /v1/merges/{id}``'s fast path (app/reads.py): the route's answer byte for byte, fresh after every
change of the record, and every other answer left to the route (its problem+json errors)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from app.main import create_app
from mudsc_jobs.settings import Settings
from mudsc_jobs.store import JobStore
from tests.api.conftest import auth, seed_job
from tests.api.test_http_contract import assert_problem
from tests.api.test_jobs_routes import _succeed


@pytest.fixture(scope="module")
def route_only(settings: Settings) -> Iterator[TestClient]:
    """The same application without the fast path: the route alone answers."""
    with TestClient(create_app(settings, fast_reads=False)) as test_client:
        yield test_client


def _same(client: TestClient, route_only: TestClient, path: str, headers: dict[str, str]) -> bytes:
    fast, slow = client.get(path, headers=headers), route_only.get(path, headers=headers)
    assert (fast.status_code, fast.content) == (slow.status_code, slow.content)
    assert [(k, v) for k, v in fast.headers.items() if k != "date"] == [
        (k, v) for k, v in slow.headers.items() if k != "date"
    ]
    return fast.content


def test_fast_reads_answer_as_the_route_through_a_jobs_life(
    client: TestClient, route_only: TestClient, store: JobStore
) -> None:
    job = seed_job(store, labels={"team": "vision", "note": 'ünïcode ✓ "quoted" \\ /'})
    path = f"/v1/merges/{job['id']}"
    queued = _same(client, route_only, path, auth())
    assert job["id"] in client.app.state.job_reader._rendered  # type: ignore[attr-defined] # answered by the fast path
    assert client.get(path, headers=auth()).json()["status"] == "queued"
    _succeed(store, job)
    succeeded = _same(client, route_only, path, auth())  # the record changed: rendered again, not the cached one
    assert succeeded != queued
    assert client.get(path, headers=auth()).json()["status"] == "succeeded"
    assert client.get(path, headers=auth()).json()["result"]["artifacts"][0]["name"] == "model.safetensors"


def test_fast_reads_leave_errors_to_the_route(client: TestClient, route_only: TestClient, store: JobStore) -> None:
    job = seed_job(store)
    path = f"/v1/merges/{job['id']}"
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer wrong-key"}, auth("rival")):
        _same(client, route_only, path, headers)
    assert assert_problem(client.get(path, headers=auth("rival")), 404)["code"] == "job_not_found"
    assert assert_problem(client.get(path), 401)["code"] == "unauthorized"
    missing = "/v1/merges/mrg_" + "0" * 26
    _same(client, route_only, missing, auth())
    assert assert_problem(client.get(missing, headers=auth()), 404)["code"] == "job_not_found"
    store.redis.delete(store.job_key(job["id"]))  # expired after it was read (and cached)
    assert assert_problem(client.get(path, headers=auth()), 404)["code"] == "job_not_found"


def test_fast_reads_are_counted_under_the_route_template(client: TestClient, store: JobStore) -> None:
    job = seed_job(store)
    labels = {"method": "GET", "route": "/v1/merges/{job_id}", "status": "200"}
    before = REGISTRY.get_sample_value("mudsc_http_requests_total", labels) or 0.0
    for _ in range(3):
        assert client.get(f"/v1/merges/{job['id']}", headers=auth()).status_code == 200
    assert REGISTRY.get_sample_value("mudsc_http_requests_total", labels) == before + 3


def test_a_fast_read_falls_back_to_the_route_when_its_redis_fails(client: TestClient, store: JobStore) -> None:
    job = seed_job(store)
    reader = client.app.state.job_reader  # type: ignore[attr-defined]

    def broken() -> None:
        raise ConnectionError("redis down")

    reader.snapshot_script, saved = broken, reader.snapshot_script
    try:
        response = client.get(f"/v1/merges/{job['id']}", headers=auth())
    finally:
        reader.snapshot_script = saved
    assert response.status_code == 200
    assert response.json()["id"] == job["id"]
