"""Listing, cancel, events, SSE and artifacts, on jobs written straight to the store (no S3)."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlparse

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mudsc_jobs.store import JobStore
from tests.api.conftest import auth, seed_job
from tests.api.test_http_contract import assert_problem


def _succeed(store: JobStore, job: dict, tenant: str = "acme") -> dict:
    claim = store.claim(job["id"], owner="test", lease_ttl_s=30, max_attempts=3)
    store.heartbeat(
        job["id"],
        claim.attempt,
        lease_ttl_s=30,
        progress={"stage": "matching", "percent": 50.0, "message": "layer 1/2"},
    )
    result = {
        "artifacts": [
            {
                "name": "model.safetensors",
                "uri": f"s3://results/{tenant}/{job['id']}/model.safetensors",
                "size": 10,
                "sha256": "a" * 64,
            },
            {
                "name": "report.json",
                "uri": f"s3://results/{tenant}/{job['id']}/report.json",
                "size": 2,
                "sha256": "b" * 64,
            },
        ],
        "metrics": {"matching": {"mean_similarity": 0.5}},
    }
    store.complete(job["id"], tenant, claim.attempt, status="succeeded", result=result)
    return store.get(job["id"])


def _sse_events(client: TestClient, path: str, headers: dict) -> list[dict]:
    events, current = [], {}
    with client.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "data" in current:
                    events.append(current)
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(":")
                current[field] = value.strip()
    return events


def test_list_is_newest_first_with_cursor_pages(client: TestClient, store: JobStore) -> None:
    ids = [seed_job(store, tenant="acme", labels={"batch": "pages"})["id"] for _ in range(5)]
    seen: list[str] = []
    after = None
    while True:
        params = {"limit": 2, "label": "batch:pages", **({"after": after} if after else {})}
        page = client.get("/v1/merges", params=params, headers=auth()).json()
        seen += [job["id"] for job in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == list(reversed(ids))


def test_list_filters_by_status_and_label(client: TestClient, store: JobStore) -> None:
    keep = seed_job(store, labels={"team": "filters", "run": "1"})
    other = seed_job(store, labels={"team": "filters", "run": "2"})
    client.post(f"/v1/merges/{other['id']}/cancel", headers=auth())
    canceled = client.get("/v1/merges", params={"status": "canceled", "label": "team:filters"}, headers=auth()).json()
    assert [j["id"] for j in canceled["data"]] == [other["id"]]
    both = client.get("/v1/merges", params=[("label", "team:filters"), ("label", "run:1")], headers=auth()).json()
    assert [j["id"] for j in both["data"]] == [keep["id"]]


def test_list_rejects_bad_query(client: TestClient) -> None:
    assert_problem(client.get("/v1/merges", params={"limit": 0}, headers=auth()), 422)
    assert_problem(client.get("/v1/merges", params={"limit": 101}, headers=auth()), 422)
    assert_problem(client.get("/v1/merges", params={"status": "sleeping"}, headers=auth()), 422)
    assert_problem(client.get("/v1/merges", params={"label": "nocolon"}, headers=auth()), 422)
    body = assert_problem(client.get("/v1/merges", params={"after": "mrg_unknown"}, headers=auth()), 422)
    assert body["errors"][0]["loc"] == ["query", "after"]


def test_cancel_queued_is_immediate_then_409(client: TestClient, store: JobStore) -> None:
    job = seed_job(store)
    response = client.post(f"/v1/merges/{job['id']}/cancel", headers=auth())
    assert response.status_code == 202 and response.json()["status"] == "canceled"
    assert response.json()["finished_at"]
    again = assert_problem(client.post(f"/v1/merges/{job['id']}/cancel", headers=auth()), 409)
    assert again["code"] == "job_finished"
    # a worker that receives the canceled job later does nothing
    assert store.claim(job["id"], owner="late", lease_ttl_s=5, max_attempts=3).outcome == "terminal"
    assert store.get(job["id"])["status"] == "canceled"


def test_cancel_running_is_canceling(client: TestClient, store: JobStore) -> None:
    job = seed_job(store)
    claim = store.claim(job["id"], owner="w", lease_ttl_s=30, max_attempts=3)
    response = client.post(f"/v1/merges/{job['id']}/cancel", headers=auth())
    assert response.status_code == 202
    assert response.json()["status"] == "canceling" and response.json()["cancel_requested"] is True
    assert store.heartbeat(job["id"], claim.attempt, lease_ttl_s=30) == "canceling"  # what the worker sees
    assert client.post(f"/v1/merges/{job['id']}/cancel", headers=auth()).status_code == 202  # idempotent


def test_events_list_and_after(client: TestClient, store: JobStore) -> None:
    job = _succeed(store, seed_job(store))
    events = client.get(f"/v1/merges/{job['id']}/events", headers=auth()).json()["data"]
    assert [e["type"] for e in events] == ["status", "status", "progress", "status"]
    assert [e["data"].get("status") for e in events if e["type"] == "status"] == ["queued", "running", "succeeded"]
    rest = client.get(f"/v1/merges/{job['id']}/events", params={"after": events[1]["id"]}, headers=auth()).json()
    assert [e["id"] for e in rest["data"]] == [e["id"] for e in events[2:]]
    assert_problem(client.get(f"/v1/merges/{job['id']}/events", params={"after": "x"}, headers=auth()), 422)


def test_sse_replays_ends_after_terminal_and_resumes(client: TestClient, store: JobStore) -> None:
    job = _succeed(store, seed_job(store))
    path = f"/v1/merges/{job['id']}/events/stream"
    events = _sse_events(client, path, auth())
    assert [e["event"] for e in events] == ["status", "status", "progress", "status"]
    assert json.loads(events[-1]["data"])["data"]["status"] == "succeeded"
    resumed = _sse_events(client, path, {**auth(), "Last-Event-ID": events[1]["id"]})
    assert [e["id"] for e in resumed] == [e["id"] for e in events[2:]]
    # resuming after the terminal event: the stream ends at once, empty
    assert _sse_events(client, path, {**auth(), "Last-Event-ID": events[-1]["id"]}) == []


def test_artifacts_409_until_succeeded(client: TestClient, store: JobStore) -> None:
    job = seed_job(store)
    body = assert_problem(client.get(f"/v1/merges/{job['id']}/artifacts", headers=auth()), 409)
    assert body["code"] == "not_succeeded"
    assert_problem(client.get(f"/v1/merges/{job['id']}/artifacts/model.safetensors", headers=auth()), 409)


def test_artifacts_are_presigned_for_the_public_endpoint(client: TestClient, store: JobStore, settings) -> None:
    job = _succeed(store, seed_job(store))
    data = client.get(f"/v1/merges/{job['id']}/artifacts", headers=auth()).json()["data"]
    assert [a["name"] for a in data] == ["model.safetensors", "report.json"]
    url = urlparse(data[0]["url"])
    assert f"{url.scheme}://{url.netloc}" == settings.s3.public_endpoint_url
    assert url.path == f"/results/acme/{job['id']}/model.safetensors"
    assert parse_qs(url.query)["X-Amz-Expires"] == [str(settings.s3.presign_ttl_s)]
    assert data[0]["sha256"] == "a" * 64 and data[0]["expires_at"].endswith("Z")
    redirect = client.get(f"/v1/merges/{job['id']}/artifacts/report.json", headers=auth(), follow_redirects=False)
    assert redirect.status_code == 307
    assert urlparse(redirect.headers["location"]).path == f"/results/acme/{job['id']}/report.json"
    assert_problem(client.get(f"/v1/merges/{job['id']}/artifacts/missing.bin", headers=auth()), 404)


def test_artifact_names_with_path_tricks_are_refused(client: TestClient, store: JobStore) -> None:
    job = _succeed(store, seed_job(store))
    for name in ("%2E%2E", "..%2Fsecret", "a%2F..%2F..%2Fb", ".hidden", "a%5Cb"):
        response = client.get(f"/v1/merges/{job['id']}/artifacts/{name}", headers=auth(), follow_redirects=False)
        assert response.status_code in (404, 422), (name, response.status_code)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.status_code != 307


def test_other_tenant_sees_404_everywhere(client: TestClient, store: JobStore) -> None:
    job = _succeed(store, seed_job(store, tenant="acme"))
    rival = auth("rival")
    for method, path in [
        ("GET", ""),
        ("POST", "/cancel"),
        ("GET", "/events"),
        ("GET", "/events/stream"),
        ("GET", "/artifacts"),
        ("GET", "/artifacts/model.safetensors"),
    ]:
        response = client.request(method, f"/v1/merges/{job['id']}{path}", headers=rival)
        assert_problem(response, 404)
    listed = client.get("/v1/merges", params={"limit": 100}, headers=rival).json()["data"]
    assert job["id"] not in [j["id"] for j in listed]
    assert_problem(client.get("/v1/merges", params={"after": job["id"]}, headers=rival), 422)


_CURSORS = st.one_of(
    st.from_regex(r"\A[0-9]{1,20}-[0-9]{1,20}\Z"),
    st.sampled_from([f"{2**64 - 1}-{2**64 - 1}", f"{2**64}-0", f"0-{2**64}", "99999999999999999999-0", "0-0"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cursor=_CURSORS)
def test_any_event_cursor_is_answered_without_a_server_error(client: TestClient, store: JobStore, cursor: str) -> None:
    """Cursors that match the pattern but not a Redis stream id are the client's error, never a 503."""
    job = _succeed(store, seed_job(store))
    fits = all(int(part) < 2**64 for part in cursor.split("-"))
    listed = client.get(f"/v1/merges/{job['id']}/events", params={"after": cursor}, headers=auth())
    assert listed.status_code == (200 if fits else 422), listed.text
    stream = f"/v1/merges/{job['id']}/events/stream"
    if fits:
        streamed = _sse_events(client, stream, {**auth(), "Last-Event-ID": cursor})
        assert all(_stream_order(e["id"]) > _stream_order(cursor) for e in streamed)
    else:
        assert client.get(stream, headers={**auth(), "Last-Event-ID": cursor}).status_code == 422


def _stream_order(event_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in event_id.split("-"))
