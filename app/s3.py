"""boto3 clients built from Settings (used by the API and the worker).

Two clients: one for the endpoint the service talks to, and one for the public endpoint
clients reach, used only to presign (a SigV4 signature covers the host, so a URL signed
for the internal endpoint would not verify when fetched through the public one).
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

from app.settings import S3Settings
from mudsc_core.schema import parse_s3_uri


def _config(settings: S3Settings, *, max_attempts: int = 5, timeout_s: float | None = None) -> Config:
    return Config(
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=timeout_s or settings.connect_timeout_s,
        read_timeout=timeout_s or settings.read_timeout_s,
    )


_session: boto3.session.Session | None = None


def _boto_session() -> boto3.session.Session:
    # One session per process: it caches the loaded service model, which makes each further client cheap.
    global _session
    if _session is None:
        _session = boto3.session.Session()
    return _session


def make_client(settings: S3Settings, *, public: bool = False, max_attempts: int | None = None,
                timeout_s: float | None = None) -> Any:
    endpoint = (settings.public_endpoint_url or settings.endpoint_url) if public else settings.endpoint_url
    return _boto_session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        region_name=settings.region,
        config=_config(settings, max_attempts=max_attempts or settings.max_attempts, timeout_s=timeout_s),
    )


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); a prefix URI keeps its trailing '/'."""
    bucket, key = parse_s3_uri(uri)
    return bucket, key


def error_code(exc: Exception) -> str:
    """The S3 error code of a botocore ClientError ('404', 'NoSuchKey', 'AccessDenied', ...)."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def is_not_found(exc: Exception) -> bool:
    return error_code(exc) in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


def is_forbidden(exc: Exception) -> bool:
    return error_code(exc) in ("403", "AccessDenied", "Forbidden")
