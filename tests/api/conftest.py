"""API test fixtures: an in-process app (TestClient) on the real Redis at 127.0.0.1:6379.

Every session uses its own key prefix (job store and broker), removed at the end, so that
parallel sessions and the local stack's databases are never touched. Tests that need S3 use
the session ``stack`` (tests/conftest.py) for its SeaweedFS server only; their jobs go to this
session's broker prefix, which no worker consumes, so they stay queued.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from app.main import create_app
from mudsc_jobs.settings import Settings
from mudsc_jobs.store import JobStore

REDIS_URL = "redis://127.0.0.1:6379/0"
KEYS = {"acme": "key-acme-" + "x" * 20, "rival": "key-rival-" + "y" * 20}


def api_keys(prefixes: dict[str, list[str]] | None = None) -> str:
    prefixes = prefixes or {}
    return json.dumps(
        [
            {
                "tenant": tenant,
                "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                "allowed_prefixes": prefixes.get(tenant, [f"s3://models/{tenant}/", f"s3://data/{tenant}/"]),
            }
            for tenant, key in KEYS.items()
        ]
    )


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Settings read the process environment: set ``env`` (and only it) for the block."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("MUDSC_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(env)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("MUDSC_")]:
            del os.environ[key]
        os.environ.update(saved)


def make_settings(prefix: str, **overrides: str) -> Settings:
    env = {
        "MUDSC_REDIS__URL": REDIS_URL,
        "MUDSC_REDIS__KEY_PREFIX": prefix,
        "MUDSC_CELERY__KEY_PREFIX": prefix + "broker:",
        "MUDSC_S3__ENDPOINT_URL": "http://127.0.0.1:9",  # discard port: tests without S3 never reach it
        "MUDSC_S3__PUBLIC_ENDPOINT_URL": "http://s3.public.example:8333",
        "MUDSC_S3__ACCESS_KEY_ID": "test-access",
        "MUDSC_S3__SECRET_ACCESS_KEY": "test-secret",
        "MUDSC_S3__PRESIGN_TTL_S": "120",
        "MUDSC_AUTH__API_KEYS": api_keys(),
        "MUDSC_JOB_TTL_S": "3600",
        # accepted jobs stay queued here (no worker): a session's tests would otherwise hit the tenant limit
        "MUDSC_LIMITS__MAX_CONCURRENT_JOBS_PER_TENANT": "100000",
        **overrides,
    }
    with environment(env):
        return Settings()


def auth(tenant: str = "acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="session")
def redis_prefix() -> Iterator[str]:
    prefix = f"mudsc-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="session")
def settings(redis_prefix: str) -> Settings:
    return make_settings(redis_prefix)


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def store(settings: Settings) -> JobStore:
    return JobStore.from_url(settings.redis.url, prefix=settings.redis.key_prefix, job_ttl_s=settings.job_ttl_s)


def mlp_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "method": {"name": "mudsc", "params": {"mode": "zip", "beta": 0.5}},
        "models": [{"uri": "s3://models/acme/a.safetensors"}, {"uri": "s3://models/acme/b.safetensors"}],
        "architecture": {"name": "mlp", "config": {"input_dim": 8, "hidden": [4], "num_classes": 3}},
        "labels": {"team": "vision"},
    }
    spec.update(overrides)
    return spec


def seed_job(
    store: JobStore, tenant: str = "acme", labels: dict[str, str] | None = None, spec: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A queued job written straight to the store (tests that need no S3 check)."""
    job, _ = store.create(tenant=tenant, spec=spec or mlp_spec(), labels=labels or {}, max_active=1000)
    return job
