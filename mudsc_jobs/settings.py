"""All configuration of the API and the worker: one pydantic-settings object.

Every field reads an environment variable named ``MUDSC_<SECTION>__<FIELD>`` (nested
sections joined by ``__``); the name is repeated in each description because the README's
configuration table is generated from this class.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_TENANT = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,62}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class RedisSettings(BaseModel):
    url: str = Field("redis://127.0.0.1:6379/0", description="Job store Redis URL (MUDSC_REDIS__URL)")
    key_prefix: str = Field(
        "mudsc:", max_length=128, description="Prefix of every job-store key (MUDSC_REDIS__KEY_PREFIX)"
    )


class CelerySettings(BaseModel):
    broker_url: str | None = Field(
        None, description="Celery broker URL; default: the job store Redis URL (MUDSC_CELERY__BROKER_URL)"
    )
    queue: str = Field("gpu", description="Queue the merge task is sent to (MUDSC_CELERY__QUEUE)")
    key_prefix: str = Field(
        "",
        max_length=128,
        description="Redis broker global key prefix, to share one Redis between stacks (MUDSC_CELERY__KEY_PREFIX)",
    )


class S3Settings(BaseModel):
    endpoint_url: str | None = Field(None, description="S3 endpoint the service talks to (MUDSC_S3__ENDPOINT_URL)")
    public_endpoint_url: str | None = Field(
        None,
        description="S3 endpoint clients reach; presigned URLs are signed for it; default: the endpoint "
        "(MUDSC_S3__PUBLIC_ENDPOINT_URL)",
    )
    access_key_id: str | None = Field(None, description="S3 access key id (MUDSC_S3__ACCESS_KEY_ID)")
    secret_access_key: str | None = Field(None, description="S3 secret access key (MUDSC_S3__SECRET_ACCESS_KEY)")
    region: str = Field("us-east-1", description="S3 region (MUDSC_S3__REGION)")
    results_bucket: str = Field("results", description="Bucket of default job outputs (MUDSC_S3__RESULTS_BUCKET)")
    presign_ttl_s: int = Field(
        900, ge=1, le=7 * 24 * 3600, description="Presigned URL lifetime (MUDSC_S3__PRESIGN_TTL_S)"
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="S3 connect timeout (MUDSC_S3__CONNECT_TIMEOUT_S)")
    read_timeout_s: float = Field(60.0, gt=0, description="S3 read timeout (MUDSC_S3__READ_TIMEOUT_S)")
    max_attempts: int = Field(
        5,
        ge=1,
        le=20,
        description="Attempts of one S3 request (boto3 'standard' retry mode: exponential backoff with jitter on "
        "connection errors, throttling and 5xx) before a transfer fails the job (MUDSC_S3__MAX_ATTEMPTS)",
    )
    multipart_threshold_bytes: int = Field(
        64 * 1024**2,
        ge=5 * 1024**2,
        description="Uploads/downloads above this size use multipart transfers (MUDSC_S3__MULTIPART_THRESHOLD_BYTES)",
    )
    transfer_retry_s: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="How long the worker keeps starting one object's transfer again (backoff up to 5 s) after S3 "
        "stayed unreachable through every one of MUDSC_S3__MAX_ATTEMPTS of a request (a restart of the S3 server, "
        "a network blip), before the job fails `storage_unavailable`; 0 = never (MUDSC_S3__TRANSFER_RETRY_S)",
    )


class ApiKey(BaseModel):
    tenant: str = Field(description="Tenant the key belongs to")
    key_sha256: str = Field(description="Hex SHA-256 of the API key (the key itself is never stored)")
    allowed_prefixes: list[str] = Field(
        default_factory=list, description="s3:// prefixes the tenant may read and write (besides its results prefix)"
    )

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, tenant: str) -> str:
        if not _TENANT.match(tenant):
            raise ValueError("tenant must be 1-63 chars of [a-z0-9_-], starting with a letter or digit")
        return tenant

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, digest: str) -> str:
        digest = digest.lower()
        if not _SHA256_HEX.match(digest):
            raise ValueError("key_sha256 must be 64 hex digits")
        return digest

    @field_validator("allowed_prefixes")
    @classmethod
    def _prefixes(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            if not prefix.startswith("s3://") or len(prefix) <= len("s3://"):
                raise ValueError(f"allowed prefix {prefix!r} must be an s3:// URI prefix")
        return prefixes


class AuthSettings(BaseModel):
    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description='API keys as JSON: [{"tenant", "key_sha256", "allowed_prefixes"}] (MUDSC_AUTH__API_KEYS)',
    )


class WorkerSettings(BaseModel):
    device: str = Field(
        "auto", description="auto | cpu | cuda | cuda:N, resolved inside the task (MUDSC_WORKER__DEVICE)"
    )
    scratch_dir: str | None = Field(
        None,
        description="Scratch directory for inputs/outputs; default: the system temp dir (MUDSC_WORKER__SCRATCH_DIR)",
    )
    soft_time_limit_s: int | None = Field(
        None,
        ge=1,
        description="Soft time limit of a merge, after which the job fails with `timeout`; default: the hard limit "
        "minus max(30 s, 5%) (MUDSC_WORKER__SOFT_TIME_LIMIT_S)",
    )
    time_limit_s: int = Field(3900, ge=2, description="Hard time limit of a merge (MUDSC_WORKER__TIME_LIMIT_S)")
    lease_ttl_s: int = Field(
        60, ge=2, description="Lease a running worker holds and renews on a job (MUDSC_WORKER__LEASE_TTL_S)"
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description="Deliveries of one job before it fails with `worker_lost` (MUDSC_WORKER__MAX_ATTEMPTS)",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Worker log lines: Celery's text, or one JSON object per line with the job id and attempt "
        "(MUDSC_WORKER__LOG_FORMAT)",
    )
    memory_budget_bytes: int | None = Field(
        None,
        ge=0,
        description="Largest estimated peak memory of a permutation merge; a job estimated above it fails with "
        "`too_large` before the heavy work. Default: 90% of the worker's memory (its cgroup limit, else the "
        "machine's RAM); 0: no limit. The estimate counts host and device memory together "
        "(MUDSC_WORKER__MEMORY_BUDGET_BYTES)",
    )

    debug_stage_delay_s: float = Field(
        0.0,
        ge=0,
        le=600,
        description="TESTING ONLY, default 0 (off): sleep this long at the start of each stage, while still renewing "
        "the lease and honouring cancellation, so fault-injection tests can act mid-stage "
        "(MUDSC_WORKER__DEBUG_STAGE_DELAY_S)",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not re.match(r"^(auto|cpu|cuda|cuda:\d+)$", device):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return device

    @model_validator(mode="after")
    def _limits(self) -> WorkerSettings:
        if self.soft_time_limit_s is not None and self.time_limit_s <= self.soft_time_limit_s:
            raise ValueError("time_limit_s must exceed soft_time_limit_s")
        return self

    @property
    def effective_soft_time_limit_s(self) -> int:
        if self.soft_time_limit_s is not None:
            return self.soft_time_limit_s
        return max(1, self.time_limit_s - max(30, self.time_limit_s // 20))


class LimitSettings(BaseModel):
    max_models: int = Field(16, ge=2, le=64, description="Models per job (MUDSC_LIMITS__MAX_MODELS)")
    max_checkpoint_bytes: int = Field(
        20 * 1024**3, ge=1, description="Size of one checkpoint (file or folder) (MUDSC_LIMITS__MAX_CHECKPOINT_BYTES)"
    )
    max_calibration_samples: int = Field(
        100_000, ge=1, description="calibration.max_samples upper bound (MUDSC_LIMITS__MAX_CALIBRATION_SAMPLES)"
    )
    max_concurrent_jobs_per_tenant: int = Field(
        8, ge=1, description="Queued + running jobs per tenant (MUDSC_LIMITS__MAX_CONCURRENT_JOBS_PER_TENANT)"
    )
    max_request_bytes: int = Field(
        1024 * 1024, ge=1024, description="Request body size (MUDSC_LIMITS__MAX_REQUEST_BYTES)"
    )
    max_header_bytes: int = Field(
        16 * 1024**2, ge=1024, description="Safetensors header size accepted (MUDSC_LIMITS__MAX_HEADER_BYTES)"
    )


class ReconcileSettings(BaseModel):
    interval_s: float = Field(
        15.0,
        ge=0,
        description="How often the API process sweeps for running jobs whose lease expired with no live worker and "
        "re-queues them (or fails them `worker_lost` after max attempts); 0 disables (MUDSC_RECONCILE__INTERVAL_S)",
    )
    resend_queued_after_s: float = Field(
        3600.0,
        ge=0,
        description="A job still queued this long after its task was last sent gets its task sent again (a broker "
        "that lost messages, e.g. a crashed Redis); a duplicate is harmless, the claim is fenced; 0 disables "
        "(MUDSC_RECONCILE__RESEND_QUEUED_AFTER_S)",
    )


_WEBHOOK_EVENTS = ("succeeded", "failed", "canceled")


class WebhookEndpoint(BaseModel):
    url: str = Field(max_length=2048, description="Receiver URL (https unless MUDSC_WEBHOOKS__ALLOW_HTTP)")
    events: list[str] = Field(default_factory=lambda: list(_WEBHOOK_EVENTS), description="Job statuses delivered")

    @field_validator("events")
    @classmethod
    def _events(cls, events: list[str]) -> list[str]:
        unknown = sorted(set(events) - set(_WEBHOOK_EVENTS))
        if unknown or not events:
            raise ValueError(f"events must be a non-empty subset of {', '.join(_WEBHOOK_EVENTS)}")
        return events


class TenantWebhooks(BaseModel):
    secrets: list[str] = Field(
        default_factory=list,
        description="whsec_<base64> signing secrets; every one signs each delivery (rotation: add the new one, "
        "remove the old one once receivers use the new one)",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Receiver hosts: exact names or IP literals, or *.example.com"
    )
    default: WebhookEndpoint | None = Field(None, description="Webhook of the tenant's jobs that name none")

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, secrets: list[str]) -> list[str]:
        import base64
        import binascii

        for secret in secrets:
            if not secret.startswith("whsec_"):
                raise ValueError("a webhook secret must start with whsec_")
            try:
                key = base64.b64decode(secret[len("whsec_") :], validate=True)
            except binascii.Error:
                raise ValueError("a webhook secret must be whsec_ followed by base64") from None
            if not 24 <= len(key) <= 64:
                raise ValueError("a webhook secret must hold 24 to 64 bytes (base64-encoded after whsec_)")
        return secrets

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        return [host.strip().lower().rstrip(".") for host in hosts if host.strip()]


class WebhookSettings(BaseModel):
    queue: str = Field("webhooks", description="Queue of the webhook delivery task (MUDSC_WEBHOOKS__QUEUE)")
    tenants: dict[str, TenantWebhooks] = Field(
        default_factory=dict,
        description='Per tenant, as JSON: {"<tenant>": {"secrets": ["whsec_..."], "allowed_hosts": ["hooks.example.com"], '
        '"default": {"url", "events"}}} (MUDSC_WEBHOOKS__TENANTS)',
    )
    allow_http: bool = Field(
        False, description="Accept plain http:// receiver URLs (local development, tests) (MUDSC_WEBHOOKS__ALLOW_HTTP)"
    )
    allow_private_addresses: bool = Field(
        False,
        description="Deliver to private, loopback and link-local addresses (local development, tests) "
        "(MUDSC_WEBHOOKS__ALLOW_PRIVATE_ADDRESSES)",
    )
    connect_timeout_s: float = Field(
        3.0, gt=0, le=60, description="Connect timeout of one delivery attempt (MUDSC_WEBHOOKS__CONNECT_TIMEOUT_S)"
    )
    timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Longest one delivery attempt may take, answer included (MUDSC_WEBHOOKS__TIMEOUT_S)",
    )
    retry_window_s: float = Field(
        24 * 3600.0,
        ge=0,
        description="Failed deliveries are retried (exponential backoff with jitter) until this long after the "
        "event; then the delivery ends failed (MUDSC_WEBHOOKS__RETRY_WINDOW_S)",
    )
    backoff_base_s: float = Field(
        5.0, gt=0, description="First retry delay; doubles per attempt (MUDSC_WEBHOOKS__BACKOFF_BASE_S)"
    )
    backoff_max_s: float = Field(900.0, gt=0, description="Longest retry delay (MUDSC_WEBHOOKS__BACKOFF_MAX_S)")
    resend_after_s: float = Field(
        60.0,
        gt=0,
        description="The reconciler sends again a delivery this long overdue (its task lost, its worker killed) "
        "(MUDSC_WEBHOOKS__RESEND_AFTER_S)",
    )

    def tenant(self, name: str) -> TenantWebhooks | None:
        return self.tenants.get(name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MUDSC_", env_nested_delimiter="__", extra="ignore")

    redis: RedisSettings = Field(default_factory=RedisSettings, description="Job store (MUDSC_REDIS__*)")
    celery: CelerySettings = Field(default_factory=CelerySettings, description="Broker (MUDSC_CELERY__*)")
    s3: S3Settings = Field(default_factory=S3Settings, description="Object storage (MUDSC_S3__*)")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="API keys (MUDSC_AUTH__*)")
    worker: WorkerSettings = Field(default_factory=WorkerSettings, description="Merge worker (MUDSC_WORKER__*)")
    limits: LimitSettings = Field(default_factory=LimitSettings, description="Request limits (MUDSC_LIMITS__*)")
    reconcile: ReconcileSettings = Field(
        default_factory=ReconcileSettings, description="Lost-worker sweep (MUDSC_RECONCILE__*)"
    )
    webhooks: WebhookSettings = Field(
        default_factory=WebhookSettings, description="Signed webhooks (MUDSC_WEBHOOKS__*)"
    )
    job_ttl_s: int = Field(
        7 * 24 * 3600, ge=60, description="How long finished jobs and their events are kept (MUDSC_JOB_TTL_S)"
    )

    @property
    def broker_url(self) -> str:
        return self.celery.broker_url or self.redis.url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
