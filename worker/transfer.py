"""S3 transfers of the worker: inputs down to a scratch dir, outputs up with a staged promote.

boto3's managed transfers do the work (multipart above ``multipart_threshold_bytes``, ranged
parallel downloads); outputs are uploaded under a temporary prefix and copied to their final
keys only once every file is up, so a reader never sees a half-written result.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

from mudsc_core.errors import InvalidCheckpoint, ObjectNotFound
from mudsc_core.formats import hf_folder
from mudsc_jobs.settings import Settings
from mudsc_jobs.storage import STORAGE_ERRORS, read_failure, split_uri, write_failure

logger = logging.getLogger(__name__)

ProgressBytes = Callable[[int], None]


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

    def check_size(self, uri: str, objects: list[RemoteObject]) -> None:
        total = sum(o.size for o in objects if o.key.endswith(".safetensors"))
        if total > self.settings.limits.max_checkpoint_bytes:
            raise InvalidCheckpoint(
                f"{uri}: {total} bytes exceed the checkpoint limit of {self.settings.limits.max_checkpoint_bytes}",
                stage="downloading",
            )

    def download(self, objects: list[RemoteObject], on_bytes: ProgressBytes) -> None:
        lock = threading.Lock()

        def callback(n: int) -> None:  # boto3 calls this from its transfer threads
            with lock:
                on_bytes(n)

        for obj in objects:
            obj.local.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.client.download_file(obj.bucket, obj.key, str(obj.local), Config=self.config, Callback=callback)
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
                self.client.upload_file(str(path), bucket, temp_key, Config=self.config, Callback=on_bytes)
                staged.append((name, temp_key, path))
            if before_promote is not None:
                before_promote()
            for name, temp_key, _ in staged:
                final_key = prefix + name
                promoted.append(final_key)
                self.client.copy({"Bucket": bucket, "Key": temp_key}, bucket, final_key, Config=self.config)
            done = True
            return promoted
        except STORAGE_ERRORS as exc:
            raise write_failure(output_uri, exc) from None
        finally:
            self.delete_keys(bucket, [key for _, key, _ in staged] + ([] if done else promoted))

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
