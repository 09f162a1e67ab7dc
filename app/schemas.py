"""Response schemas of the v1 API (the request body is ``mudsc_core.schema.JobSpec``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from mudsc_jobs.store import JobStatus


class Progress(BaseModel):
    stage: str
    percent: float = Field(ge=0, le=100)
    message: str = ""


class JobError(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. invalid_checkpoint, worker_lost, timeout")
    message: str
    stage: str | None = None
    retryable: bool = False


class ResultArtifact(BaseModel):
    name: str
    uri: str
    size: int
    sha256: str


class JobResult(BaseModel):
    artifacts: list[ResultArtifact]
    metrics: dict[str, Any] = Field(default_factory=dict)


class Job(BaseModel):
    id: str = Field(examples=["mrg_01JCXYZ..."])
    status: JobStatus
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    spec: dict[str, Any] = Field(description="as submitted, normalised with defaults")
    progress: Progress | None = None
    attempt: int = 0
    cancel_requested: bool = False
    error: JobError | None = None
    result: JobResult | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class JobPage(BaseModel):
    data: list[Job]
    has_more: bool


class Event(BaseModel):
    id: str = Field(description="Redis stream id; pass it as ?after= or Last-Event-ID to resume")
    time: str
    type: Literal["status", "progress", "log"]
    data: dict[str, Any]


class EventPage(BaseModel):
    data: list[Event]
    has_more: bool


class Artifact(BaseModel):
    name: str
    size: int
    sha256: str
    url: str = Field(description="presigned GET URL for the public S3 endpoint")
    expires_at: str


class ArtifactList(BaseModel):
    data: list[Artifact]


class WebhookAttempt(BaseModel):
    attempt: int = Field(description="1-based")
    status: Literal["succeeded", "retrying", "failed", "disabled", "interrupted"] = Field(
        description="succeeded: a 2xx; retrying: failed, another attempt follows; failed: failed, no attempt follows; "
        "disabled: the receiver answered 410; interrupted: the delivering worker was lost"
    )
    started_at: str | None = None
    response_code: int | None = Field(None, description="the receiver's HTTP status (none: no answer)")
    duration_ms: float | None = None
    error: str | None = Field(None, description="why it failed (the response body is never stored)")
    next_attempt_at: str | None = None


class WebhookDelivery(BaseModel):
    webhook_id: str = Field(description="the webhook-id header, the same on every attempt")
    type: str = Field(examples=["merge.succeeded"])
    url: str
    status: Literal["pending", "delivering", "retrying", "delivered", "failed", "disabled"]
    attempts: int
    created_at: str | None = None
    next_attempt_at: str | None = None


class WebhookDeliveryList(BaseModel):
    delivery: WebhookDelivery | None = Field(description="the job's delivery; none while it runs or without webhook")
    data: list[WebhookAttempt] = Field(description="every attempt, oldest first")
    has_more: bool = False


class MethodList(BaseModel):
    data: list[dict[str, Any]]


class ArchitectureList(BaseModel):
    data: list[dict[str, Any]]


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    code: str | None = None
    errors: list[dict[str, Any]] | None = None
