"""Auth, problem+json answers, the registries and the health/metrics routes (no S3 needed)."""

from __future__ import annotations

import json
import subprocess
import sys

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.conftest import auth, mlp_spec

PROBLEM = "application/problem+json"


def assert_problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    assert body["instance"] == response.request.url.path
    return body


def test_missing_and_wrong_keys_are_401_problems(client: TestClient) -> None:
    missing = client.get("/v1/merges")
    assert_problem(missing, 401)
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert_problem(client.get("/v1/merges", headers={"Authorization": "Bearer nope"}), 401)
    assert_problem(client.get("/v1/methods", headers={"Authorization": "Basic abc"}), 401)
    # auth is checked before the body: a bad key with a bad body is still 401
    assert_problem(client.post("/v1/merges", content=b"{", headers={"Authorization": "Bearer nope"}), 401)


def test_livez_needs_no_key(client: TestClient) -> None:
    assert client.get("/livez").json() == {"status": "ok"}


def test_unknown_route_and_wrong_method_are_problems(client: TestClient) -> None:
    assert_problem(client.get("/v2/nothing"), 404)
    body = assert_problem(client.delete("/v1/merges", headers=auth()), 405)
    assert body["title"] == "Method Not Allowed"


def test_malformed_json_is_422_with_errors(client: TestClient) -> None:
    response = client.post("/v1/merges", content=b'{"method": ', headers={**auth(), "Content-Type": "application/json"})
    body = assert_problem(response, 422)
    assert body["errors"] and body["errors"][0]["loc"][0] == "body"


def test_invalid_specs_are_422_naming_the_field(client: TestClient) -> None:
    cases = [
        (mlp_spec(method={"name": "nope"}), ["body", "method"], "unknown method"),
        (mlp_spec(models=[{"uri": "s3://models/acme/a.safetensors"}]), ["body", "models"], "at least 2"),
        (
            mlp_spec(models=[{"uri": "s3://models/acme/a.pt"}, {"uri": "s3://models/acme/b.safetensors"}]),
            ["body", "models", 0, "uri"],
            "pickle",
        ),
        (
            mlp_spec(method={"name": "mudsc", "params": {"beta": 2}}),
            ["body", "method", "beta"],
            "less than or equal to 1",
        ),
        (mlp_spec(unexpected=1), ["body", "unexpected"], "Extra inputs"),
        (
            mlp_spec(models=[{"uri": "s3://models/../a.safetensors"}, {"uri": "s3://models/acme/b.safetensors"}]),
            ["body", "models", 0, "uri"],
            "'..'",
        ),
    ]
    for spec, loc, fragment in cases:
        body = assert_problem(client.post("/v1/merges", json=spec, headers=auth()), 422)
        matching = [e for e in body["errors"] if e["loc"][: len(loc)] == loc]
        assert matching, (loc, body["errors"])
        assert any(fragment in e["msg"] for e in matching), (fragment, matching)
        assert "input" not in matching[0]  # pydantic's echo of the input is not sent back


def test_oversized_body_is_413(client: TestClient, settings) -> None:
    spec = mlp_spec(labels={"x": "y" * 200})
    spec["padding"] = "z" * (settings.limits.max_request_bytes + 1)
    assert_problem(client.post("/v1/merges", json=spec, headers=auth()), 413)


def test_unknown_job_ids_are_404(client: TestClient) -> None:
    for path in (
        "/v1/merges/mrg_01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "/v1/merges/not-an-id",
        "/v1/merges/mrg_01ARZ3NDEKTSV4RRFFQ69G5FAV/events",
    ):
        body = assert_problem(client.get(path, headers=auth()), 404)
        assert body["code"] == "job_not_found"
    assert_problem(client.post("/v1/merges/mrg_01ARZ3NDEKTSV4RRFFQ69G5FAV/cancel", headers=auth()), 404)


def test_methods_describe_schema_and_needs(client: TestClient) -> None:
    data = {m["name"]: m for m in client.get("/v1/methods", headers=auth()).json()["data"]}
    assert data["mudsc"]["requires_architecture"] is True
    assert data["mudsc"]["calibration"] == "optional"
    assert "beta" in data["mudsc"]["params_schema"]["properties"]
    assert data["zipit"]["calibration"] == "required"


def test_architectures_carry_config_schema(client: TestClient) -> None:
    data = {a["name"]: a for a in client.get("/v1/architectures", headers=auth()).json()["data"]}
    assert set(data) >= {"mlp", "resnet", "vgg", "vit"}
    assert "hidden" in data["mlp"]["config_schema"]["properties"]
    assert data["resnet"]["config_schema"]["properties"]["depth"]["minimum"] == 8


def test_metrics_count_requests_by_route_template(client: TestClient) -> None:
    client.get("/v1/merges/mrg_01ARZ3NDEKTSV4RRFFQ69G5FAV", headers=auth())
    text = client.get("/metrics").text
    assert 'mudsc_http_requests_total{method="GET",route="/v1/merges/{job_id}",status="404"}' in text


def test_readyz_reports_s3_down_as_503(client: TestClient) -> None:
    # Redis answers (the real server); S3 points at the discard port in these tests.
    body = assert_problem(client.get("/readyz"), 503)
    assert body["checks"]["redis"] == "ok" and body["checks"]["broker"] == "ok"
    assert body["checks"]["s3"].startswith("unavailable")


def test_readyz_reports_redis_down(redis_prefix: str) -> None:
    from app.main import create_app
    from tests.api.conftest import make_settings

    settings = make_settings(redis_prefix, MUDSC_REDIS__URL="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as dead:
        body = assert_problem(dead.get("/readyz"), 503)
    assert body["checks"]["redis"].startswith("unavailable")
    assert body["checks"]["broker"].startswith("unavailable")  # the broker defaults to the Redis URL


def test_openapi_lists_every_route(client: TestClient) -> None:
    paths = set(client.get("/openapi.json").json()["paths"])
    assert paths >= {
        "/v1/merges",
        "/v1/merges/{job_id}",
        "/v1/merges/{job_id}/cancel",
        "/v1/merges/{job_id}/events",
        "/v1/merges/{job_id}/events/stream",
        "/v1/merges/{job_id}/artifacts",
        "/v1/merges/{job_id}/artifacts/{name}",
        "/v1/methods",
        "/v1/architectures",
        "/livez",
        "/readyz",
        "/metrics",
    }


def test_api_process_does_not_import_torch() -> None:
    code = "import sys, app.main, mudsc_jobs.store, app.inputs; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_architectures_list_the_torchvision_resnet_and_say_specs_are_derived(client: TestClient) -> None:
    data = {a["name"]: a for a in client.get("/v1/architectures", headers=auth()).json()["data"]}
    assert data["torchvision_resnet"]["config_schema"]["properties"]["depth"]["enum"] == [18, 34, 50, 101]
    assert data["resnet"]["config_schema"]["properties"]["shortcut_kernel"]
    assert all("derived by tracing" in a["permutation_spec"] for a in data.values())


_SURROGATE = st.characters(categories=["Cs"])  # U+D800..U+DFFF: not encodable as UTF-8
_TEXT_WITH_SURROGATES = st.builds(
    lambda a, s, b: a + s + b, st.text("abc19", max_size=3), _SURROGATE, st.text("xyz", max_size=3)
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["label_value", "label_key", "uri", "method"]), text=_TEXT_WITH_SURROGATES)
def test_strings_that_are_not_valid_unicode_are_refused_before_anything_is_stored(
    client: TestClient, where: str, text: str
) -> None:
    spec = mlp_spec()
    if where == "label_value":
        spec["labels"] = {"k": text}
    elif where == "label_key":
        spec["labels"] = {text: "v"}
    elif where == "uri":
        spec["models"][0]["uri"] = f"s3://models/acme/{text}.safetensors"
    else:
        spec["method"] = {"name": text}
    body = json.dumps(spec).encode()  # ensure_ascii: a lone surrogate travels as a \\ud800 escape
    before = client.get("/v1/merges", headers=auth()).json()["data"]
    response = client.post("/v1/merges", content=body, headers={**auth(), "Content-Type": "application/json"})
    assert response.status_code == 422 and "Unicode" in response.text, response.text
    after = client.get("/v1/merges", headers=auth())
    assert after.status_code == 200 and after.json()["data"] == before  # nothing stored, listing intact
