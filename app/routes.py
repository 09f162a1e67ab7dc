"""The ``/v1`` routes and the health/metrics routes. Thin: validate, authorise, call a service."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from app import service
from app.auth import Tenant, authenticate
from app.health import readiness
from app.problems import ApiProblem, problem_response
from app.schemas import (
    ArchitectureList,
    ArtifactList,
    EventPage,
    Job,
    JobPage,
    JobStatus,
    MethodList,
    Problem,
    WebhookDeliveryList,
)
from mudsc_core.schema import ARCHITECTURE_CONFIGS, METHODS, JobSpec
from mudsc_core.schema.mergekit import YAML_MEDIA_TYPES, MergekitConfigError, from_mergekit_yaml, is_yaml_media_type
from mudsc_jobs.store import TERMINAL, CursorNotFound, EventTail, JobNotFound, TransitionConflict

_JOB_ID = re.compile(r"^mrg_[0-9A-HJKMNP-TV-Z]{26}$")
MAX_STREAM_PART = 2**64 - 1
_EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_ARTIFACT_SEGMENT = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,254}$")

PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {"application/problem+json": {}}} for code in (401, 404, 422)
}

v1 = APIRouter(prefix="/v1", responses=PROBLEMS)
health = APIRouter()


async def services(request: Request) -> service.Services:
    # async: no I/O here, and a sync dependency would cost a thread-pool hop on every request
    return request.app.state.services


Services = Annotated[service.Services, Depends(services)]
Auth = Annotated[Tenant, Depends(authenticate)]


def _owned_job(svc: service.Services, job_id: str, tenant: Tenant) -> dict[str, Any]:
    """The tenant's job, or 404 (also for another tenant's id: existence is not disclosed)."""
    if not _JOB_ID.match(job_id):
        raise ApiProblem(404, f"job {job_id!r} not found", code="job_not_found")
    try:
        return svc.store.get(job_id, tenant.name)
    except JobNotFound:
        raise ApiProblem(404, f"job {job_id!r} not found", code="job_not_found") from None


async def raw_body(request: Request) -> bytes:
    return await request.body()


_MERGEKIT_PROBLEM = "mudsc.mergekit_problem"


def _translated_request(request: Request, body: bytes, problem: ApiProblem | None = None) -> Request:
    """The request with ``body`` as its JSON body (FastAPI then validates it as any JSON body); a translation
    problem waits in the scope for :func:`mergekit_problem`, so that authentication still answers first."""
    headers = [(k, v) for k, v in request.scope["headers"] if k not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    translated = Request({**request.scope, "headers": headers, _MERGEKIT_PROBLEM: problem}, request.receive)
    translated._body = body  # read once here; FastAPI's body parsing reads this
    return translated


def mergekit_problem(request: Request) -> None:
    """Raise the 422 of a mergekit YAML body that did not translate (after authentication)."""
    problem = request.scope.get(_MERGEKIT_PROBLEM)
    if problem is not None:
        raise problem


class MergeRoute(APIRoute):
    """``POST /v1/merges``: a mergekit YAML body (``application/yaml``) becomes its job spec, then the route runs
    as for a JSON body; JSON bodies pass through untouched."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            if is_yaml_media_type(request.headers.get("content-type")):
                try:
                    spec = from_mergekit_yaml(await request.body())
                except MergekitConfigError as exc:
                    problem = ApiProblem(
                        422,
                        f"mergekit configuration: {exc}",
                        code="validation_error",
                        title="Request validation failed",
                        errors=[{"loc": ["body", *e["loc"]], "msg": e["msg"]} for e in exc.errors],
                    )
                    request = _translated_request(request, b"{}", problem)
                else:
                    request = _translated_request(request, json.dumps(spec.model_dump(mode="json")).encode())
            return await handler(request)

        return handle


_YAML_BODY = {"schema": {"type": "string", "description": "a mergekit configuration (models named by s3:// URIs)"}}


def create_merge(
    spec: JobSpec,
    response: Response,
    svc: Services,
    tenant: Auth,
    _mergekit: Annotated[None, Depends(mergekit_problem)],
    body: Annotated[bytes, Depends(raw_body)],
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> dict[str, Any]:
    job, created = service.submit(svc, tenant, spec, idempotency_key=idempotency_key, digest=service.body_hash(body))
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/merges/{job['id']}"
    return job


v1.add_api_route(
    "/merges",
    create_merge,
    methods=["POST"],
    status_code=202,
    response_model=Job,
    route_class_override=MergeRoute,
    openapi_extra={"requestBody": {"content": {media: _YAML_BODY for media in YAML_MEDIA_TYPES}}},
    responses={
        200: {"model": Job, "description": "Idempotent replay: the original job"},
        403: {"model": Problem},
        409: {"model": Problem},
        413: {"model": Problem},
        429: {"model": Problem},
        503: {"model": Problem},
    },
)


@v1.get("/merges", response_model=JobPage)
def list_merges(
    svc: Services,
    tenant: Auth,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64, description="id of the last job of the previous page")] = None,
    status: JobStatus | None = None,
    label: Annotated[list[str], Query(max_length=32, description="key:value; repeat to AND filters")] = [],  # noqa: B006
) -> dict[str, Any]:
    labels: dict[str, str] = {}
    for item in label:
        key, sep, value = item.partition(":")
        if not sep or not key:
            raise ApiProblem(
                422,
                f"label filter {item!r} must be key:value",
                code="validation_error",
                errors=[{"loc": ["query", "label"], "msg": "must be key:value"}],
            )
        labels[key] = value
    try:
        jobs, has_more = svc.store.list(tenant.name, limit=limit, after=after, status=status, labels=labels)
    except CursorNotFound:
        raise ApiProblem(
            422,
            f"cursor {after!r} is not one of your jobs",
            code="validation_error",
            errors=[{"loc": ["query", "after"], "msg": "unknown job id"}],
        ) from None
    return {"data": jobs, "has_more": has_more}


@v1.get("/merges/{job_id}", response_model=Job)
async def get_merge(job_id: str, svc: Services, tenant: Auth) -> dict[str, Any]:
    # The most frequent request (clients poll it). Its 200s are answered before this route by app/reads.py
    # (one async Redis call, the JSON rendered once per version of the record, byte for byte this route's);
    # this route answers what that path leaves to it (401, 404, Redis failing) and when it is off: one
    # thread-pool hop for the blocking store read, the response rendered on the event loop.
    return await run_in_threadpool(_owned_job, svc, job_id, tenant)


@v1.post("/merges/{job_id}/cancel", status_code=202, response_model=Job, responses={409: {"model": Problem}})
def cancel_merge(job_id: str, svc: Services, tenant: Auth) -> dict[str, Any]:
    _owned_job(svc, job_id, tenant)
    try:
        return service.cancel(svc, tenant, job_id)
    except TransitionConflict as conflict:
        raise ApiProblem(
            409, f"job is already {conflict.status}", code="job_finished", status_of_job=conflict.status
        ) from None
    except JobNotFound:
        raise ApiProblem(404, f"job {job_id!r} not found", code="job_not_found") from None


def _event_cursor(value: str | None, loc: list[str]) -> str | None:
    if value is None or value == "":
        return None
    # A Redis stream id is two unsigned 64-bit integers: a larger one is the client's error, not an outage.
    if not _EVENT_ID.match(value) or any(int(part) > MAX_STREAM_PART for part in value.split("-")):
        raise ApiProblem(
            422,
            f"event id {value[:64]!r} is malformed (expected <ms>-<seq>, each at most 2^64-1)",
            code="validation_error",
            errors=[{"loc": loc, "msg": "malformed event id"}],
        )
    return value


@v1.get("/merges/{job_id}/events", response_model=EventPage)
def list_events(
    job_id: str,
    svc: Services,
    tenant: Auth,
    after: Annotated[str | None, Query(max_length=64, description="event id; events after it")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> dict[str, Any]:
    _owned_job(svc, job_id, tenant)
    events = svc.store.events(job_id, after=_event_cursor(after, ["query", "after"]), count=limit + 1)
    return {"data": events[:limit], "has_more": len(events) > limit}


@v1.get(
    "/merges/{job_id}/events/stream",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def stream_events(
    job_id: str,
    request: Request,
    svc: Services,
    tenant: Auth,
    after: Annotated[str | None, Query(max_length=64)] = None,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> EventSourceResponse:
    _owned_job(svc, job_id, tenant)
    start = (
        _event_cursor(last_event_id, ["header", "Last-Event-ID"]) or _event_cursor(after, ["query", "after"]) or "0-0"
    )
    tail: EventTail = request.app.state.event_tail

    async def events() -> AsyncIterator[dict[str, Any]]:
        cursor = start
        block: int | None = None  # the first read does not block: a finished job's replay ends at once
        while True:
            batch = await tail.read(job_id, cursor, block_ms=block)
            block = 2000
            for event in batch:
                cursor = event["id"]
                yield {"id": event["id"], "event": event["type"], "data": json.dumps(event)}
                if event["type"] == "status" and event["data"].get("status") in TERMINAL:
                    return
            if not batch:
                # Nothing new: stop if the job ended before this cursor or expired meanwhile.
                status = await tail.status(job_id)
                if status is None or status in TERMINAL:
                    return
            if await request.is_disconnected():
                return

    return EventSourceResponse(events(), ping=15, send_timeout=30)


@v1.get("/merges/{job_id}/artifacts", response_model=ArtifactList, responses={409: {"model": Problem}})
def list_artifacts(job_id: str, svc: Services, tenant: Auth) -> dict[str, Any]:
    return {"data": service.artifact_urls(svc, _owned_job(svc, job_id, tenant))}


@v1.get(
    "/merges/{job_id}/artifacts/{name:path}",
    status_code=307,
    response_class=RedirectResponse,
    responses={307: {"description": "redirect to a presigned GET URL"}, 409: {"model": Problem}},
)
def get_artifact(job_id: str, name: str, svc: Services, tenant: Auth) -> RedirectResponse:
    job = _owned_job(svc, job_id, tenant)
    segments = name.split("/")
    if not all(_ARTIFACT_SEGMENT.match(s) for s in segments) or ".." in name:
        raise ApiProblem(
            422,
            f"artifact name {name!r} is not a plain file name",
            code="validation_error",
            errors=[{"loc": ["path", "name"], "msg": "must be a plain relative file name"}],
        )
    for artifact in service.artifact_urls(svc, job):
        if artifact["name"] == name:
            return RedirectResponse(artifact["url"], status_code=307)
    raise ApiProblem(404, f"job {job_id} has no artifact {name!r}", code="artifact_not_found")


@v1.get("/merges/{job_id}/webhook-deliveries", response_model=WebhookDeliveryList)
def list_webhook_deliveries(job_id: str, svc: Services, tenant: Auth) -> dict[str, Any]:
    _owned_job(svc, job_id, tenant)
    delivery = svc.store.webhooks.get(job_id)
    return {
        "delivery": delivery.public() if delivery else None,
        "data": svc.store.webhooks.attempts(job_id),
        "has_more": False,
    }


@v1.get("/methods", response_model=MethodList)
def list_methods(tenant: Auth) -> dict[str, Any]:
    return {"data": [info.describe() for _, info in sorted(METHODS.items())]}


@v1.get("/architectures", response_model=ArchitectureList)
def list_architectures(tenant: Auth) -> dict[str, Any]:
    return {
        "data": [
            {
                "name": name,
                "description": (config.__doc__ or "").strip(),
                "config_schema": config.model_json_schema(),
                "permutation_spec": SPEC_SOURCE,
            }
            for name, config in sorted(ARCHITECTURE_CONFIGS.items())
        ]
    }


SPEC_SOURCE = (
    "derived by tracing the model's computation (torch.fx, or torch.export for models fx cannot follow such as "
    "transformers'), then verified before every merge: random "
    "permutations by the spec must leave each input model's outputs unchanged (relative error <= 1e-4), "
    "else the job fails with unsupported_architecture; the job's report.json lists the groups and the check"
)


@health.get("/livez")
def livez() -> dict[str, str]:
    return {"status": "ok"}


@health.get("/readyz", responses={503: {"model": Problem}})
def readyz(request: Request) -> Response:
    checks = readiness(request.app.state.services, request.app.state.readiness_s3)
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    failing = ", ".join(f"{name}: {value}" for name, value in checks.items() if value != "ok")
    return problem_response(request, 503, f"not ready ({failing})", code="not_ready", checks=checks)


@health.get("/metrics", response_class=Response)
def prometheus_metrics(request: Request) -> Response:
    # this process's own metrics, then what the workers recorded into Redis (app/metrics.py)
    body = generate_latest(REGISTRY) + generate_latest(request.app.state.recorded_metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
