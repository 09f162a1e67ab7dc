"""Object storage: boto3 clients built from Settings, and the one mapping of S3 errors to error codes.

Two clients: one for the endpoint the service talks to, and one for the public endpoint
clients reach, used only to presign (a SigV4 signature covers the host, so a URL signed
for the internal endpoint would not verify when fetched through the public one).
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from mudsc_core.errors import MergeError, ObjectNotFound, ObjectNotReadable
from mudsc_core.schema import parse_s3_uri
from mudsc_jobs.settings import S3Settings


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


def make_client(
    settings: S3Settings, *, public: bool = False, max_attempts: int | None = None, timeout_s: float | None = None
) -> Any:
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


class StorageError(MergeError):
    """S3 answered with an error that boto3's retries did not clear (a missing output bucket, access denied)."""

    code = "storage_error"
    retryable = True


class StorageUnavailable(StorageError):
    """S3 could not be reached at all after boto3's retries with backoff (``MUDSC_S3__MAX_ATTEMPTS``)."""

    code = "storage_unavailable"


def read_failure(uri: str, exc: Exception, *, stage: str | None = None) -> MergeError:
    """The error of a failed read of ``uri`` (an input): the same code in the API's check and in the worker.

    No answer at all -> ``storage_unavailable`` (retryable); 404 -> ``object_not_found``; access denied or
    any other refusal -> ``object_not_readable``.
    """
    if isinstance(exc, BotoCoreError):
        return StorageUnavailable(f"object storage unreachable for {uri}: {type(exc).__name__}", stage=stage)
    if is_not_found(exc):
        return ObjectNotFound(f"{uri}: object not found", stage=stage)
    if is_forbidden(exc):
        return ObjectNotReadable(f"{uri}: object is not readable (access denied)", stage=stage)
    return ObjectNotReadable(f"{uri}: object could not be read ({error_code(exc) or 'error'})", stage=stage)


def write_failure(uri: str, exc: Exception, *, stage: str = "uploading") -> StorageError:
    """The error of a failed write under ``uri`` (an output)."""
    if isinstance(exc, BotoCoreError):
        return StorageUnavailable(f"object storage unreachable while writing {uri}: {type(exc).__name__}", stage=stage)
    return StorageError(f"writing {uri} failed: {error_code(exc) or exc}", stage=stage)


STORAGE_ERRORS = (ClientError, BotoCoreError)
