"""Synchronous submission checks of a job spec against the tenant's rights and S3.

Every referenced object must exist, be readable, fit the size limit and be safetensors by
its header; a model folder (URI ending in '/') must hold safetensors shards (all those its
``model.safetensors.index.json`` names). A model's LoRA adapter folder must hold a valid PEFT LoRA
config and weights that fit the model's tensors (rules: ``mudsc_core.formats.peft_adapter``).
Failures raise :class:`ApiProblem` naming the URI.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from app.auth import Tenant
from app.problems import ApiProblem
from mudsc_core.errors import ArchitectureMismatch, MergeError
from mudsc_core.formats import hf_config, hf_folder, peft_adapter
from mudsc_core.formats.safetensors import (
    FLOAT_DTYPES,
    InvalidSafetensors,
    TensorInfo,
    header_length,
    is_bookkeeping,
    parse_header,
)
from mudsc_core.schema import JobSpec
from mudsc_core.schema.architectures import TransformersConfig
from mudsc_jobs.settings import Settings
from mudsc_jobs.storage import STORAGE_ERRORS, StorageUnavailable, read_failure, split_uri

logger = logging.getLogger(__name__)

_INTEGER_DTYPES = frozenset({"I64", "I32", "I16", "I8", "U8", "BOOL"})


def _unprocessable(uri: str, detail: str, code: str, loc: list[Any]) -> ApiProblem:
    return ApiProblem(422, f"{uri}: {detail}", code=code, errors=[{"loc": loc, "msg": f"{uri}: {detail}"}], uri=uri)


def _problem(uri: str, error: MergeError, loc: list[Any]) -> ApiProblem:
    """A storage or format error of an input -> its answer: 503 when storage is down, else 422 with its code."""
    if isinstance(error, StorageUnavailable):
        logger.warning("S3 unavailable while checking %s: %s", uri, error.message)
        return ApiProblem(503, "object storage is unavailable; try again", code="storage_unavailable")
    detail = error.message[len(uri) + 2 :] if error.message.startswith(f"{uri}: ") else error.message
    return _unprocessable(uri, detail, error.code, loc)


def referenced(spec: JobSpec) -> list[tuple[str, list[Any]]]:
    """Every input URI with its location in the request body."""
    refs: list[tuple[str, list[Any]]] = [(m.uri, ["body", "models", i, "uri"]) for i, m in enumerate(spec.models)]
    refs += [(m.lora.uri, ["body", "models", i, "lora", "uri"]) for i, m in enumerate(spec.models) if m.lora]
    if spec.base_model is not None:
        refs.append((spec.base_model.uri, ["body", "base_model", "uri"]))
    if spec.calibration is not None:
        refs.append((spec.calibration.uri, ["body", "calibration", "uri"]))
    return refs


def check_limits(spec: JobSpec, settings: Settings) -> None:
    limits = settings.limits
    if len(spec.models) > limits.max_models:
        raise ApiProblem(
            422,
            f"{len(spec.models)} models exceed the limit of {limits.max_models}",
            code="limit_exceeded",
            errors=[{"loc": ["body", "models"], "msg": f"at most {limits.max_models} models"}],
        )
    if spec.calibration is not None and spec.calibration.max_samples > limits.max_calibration_samples:
        raise ApiProblem(
            422,
            f"calibration.max_samples {spec.calibration.max_samples} exceeds the limit of "
            f"{limits.max_calibration_samples}",
            code="limit_exceeded",
            errors=[
                {"loc": ["body", "calibration", "max_samples"], "msg": f"at most {limits.max_calibration_samples}"}
            ],
        )


_JOB_DIR = re.compile(r"^mrg_[0-9A-Za-z]{26}/")


def check_access(spec: JobSpec, tenant: Tenant, output_uri: str, results_bucket: str | None = None) -> None:
    """403 naming the first URI outside the tenant's prefixes (inputs and the output).

    An explicit output URI may not point into the results bucket outside the tenant's own results prefix
    (another tenant's results), even where an allowed prefix covers the whole bucket, nor into a job's default
    output folder (``<results>/<tenant>/mrg_.../``: another job's results).
    """
    for uri, loc in [*referenced(spec), (output_uri, ["body", "output", "uri"])]:
        if not tenant.may_access(uri):
            raise ApiProblem(
                403,
                f"{uri} is outside the prefixes tenant {tenant.name!r} may access",
                code="forbidden_uri",
                errors=[{"loc": loc, "msg": f"{uri}: not permitted"}],
                uri=uri,
            )
    explicit = spec.output.uri
    if explicit is None or results_bucket is None:
        return
    loc = ["body", "output", "uri"]
    if explicit.startswith(f"s3://{results_bucket}/") and not explicit.startswith(tenant.results_prefix):
        raise ApiProblem(
            403,
            f"{explicit} is in another tenant's results",
            code="forbidden_uri",
            errors=[{"loc": loc, "msg": f"{explicit}: not permitted"}],
            uri=explicit,
        )
    if explicit.startswith(tenant.results_prefix) and _JOB_DIR.match(explicit[len(tenant.results_prefix) :]):
        raise ApiProblem(
            422,
            f"{explicit} is reserved for a job's default output",
            code="output_conflict",
            errors=[{"loc": loc, "msg": "reserved for job outputs"}],
            uri=explicit,
        )


class ObjectChecker:
    """Reads object metadata and safetensors headers with HEAD and ranged GETs (never whole objects)."""

    def __init__(self, client: Any, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    def _call(self, uri: str, loc: list[Any], fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except STORAGE_ERRORS as exc:
            raise _problem(uri, read_failure(uri, exc), loc) from None

    def head(self, uri: str, loc: list[Any]) -> int:
        bucket, key = split_uri(uri)
        response = self._call(uri, loc, self.client.head_object, Bucket=bucket, Key=key)
        return int(response["ContentLength"])

    def _range(self, uri: str, loc: list[Any], start: int, end: int) -> bytes:
        bucket, key = split_uri(uri)
        response = self._call(uri, loc, self.client.get_object, Bucket=bucket, Key=key, Range=f"bytes={start}-{end}")
        return response["Body"].read(end - start + 1)

    def safetensors_header(self, uri: str, loc: list[Any], size: int) -> dict[str, TensorInfo]:
        try:
            if size < 8:
                raise InvalidSafetensors(f"{size} bytes is too short for a safetensors file")
            length = header_length(
                self._range(uri, loc, 0, 7), object_size=size, max_header_bytes=self.settings.limits.max_header_bytes
            )
            header = self._range(uri, loc, 8, 8 + length - 1)
            if len(header) != length:
                raise InvalidSafetensors("object is shorter than its header length")
            return parse_header(header, object_size=size)
        except InvalidSafetensors as exc:
            raise _unprocessable(uri, f"not a valid safetensors file: {exc}", "invalid_checkpoint", loc) from None

    def check_file(self, uri: str, loc: list[Any]) -> tuple[int, dict[str, TensorInfo]]:
        size = self.head(uri, loc)
        self._check_size(uri, loc, size)
        tensors = self.safetensors_header(uri, loc, size)
        self._check_weight_dtypes(uri, loc, tensors)
        return size, tensors

    @staticmethod
    def _check_weight_dtypes(uri: str, loc: list[Any], tensors: dict[str, TensorInfo]) -> None:
        for name, info in tensors.items():
            if info.dtype not in FLOAT_DTYPES and not is_bookkeeping(name):
                raise _unprocessable(
                    uri,
                    f"tensor {name!r} has dtype {info.dtype}; merging needs floating-point "
                    f"weights ({', '.join(sorted(FLOAT_DTYPES))})",
                    "invalid_checkpoint",
                    loc,
                )

    def _check_size(self, uri: str, loc: list[Any], size: int) -> None:
        limit = self.settings.limits.max_checkpoint_bytes
        if size > limit:
            raise _unprocessable(
                uri, f"{size} bytes exceed the checkpoint limit of {limit} bytes", "limit_exceeded", loc
            )

    def check_folder(self, uri: str, loc: list[Any]) -> int:
        """A model folder's weight files exist, fit the limit and are float safetensors (rules: ``hf_folder``)."""
        return self._folder(uri, loc)[0]

    def _list(self, uri: str, loc: list[Any]) -> dict[str, int]:
        """The objects directly under a folder URI with their sizes (422 when there are none or too many)."""
        bucket, prefix = split_uri(uri)
        objects: dict[str, int] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                for obj in page.get("Contents", []):
                    objects[obj["Key"][len(prefix) :]] = int(obj["Size"])
                if len(objects) > hf_folder.MAX_FOLDER_OBJECTS:
                    raise _unprocessable(
                        uri,
                        f"model folder holds more than {hf_folder.MAX_FOLDER_OBJECTS} objects",
                        "invalid_checkpoint",
                        loc,
                    )
        except STORAGE_ERRORS as exc:
            raise _problem(uri, read_failure(uri, exc), loc) from None
        if not objects:
            raise _unprocessable(uri, "model folder not found (no objects under this prefix)", "object_not_found", loc)
        return objects

    def _folder(self, uri: str, loc: list[Any]) -> tuple[int, dict[str, TensorInfo]]:
        """``check_folder``'s checks; the total weight bytes and every tensor's header entry."""
        objects = self._list(uri, loc)
        try:
            weight_map = None
            if hf_folder.INDEX_NAME in objects:
                size = objects[hf_folder.INDEX_NAME]
                if size > hf_folder.MAX_INDEX_BYTES:
                    raise _unprocessable(
                        uri + hf_folder.INDEX_NAME, "index file is too large", "invalid_checkpoint", loc
                    )
                weight_map = hf_folder.parse_index(self._range(uri + hf_folder.INDEX_NAME, loc, 0, max(size - 1, 0)))
            shards = hf_folder.weight_files(objects, weight_map)
        except MergeError as exc:
            raise _problem(uri, exc, loc) from None
        total = sum(objects[s] for s in shards)
        self._check_size(uri, loc, total)
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            header = self.safetensors_header(uri + shard, loc, objects[shard])
            self._check_weight_dtypes(uri + shard, loc, header)
            tensors.update(
                header if weight_map is None else {n: t for n, t in header.items() if weight_map.get(n) == shard}
            )
        return total, tensors

    def check_adapter(self, uri: str, loc: list[Any], base: dict[str, TensorInfo]) -> None:
        """A PEFT LoRA adapter folder: its config and weights, checked against its base's tensors."""
        objects = self._list(uri, loc)
        try:
            peft_adapter.files_to_fetch(objects)
            config_uri = uri + peft_adapter.CONFIG_NAME
            size = objects[peft_adapter.CONFIG_NAME]
            config = peft_adapter.parse_config(self._range(config_uri, loc, 0, max(size - 1, 0)) if size else b"")
            weights_uri = uri + peft_adapter.WEIGHTS_NAME
            self._check_size(weights_uri, loc, objects[peft_adapter.WEIGHTS_NAME])
            header = self.safetensors_header(weights_uri, loc, objects[peft_adapter.WEIGHTS_NAME])
            peft_adapter.pair_tensors(
                {n: (t.dtype, t.shape) for n, t in header.items()},
                {n: t.shape for n, t in base.items()},
                config,
            )
        except MergeError as exc:
            raise _problem(uri, exc, loc) from None

    def check_model_configs(self, spec: JobSpec) -> None:
        """architecture transformers without a config: every folder's config.json is a transformers config (by
        its JSON: the worker builds the model) and all describe the first one's network."""
        configs, labels = [], []
        for index, model in enumerate(spec.models):
            loc = ["body", "models", index, "uri"]
            objects = self._list(model.uri, loc)
            uri = model.uri + hf_folder.CONFIG_NAME
            if hf_folder.CONFIG_NAME not in objects:
                raise _unprocessable(
                    model.uri,
                    f"has no {hf_folder.CONFIG_NAME}, which architecture transformers reads",
                    "architecture_mismatch",
                    loc,
                )
            size = objects[hf_folder.CONFIG_NAME]
            try:
                if size > hf_folder.MAX_SIDECAR_BYTES:
                    raise ArchitectureMismatch(f"{hf_folder.CONFIG_NAME} is {size} bytes, too large")
                config = hf_config.parse_config(self._range(uri, loc, 0, max(size - 1, 0)) if size else b"", uri)
                TransformersConfig.model_validate(config)
            except ValueError as exc:  # pydantic's ValidationError: no model_type / architectures
                detail = "; ".join(e["msg"] for e in getattr(exc, "errors", lambda: [])()) or str(exc)
                raise _unprocessable(
                    uri, f"not a transformers config: {detail}", "architecture_mismatch", loc
                ) from None
            except MergeError as exc:
                raise _problem(uri, exc, loc) from None
            configs.append(config)
            labels.append(f"models[{index}] {model.uri}")
        try:
            hf_config.agree(configs, labels)
        except MergeError as exc:
            raise ApiProblem(
                422, exc.message, code=exc.code, errors=[{"loc": ["body", "models"], "msg": exc.message}]
            ) from None

    def check_keyword_calibration(self, spec: JobSpec) -> None:
        """A transformers job's calibration file: its tensors are forward keywords (integer token ids allowed),
        every one with the same number of samples; ``calibration.tensor``, when given, must be one of them."""
        assert spec.calibration is not None
        calibration = spec.calibration
        loc = ["body", "calibration", "uri"]
        size = self.head(calibration.uri, loc)
        tensors = self.safetensors_header(calibration.uri, loc, size)
        if not tensors:
            raise _unprocessable(calibration.uri, "holds no tensors", "invalid_calibration", loc)
        if "tensor" in calibration.model_fields_set and calibration.tensor not in tensors:
            raise _unprocessable(
                calibration.uri,
                f"holds no tensor {calibration.tensor!r} (has: {', '.join(sorted(tensors)[:10])})",
                "invalid_calibration",
                ["body", "calibration", "tensor"],
            )
        counts = {}
        for name, info in sorted(tensors.items()):
            if info.dtype not in FLOAT_DTYPES | _INTEGER_DTYPES:
                raise _unprocessable(
                    calibration.uri,
                    f"tensor {name!r} has dtype {info.dtype}; forward inputs are floating point or integer",
                    "invalid_calibration",
                    loc,
                )
            if len(info.shape) < 1 or info.shape[0] < 1:
                raise _unprocessable(
                    calibration.uri,
                    f"tensor {name!r} has no samples (shape {list(info.shape)})",
                    "invalid_calibration",
                    loc,
                )
            counts[name] = info.shape[0]
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{name} {count}" for name, count in counts.items())
            raise _unprocessable(
                calibration.uri, f"tensors have different sample counts ({detail})", "invalid_calibration", loc
            )

    def check_output_empty(self, output_uri: str) -> None:
        """An explicit output prefix that already holds objects (another job's results, say) is refused."""
        bucket, prefix = split_uri(output_uri)
        listing = self._call(
            output_uri, ["body", "output", "uri"], self.client.list_objects_v2, Bucket=bucket, Prefix=prefix, MaxKeys=1
        )
        if listing.get("KeyCount", len(listing.get("Contents", []))):
            raise ApiProblem(
                409,
                f"{output_uri} already holds objects; choose an empty output prefix",
                code="output_conflict",
                uri=output_uri,
                errors=[{"loc": ["body", "output", "uri"], "msg": "output prefix is not empty"}],
            )

    def check(self, spec: JobSpec) -> None:
        for model_index, model in enumerate([*spec.models, *([spec.base_model] if spec.base_model else [])]):
            loc = (
                ["body", "models", model_index, "uri"]
                if model_index < len(spec.models)
                else ["body", "base_model", "uri"]
            )
            if model.uri.endswith("/"):
                _, tensors = self._folder(model.uri, loc)
            else:
                _, tensors = self.check_file(model.uri, loc)
            if model.lora is not None:
                self.check_adapter(model.lora.uri, ["body", "models", model_index, "lora", "uri"], tensors)
        transformers = spec.architecture is not None and spec.architecture.name == "transformers"
        if transformers and spec.architecture is not None and spec.architecture.reads_config_from_models:
            self.check_model_configs(spec)
        if spec.calibration is not None and transformers:
            self.check_keyword_calibration(spec)
        elif spec.calibration is not None:
            loc = ["body", "calibration", "uri"]
            size = self.head(spec.calibration.uri, loc)
            tensors = self.safetensors_header(spec.calibration.uri, loc, size)
            info = tensors.get(spec.calibration.tensor)
            if info is None:
                raise _unprocessable(
                    spec.calibration.uri,
                    f"holds no tensor {spec.calibration.tensor!r} (has: {', '.join(sorted(tensors)[:10])})",
                    "invalid_calibration",
                    ["body", "calibration", "tensor"],
                )
            if info.dtype not in FLOAT_DTYPES:
                raise _unprocessable(
                    spec.calibration.uri,
                    f"tensor {spec.calibration.tensor!r} has dtype "
                    f"{info.dtype}; calibration inputs must be floating point",
                    "invalid_calibration",
                    ["body", "calibration", "tensor"],
                )
            if len(info.shape) < 1 or info.shape[0] < 1:
                raise _unprocessable(
                    spec.calibration.uri,
                    f"tensor {spec.calibration.tensor!r} has no samples (shape {list(info.shape)})",
                    "invalid_calibration",
                    ["body", "calibration", "tensor"],
                )
