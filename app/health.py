"""Readiness: the job store, the broker and object storage must each answer quickly."""

from __future__ import annotations

import logging
from typing import Any

import redis
from kombu import Connection

from app.service import Services

logger = logging.getLogger(__name__)
TIMEOUT_S = 2.0


def _check_redis(services: Services) -> str:
    try:
        services.store.ping()
        return "ok"
    except redis.RedisError as exc:
        return f"unavailable ({type(exc).__name__})"


def _check_broker(services: Services) -> str:
    url = services.settings.broker_url
    try:
        if url.startswith(("redis://", "rediss://", "unix://")):
            client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
            try:
                client.ping()
            finally:
                client.close()
        else:
            with Connection(url, connect_timeout=TIMEOUT_S) as conn:
                conn.ensure_connection(max_retries=1, timeout=TIMEOUT_S)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any transport error means "not ready"
        return f"unavailable ({type(exc).__name__})"


def _check_s3(services: Services, client: Any) -> str:
    try:
        client.head_bucket(Bucket=services.settings.s3.results_bucket)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - botocore raises ClientError, EndpointConnectionError, timeouts...
        return f"unavailable ({type(exc).__name__})"


def readiness(services: Services, s3_client: Any) -> dict[str, str]:
    return {"redis": _check_redis(services), "broker": _check_broker(services), "s3": _check_s3(services, s3_client)}
