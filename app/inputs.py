"""Synchronous submission checks of a job spec against the tenant's rights and S3.

Every referenced object must exist, be readable, fit the size limit and be safetensors by
its header; a model folder (URI ending in '/') must hold safetensors shards (all those its
``model.safetensors.index.json`` names). Failures raise :class:`ApiProblem` naming the URI.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from app import s3 as s3util
from app.auth import Tenant
from app.problems import ApiProblem
from app.safetensors_check import InvalidSafetensors, TensorInfo, header_length, parse_header
from app.settings import Settings
from mudsc_core.schema import JobSpec

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
MAX_FOLDER_OBJECTS = 10_000
MAX_INDEX_BYTES = 16 * 1024**2


def _unprocessable(uri: str, detail: str, code: str, loc: list[Any]) -> ApiProblem:
    return ApiProblem(422, f"{uri}: {detail}", code=code, errors=[{"loc": loc, "msg": f"{uri}: {detail}"}], uri=uri)


def referenced(spec: JobSpec) -> list[tuple[str, list[Any]]]:
    """Every input URI with its location in the request body."""
    refs: list[tuple[str, list[Any]]] = [(m.uri, ["body", "models", i, "uri"]) for i, m in enumerate(spec.models)]
    if spec.base_model is not None:
        refs.append((spec.base_model.uri, ["body", "base_model", "uri"]))
    if spec.calibration is not None:
        refs.append((spec.calibration.uri, ["body", "calibration", "uri"]))
    return refs


def check_limits(spec: JobSpec, settings: Settings) -> None:
    limits = settings.limits
    if len(spec.models) > limits.max_models:
        raise ApiProblem(422, f"{len(spec.models)} models exceed the limit of {limits.max_models}",
                         code="limit_exceeded", errors=[{"loc": ["body", "models"],
                                                         "msg": f"at most {limits.max_models} models"}])
    if spec.calibration is not None and spec.calibration.max_samples > limits.max_calibration_samples:
        raise ApiProblem(
            422, f"calibration.max_samples {spec.calibration.max_samples} exceeds the limit of "
            f"{limits.max_calibration_samples}", code="limit_exceeded",
            errors=[{"loc": ["body", "calibration", "max_samples"],
                     "msg": f"at most {limits.max_calibration_samples}"}],
        )


def check_access(spec: JobSpec, tenant: Tenant, output_uri: str) -> None:
    """403 naming the first URI outside the tenant's prefixes (inputs and the output)."""
    for uri, loc in [*referenced(spec), (output_uri, ["body", "output", "uri"])]:
        if not tenant.may_access(uri):
            raise ApiProblem(403, f"{uri} is outside the prefixes tenant {tenant.name!r} may access",
                             code="forbidden_uri", errors=[{"loc": loc, "msg": f"{uri}: not permitted"}], uri=uri)


class ObjectChecker:
    """Reads object metadata and safetensors headers with HEAD and ranged GETs (never whole objects)."""

    def __init__(self, client: Any, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    def _call(self, uri: str, loc: list[Any], fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except ClientError as exc:
            if s3util.is_not_found(exc):
                raise _unprocessable(uri, "object not found", "object_not_found", loc) from None
            if s3util.is_forbidden(exc):
                raise _unprocessable(uri, "object is not readable (access denied)", "object_not_readable",
                                     loc) from None
            raise _unprocessable(uri, f"object could not be read ({s3util.error_code(exc) or 'error'})",
                                 "object_not_readable", loc) from None
        except BotoCoreError as exc:
            logger.warning("S3 unavailable while checking %s: %s", uri, exc)
            raise ApiProblem(503, "object storage is unavailable; try again", code="storage_unavailable") from None

    def head(self, uri: str, loc: list[Any]) -> int:
        bucket, key = s3util.split_uri(uri)
        response = self._call(uri, loc, self.client.head_object, Bucket=bucket, Key=key)
        return int(response["ContentLength"])

    def _range(self, uri: str, loc: list[Any], start: int, end: int) -> bytes:
        bucket, key = s3util.split_uri(uri)
        response = self._call(uri, loc, self.client.get_object, Bucket=bucket, Key=key, Range=f"bytes={start}-{end}")
        return response["Body"].read(end - start + 1)

    def safetensors_header(self, uri: str, loc: list[Any], size: int) -> dict[str, TensorInfo]:
        try:
            if size < 8:
                raise InvalidSafetensors(f"{size} bytes is too short for a safetensors file")
            length = header_length(self._range(uri, loc, 0, 7), object_size=size,
                                   max_header_bytes=self.settings.limits.max_header_bytes)
            header = self._range(uri, loc, 8, 8 + length - 1)
            if len(header) != length:
                raise InvalidSafetensors("object is shorter than its header length")
            return parse_header(header, object_size=size)
        except InvalidSafetensors as exc:
            raise _unprocessable(uri, f"not a valid safetensors file: {exc}", "invalid_checkpoint", loc) from None

    def check_file(self, uri: str, loc: list[Any]) -> tuple[int, dict[str, TensorInfo]]:
        size = self.head(uri, loc)
        self._check_size(uri, loc, size)
        return size, self.safetensors_header(uri, loc, size)

    def _check_size(self, uri: str, loc: list[Any], size: int) -> None:
        limit = self.settings.limits.max_checkpoint_bytes
        if size > limit:
            raise _unprocessable(uri, f"{size} bytes exceed the checkpoint limit of {limit} bytes", "limit_exceeded",
                                 loc)

    def check_folder(self, uri: str, loc: list[Any]) -> int:
        bucket, prefix = s3util.split_uri(uri)
        objects: dict[str, int] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                for obj in page.get("Contents", []):
                    objects[obj["Key"][len(prefix):]] = int(obj["Size"])
                if len(objects) > MAX_FOLDER_OBJECTS:
                    raise _unprocessable(uri, f"model folder holds more than {MAX_FOLDER_OBJECTS} objects",
                                         "invalid_checkpoint", loc)
        except ClientError as exc:
            if s3util.is_not_found(exc):
                raise _unprocessable(uri, "bucket not found", "object_not_found", loc) from None
            raise _unprocessable(uri, "folder could not be listed", "object_not_readable", loc) from None
        except BotoCoreError:
            raise ApiProblem(503, "object storage is unavailable; try again", code="storage_unavailable") from None
        if not objects:
            raise _unprocessable(uri, "model folder not found (no objects under this prefix)", "object_not_found", loc)
        if INDEX_NAME in objects:
            index_uri = uri + INDEX_NAME
            if objects[INDEX_NAME] > MAX_INDEX_BYTES:
                raise _unprocessable(index_uri, "index file is too large", "invalid_checkpoint", loc)
            raw = self._range(index_uri, loc, 0, max(objects[INDEX_NAME] - 1, 0))
            try:
                weight_map = json.loads(raw)["weight_map"]
                shards = sorted(set(weight_map.values()))
                if not shards or not all(isinstance(s, str) for s in shards):
                    raise ValueError("empty weight_map")
            except (ValueError, KeyError, TypeError, AttributeError):
                raise _unprocessable(index_uri, "not a valid safetensors index (needs a weight_map)",
                                     "invalid_checkpoint", loc) from None
            for shard in shards:
                if shard not in objects:
                    raise _unprocessable(uri + shard, "shard named by the index not found", "object_not_found", loc)
        else:
            shards = sorted(name for name in objects if name.endswith(".safetensors"))
            if not shards:
                raise _unprocessable(uri, "model folder holds no .safetensors shards", "invalid_checkpoint", loc)
        total = sum(objects[s] for s in shards)
        self._check_size(uri, loc, total)
        for shard in shards:
            self.safetensors_header(uri + shard, loc, objects[shard])
        return total

    def check(self, spec: JobSpec) -> None:
        for model_index, model in enumerate([*spec.models, *([spec.base_model] if spec.base_model else [])]):
            loc = ["body", "models", model_index, "uri"] if model_index < len(spec.models) else \
                ["body", "base_model", "uri"]
            if model.uri.endswith("/"):
                self.check_folder(model.uri, loc)
            else:
                self.check_file(model.uri, loc)
        if spec.calibration is not None:
            loc = ["body", "calibration", "uri"]
            size = self.head(spec.calibration.uri, loc)
            tensors = self.safetensors_header(spec.calibration.uri, loc, size)
            info = tensors.get(spec.calibration.tensor)
            if info is None:
                raise _unprocessable(spec.calibration.uri, f"holds no tensor {spec.calibration.tensor!r} "
                                     f"(has: {', '.join(sorted(tensors)[:10])})", "invalid_calibration",
                                     ["body", "calibration", "tensor"])
            if len(info.shape) < 1 or info.shape[0] < 1:
                raise _unprocessable(spec.calibration.uri, f"tensor {spec.calibration.tensor!r} has no samples "
                                     f"(shape {list(info.shape)})", "invalid_calibration",
                                     ["body", "calibration", "tensor"])
