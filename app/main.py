"""The API application factory: ``uvicorn app.main:create_app --factory``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI

from app import problems
from app.auth import KeyRing
from app.limits import BodySizeLimit
from app.metrics import MetricsMiddleware, recorded_metrics
from app.reads import JobReader, JobReads
from app.reconcile import Reconciler
from app.routes import health, v1
from app.service import Services
from mudsc_jobs.dispatch import make_sender
from mudsc_jobs.settings import Settings
from mudsc_jobs.storage import make_client
from mudsc_jobs.store import EventTail, JobStore

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, fast_reads: bool = True) -> FastAPI:
    """``fast_reads``: answer ``GET /v1/merges/{id}`` through :mod:`app.reads` (off: the route alone, as the
    tests compare)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reconciler = None
        if settings.reconcile.interval_s > 0:
            services = app.state.services
            reconciler = Reconciler(services.store, services.sender, settings)
            reconciler.start()
        yield
        if reconciler is not None:
            reconciler.stop()
        await app.state.job_reader.aclose()
        await app.state.async_redis.aclose()
        app.state.services.store.close()

    app = FastAPI(
        title="mudsc merge service",
        version="1.0.0",
        description="Merge neural-network checkpoints stored in S3: submit a job, follow its events, "
        "download the merged safetensors.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.keyring = KeyRing(settings.auth.api_keys, settings.s3.results_bucket)
    app.state.services = Services(
        settings=settings,
        store=JobStore.from_settings(settings),
        s3=make_client(settings.s3),
        s3_public=make_client(settings.s3, public=True),
        sender=make_sender(settings),
    )
    app.state.recorded_metrics = recorded_metrics(app.state.services.store)
    app.state.readiness_s3 = make_client(settings.s3, max_attempts=1, timeout_s=2.0)
    # XREAD blocks up to 2 s server-side; the socket timeout must exceed it.
    app.state.async_redis = aioredis.Redis.from_url(
        settings.redis.url, decode_responses=True, socket_timeout=15, socket_connect_timeout=5
    )
    app.state.event_tail = EventTail(app.state.async_redis, settings.redis.key_prefix)
    problems.install(app)
    app.include_router(v1)
    app.include_router(health)
    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_request_bytes)
    app.state.job_reader = JobReader(app)
    if fast_reads:
        app.add_middleware(JobReads, reader=app.state.job_reader)  # inside the metrics: they count its answers
    app.add_middleware(MetricsMiddleware)
    if not settings.auth.api_keys:
        logger.warning("no API keys configured (MUDSC_AUTH__API_KEYS): every /v1 request will answer 401")
    return app
