"""S3 transfers of the worker: inputs down to a scratch dir, outputs up with a staged promote.

boto3's managed transfers do the work (multipart above ``multipart_threshold_bytes``, ranged
parallel downloads); outputs are uploaded under a temporary prefix and copied to their final
keys only once every file is up, so a reader never sees a half-written result.

botocore retries each request (``MUDSC_S3__MAX_ATTEMPTS``, standard mode: about 7 s of backoff in all at the
default of 5); an S3 server that restarts takes longer than that to answer again, and one part of a
multipart transfer failing fails the whole transfer. So a transfer that fails on a transient error (no
connection, a broken one, a 5xx) is started again from scratch, with backoff, until
``MUDSC_S3__TRANSFER_RETRY_S`` after its first failure; only then does the job fail ``storage_unavailable``.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as NoConnection
from s3transfer.exceptions import RetriesExceededError as StreamRetriesExceeded

from mudsc_core.errors import InvalidCheckpoint, ObjectNotFound
from mudsc_core.formats import hf_folder, peft_adapter
from mudsc_jobs.settings import Settings
from mudsc_jobs.storage import (
    STORAGE_ERRORS,
    StorageUnavailable,
    error_code,
    read_failure,
    split_uri,
    write_failure,
)

logger = logging.getLogger(__name__)

ProgressBytes = Callable[[int], None]
T = TypeVar("T")

# Besides botocore's errors a managed transfer raises boto3's wrappers: a part's ClientError of an upload
# (S3UploadFailedError), a download whose body reads kept breaking (RetriesExceededError).
TRANSFER_ERRORS = (*STORAGE_ERRORS, S3UploadFailedError, RetriesExceededError, StreamRetriesExceeded)
RETRY_BACKOFF_CAP_S = 5.0


def is_transient(exc: BaseException | None) -> bool:
    """No connection, a broken one, or a 5xx answer: an error that a later try may not meet."""
    for _ in range(4):  # the error itself, then what it wraps (S3UploadFailedError wraps a ClientError)
        if exc is None:
            return False
        if isinstance(exc, NoConnection | HTTPClientError | RetriesExceededError | StreamRetriesExceeded):
            return True
        if isinstance(exc, ClientError):
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return status >= 500 or error_code(exc) in ("SlowDown", "RequestTimeout", "ServiceUnavailable")
        exc = exc.__cause__ or exc.__context__
    return False


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def transfer_config(settings: Settings) -> TransferConfig:
    return TransferConfig(
        multipart_threshold=settings.s3.multipart_threshold_bytes,
        multipart_chunksize=settings.s3.multipart_threshold_bytes,
        max_concurrency=4,
    )


@dataclass(frozen=True)
class RemoteObject:
    uri: str
    bucket: str
    key: str
    size: int
    local: Path


class Transfers:
    def __init__(self, client: Any, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.config = transfer_config(settings)

    # ------------------------------------------------------------------ inputs
    def plan_file(self, uri: str, local: Path) -> list[RemoteObject]:
        bucket, key = split_uri(uri)
        try:
            size = int(self.client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except STORAGE_ERRORS as exc:
            raise read_failure(uri, exc, stage="downloading") from None
        return [RemoteObject(uri, bucket, key, size, local)]

    def plan_folder(self, uri: str, local: Path) -> list[RemoteObject]:
        """The weight files, index and sidecars of a model folder (rules: :mod:`mudsc_core.formats.hf_folder`)."""
        bucket, prefix = split_uri(uri)
        sizes: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/"
            ):
                for obj in page.get("Contents", []):
                    sizes[obj["Key"][len(prefix) :]] = int(obj["Size"])
            weight_map = None
            if hf_folder.INDEX_NAME in sizes:
                if sizes[hf_folder.INDEX_NAME] > hf_folder.MAX_INDEX_BYTES:
                    raise InvalidCheckpoint(
                        f"{uri}{hf_folder.INDEX_NAME}: index file is too large", stage="downloading"
                    )
                body = self.client.get_object(Bucket=bucket, Key=prefix + hf_folder.INDEX_NAME)["Body"].read()
                weight_map = hf_folder.parse_index(body)
            names = hf_folder.files_to_fetch(sizes, weight_map)
        except STORAGE_ERRORS as exc:
            raise read_failure(uri, exc, stage="downloading") from None
        except (InvalidCheckpoint, ObjectNotFound) as exc:
            raise type(exc)(f"{uri}: {exc.message}", stage="downloading") from None
        return [RemoteObject(uri + name, bucket, prefix + name, sizes[name], local / name) for name in names]

    def plan_adapter_folder(self, uri: str, local: Path) -> list[RemoteObject]:
        """A PEFT LoRA adapter folder's config and weights (rules: :mod:`mudsc_core.formats.peft_adapter`)."""
        bucket, prefix = split_uri(uri)
        sizes: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/"
            ):
                for obj in page.get("Contents", []):
                    sizes[obj["Key"][len(prefix) :]] = int(obj["Size"])
            names = peft_adapter.files_to_fetch(sizes)
        except STORAGE_ERRORS as exc:
            raise read_failure(uri, exc, stage="downloading") from None
        except (InvalidCheckpoint, ObjectNotFound) as exc:
            raise type(exc)(f"{uri}: {exc.message}", stage="downloading") from None
        return [RemoteObject(uri + name, bucket, prefix + name, sizes[name], local / name) for name in names]

    def check_size(self, uri: str, objects: list[RemoteObject]) -> None:
        total = sum(o.size for o in objects if o.key.endswith(".safetensors"))
        if total > self.settings.limits.max_checkpoint_bytes:
            raise InvalidCheckpoint(
                f"{uri}: {total} bytes exceed the checkpoint limit of {self.settings.limits.max_checkpoint_bytes}",
                stage="downloading",
            )

    def again(self, what: str, transfer: Callable[[], T]) -> T:
        """``transfer()``, started again from scratch with backoff while it fails on a transient error, until
        ``MUDSC_S3__TRANSFER_RETRY_S`` after its first failure is spent; then its last error is raised."""
        budget = self.settings.s3.transfer_retry_s
        first_failure: float | None = None
        tries = 1
        while True:
            try:
                return transfer()
            except TRANSFER_ERRORS as exc:
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                delay = min(RETRY_BACKOFF_CAP_S, 0.5 * 2 ** (tries - 1)) * random.uniform(0.5, 1.0)
                if not is_transient(exc) or now + delay - first_failure > budget:
                    raise
                logger.warning(
                    "%s failed (%s); try %d in %.1f s (%.1f s after the first failure)",
                    what,
                    _describe(exc),
                    tries + 1,
                    delay,
                    now - first_failure,
                )
                time.sleep(delay)
                tries += 1

    def download(self, objects: list[RemoteObject], on_bytes: ProgressBytes) -> None:
        lock = threading.Lock()

        for obj in objects:
            obj.local.parent.mkdir(parents=True, exist_ok=True)

            def attempt(obj: RemoteObject = obj) -> None:
                moved = [0]

                def callback(n: int) -> None:  # boto3 calls this from its transfer threads
                    with lock:
                        moved[0] += n
                        on_bytes(n)

                try:
                    self.client.download_file(
                        obj.bucket, obj.key, str(obj.local), Config=self.config, Callback=callback
                    )
                except BaseException:
                    with lock:  # a next try moves these bytes again: progress must not count them twice
                        if moved[0]:
                            on_bytes(-moved[0])
                    raise

            try:
                self.again(f"download of {obj.uri}", attempt)
            except (RetriesExceededError, StreamRetriesExceeded):
                raise StorageUnavailable(
                    f"object storage unreachable for {obj.uri}: the download kept breaking off", stage="downloading"
                ) from None
            except STORAGE_ERRORS as exc:
                raise read_failure(obj.uri, exc, stage="downloading") from None

    # ------------------------------------------------------------------ outputs
    def upload_staged(
        self,
        out_dir: Path,
        output_uri: str,
        staging: str,
        on_bytes: ProgressBytes,
        before_promote: Callable[[], None] | None = None,
    ) -> list[str]:
        """Upload every file of ``out_dir`` under ``staging`` (a sub-prefix), then promote to ``output_uri``.

        ``before_promote`` runs once everything is staged and may raise (cancellation, a lost lease): nothing
        is promoted then. Whatever goes wrong, the staged copies are deleted, and so are final keys promoted
        before a failure, so a failed or canceled job never leaves a partial result behind. Returns the
        final keys.
        """
        bucket, prefix = split_uri(output_uri)
        files = sorted(p for p in out_dir.rglob("*") if p.is_file())
        staged: list[tuple[str, str, Path]] = []
        promoted: list[str] = []
        done = False
        try:
            for path in files:
                name = path.relative_to(out_dir).as_posix()
                temp_key = f"{prefix}{staging}/{name}"
                # Listed before it is written: an upload that completed although its answer was lost is deleted too.
                staged.append((name, temp_key, path))
                self.again(
                    f"upload of {name}",
                    lambda path=path, temp_key=temp_key: self._upload(path, bucket, temp_key, on_bytes),
                )
            if before_promote is not None:
                before_promote()
            for name, temp_key, _ in staged:
                final_key = prefix + name
                promoted.append(final_key)
                self.again(
                    f"promotion of {name}",
                    lambda temp_key=temp_key, final_key=final_key: self.client.copy(
                        {"Bucket": bucket, "Key": temp_key}, bucket, final_key, Config=self.config
                    ),
                )
            done = True
            return promoted
        except (RetriesExceededError, StreamRetriesExceeded):
            raise StorageUnavailable(f"object storage unreachable while writing {output_uri}") from None
        except TRANSFER_ERRORS as exc:
            raise write_failure(output_uri, exc) from None
        finally:
            self.delete_keys(bucket, [key for _, key, _ in staged] + ([] if done else promoted))

    def _upload(self, path: Path, bucket: str, key: str, on_bytes: ProgressBytes) -> None:
        moved = [0]
        lock = threading.Lock()

        def callback(n: int) -> None:
            with lock:
                moved[0] += n
            on_bytes(n)

        try:
            self.client.upload_file(str(path), bucket, key, Config=self.config, Callback=callback)
        except BaseException:
            if moved[0]:
                on_bytes(-moved[0])  # a next try uploads these bytes again
            raise

    def put_json(self, uri: str, body: bytes) -> dict[str, Any]:
        bucket, key = split_uri(uri)
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")
        except STORAGE_ERRORS as exc:
            raise write_failure(uri, exc) from None
        return {
            "name": key.rsplit("/", 1)[-1],
            "uri": uri,
            "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }

    def delete_keys(self, bucket: str, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            try:
                self.client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
                )
            except STORAGE_ERRORS as exc:  # leftovers under the staging prefix are harmless; say so
                logger.warning("could not delete %d staged objects in %s: %s", len(chunk), bucket, exc)


def describe_outputs(out_dir: Path, output_uri: str) -> list[dict[str, Any]]:
    """The artifact entries (name, final URI, size, sha256) of every file of ``out_dir``, computed locally."""
    bucket, prefix = split_uri(output_uri)
    return [
        {
            "name": (name := path.relative_to(out_dir).as_posix()),
            "uri": f"s3://{bucket}/{prefix}{name}",
            "size": path.stat().st_size,
            "sha256": sha256_file(path),
        }
        for path in sorted(p for p in out_dir.rglob("*") if p.is_file())
    ]


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
