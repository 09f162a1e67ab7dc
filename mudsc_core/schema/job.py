"""The job specification: ONE set of pydantic models, validated by the API, re-validated by the worker."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from mudsc_core.schema._base import Frozen
from mudsc_core.schema.architectures import ARCHITECTURE_CONFIGS, TransformersConfig
from mudsc_core.schema.methods import METHODS
from mudsc_core.schema.parameters import ParameterValue, check_model_parameter_values
from mudsc_core.schema.same_base_params import TensorParams

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_SAFE_KEY_CHARS = re.compile(r"^[A-Za-z0-9!\-_.*'()/=+@,:~ ]*$")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); ValueError with a specific message otherwise."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError("must be an s3://bucket/key URI")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise ValueError(f"invalid bucket name {bucket!r}")
    if not key:
        raise ValueError("URI names no object key")
    if len(key) > 1024:
        raise ValueError("object key longer than 1024 characters")
    if not _SAFE_KEY_CHARS.match(key):
        raise ValueError("object key contains characters outside the safe set")
    parts = key.split("/")
    if any(p in (".", "..") for p in parts) or "//" in key or key.startswith("/"):
        raise ValueError("object key must not contain '.', '..' or empty path segments")
    return bucket, key


def _valid_uri(uri: str) -> str:
    parse_s3_uri(uri)
    return uri


S3Uri = Annotated[str, Field(max_length=1100, examples=["s3://models/a.safetensors"]), AfterValidator(_valid_uri)]


def _checkpoint_uri(uri: str) -> str:
    lowered = uri.lower()
    if lowered.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")):
        raise ValueError("pickle-based checkpoints are refused; convert to .safetensors")
    if not (lowered.endswith(".safetensors") or uri.endswith("/")):
        raise ValueError("must name a .safetensors object or a model folder ending in '/'")
    return uri


def _folder_uri(uri: str) -> str:
    if not uri.endswith("/"):
        raise ValueError("must name a PEFT adapter folder ending in '/'")
    return uri


class LoraRef(Frozen):
    uri: Annotated[S3Uri, AfterValidator(_folder_uri)] = Field(
        description="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)"
    )


class ModelRef(Frozen):
    uri: Annotated[S3Uri, AfterValidator(_checkpoint_uri)]
    lora: LoraRef | None = Field(
        None, description="a PEFT LoRA adapter applied to the model at uri (its base): same-base methods only"
    )
    weight: float = Field(1.0, gt=0.0, le=1e6)
    parameters: Annotated[dict[str, ParameterValue], AfterValidator(check_model_parameter_values)] = Field(
        default_factory=dict,
        description="mergekit's models[i].parameters: weight, density, gamma, epsilon, lambda for this model "
        "(each a number, a gradient over the layers or a filter list); they override the method's values "
        "(lambda: the method's scaling_factor, for this model's task vector)",
    )

    @model_validator(mode="after")
    def _one_weight(self) -> ModelRef:
        if "weight" in self.parameters and self.weight != 1.0:
            raise ValueError("give the model's weight once: either weight or parameters.weight")
        return self


class MethodSpec(Frozen):
    name: str = Field(max_length=64, examples=["mudsc"])
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _typed_params(self) -> MethodSpec:
        info = METHODS.get(self.name)
        if info is None:
            raise ValueError(f"unknown method {self.name!r}; known: {', '.join(sorted(METHODS))}")
        typed = info.params.model_validate(self.params)
        # Store normalised (defaults filled) so the job record shows what actually ran.
        object.__setattr__(self, "params", typed.model_dump(mode="json"))
        return self

    def typed_params(self) -> Any:
        return METHODS[self.name].params.model_validate(self.params)


class ArchitectureSpec(Frozen):
    name: str = Field(max_length=64, examples=["resnet"])
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _typed_config(self) -> ArchitectureSpec:
        config_model = ARCHITECTURE_CONFIGS.get(self.name)
        if config_model is None:
            raise ValueError(f"unknown architecture {self.name!r}; known: {', '.join(sorted(ARCHITECTURE_CONFIGS))}")
        typed = config_model.model_validate(self.config)
        # A transformers config keeps exactly the keys it was given (its explicit nulls included).
        unset = isinstance(typed, TransformersConfig)
        object.__setattr__(self, "config", typed.model_dump(mode="json", exclude_unset=unset))
        return self

    @property
    def reads_config_from_models(self) -> bool:
        """``{"name": "transformers"}`` without a config: built from the first model folder's config.json."""
        return self.name == "transformers" and not self.config

    def typed_config(self) -> Any:
        return ARCHITECTURE_CONFIGS[self.name].model_validate(self.config)


class CalibrationSpec(Frozen):
    uri: Annotated[S3Uri, AfterValidator(lambda u: _require_suffix(u, ".safetensors"))]
    tensor: str = Field("inputs", min_length=1, max_length=256)
    max_samples: int = Field(1024, ge=1, le=1_000_000)
    batch_size: int = Field(128, ge=1, le=65_536)


def _require_suffix(uri: str, suffix: str) -> str:
    if not uri.lower().endswith(suffix):
        raise ValueError(f"must name a {suffix} object")
    return uri


class OutputSpec(Frozen):
    uri: S3Uri | None = Field(None, description="s3://bucket/prefix/ (default: results bucket / tenant / job id)")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    shard_size_bytes: int = Field(2 * 1024**3, ge=1024 * 1024, le=50 * 1024**3)
    tokenizer_source: Literal["auto", "base", "first"] | Annotated[int, Field(ge=0, le=63, strict=True)] | None = Field(
        "auto",
        description="Hugging Face folders: whose tokenizer files (and generation config) the result carries: "
        '"base", "first", a model index, or null for none; "auto" (the default) is "base" when there is a '
        'base model, else "first"',
    )

    @field_validator("uri")
    @classmethod
    def _prefix(cls, uri: str | None) -> str | None:
        if uri is not None and not uri.endswith("/"):
            raise ValueError("output URI must be a prefix ending in '/'")
        return uri


def _labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > 32:
        raise ValueError("at most 32 labels")
    for key, value in labels.items():
        if not re.match(r"^[A-Za-z0-9_.\-]{1,63}$", key):
            raise ValueError(f"label key {key!r} must be 1-63 chars of [A-Za-z0-9_.-]")
        if len(value) > 256 or any(ord(c) < 32 for c in value):
            raise ValueError(f"label {key!r}: value must be at most 256 printable characters")
    return labels


def _check_unicode(value: Any, path: list[str | int], depth: int = 0) -> None:
    if depth > 32:
        raise ValueError(f"{'.'.join(map(str, path))}: nested more than 32 levels deep")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            where = ".".join(map(str, path)) or "body"
            raise ValueError(f"{where}: not valid Unicode text (a lone surrogate such as \\ud800)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, [*path, "<key>"], depth + 1)
            _check_unicode(item, [*path, str(key)], depth + 1)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_unicode(item, [*path, index], depth + 1)


MAX_LAYER = 100_000  # a layer index bound (the models' own layer counts are checked when they are read)


class SliceSource(Frozen):
    model: int = Field(ge=0, le=63, strict=True, description="index into models")
    layer_range: tuple[Annotated[int, Field(ge=0, le=MAX_LAYER, strict=True)], ...] = Field(
        description="[start, end): the model's layers start .. end - 1, as mergekit's layer_range",
        examples=[[0, 16]],
    )

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) != 2:
            raise ValueError(f"layer_range must be [start, end], got {len(value)} numbers")
        if value[0] >= value[1]:
            raise ValueError(f"layer_range [{value[0]}, {value[1]}] is empty: start must be below end")
        return value


class LayerSlice(Frozen):
    sources: list[SliceSource] = Field(description="one source per slice (passthrough copies its layers)")

    @field_validator("sources")
    @classmethod
    def _one_source(cls, value: list[SliceSource]) -> list[SliceSource]:
        if len(value) != 1:
            raise ValueError(
                f"a slice takes exactly one source here, got {len(value)} (passthrough copies one model's layers; "
                "merging several sources per slice is not supported)"
            )
        return value


WebhookEvent = Literal["succeeded", "failed", "canceled"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("succeeded", "failed", "canceled")


class WebhookSpec(Frozen):
    """Where the job's outcome is delivered (Standard Webhooks, signed with the tenant's secret). Which schemes
    and hosts a tenant may name is the service's settings' decision, checked at submission."""

    url: str = Field(max_length=2048, examples=["https://hooks.example.com/mudsc"])
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS), min_length=1, max_length=len(WEBHOOK_EVENTS)
    )

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        if any(ord(c) <= 32 or ord(c) == 127 for c in url):
            raise ValueError("URL contains whitespace or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"not a valid URL ({exc})") from None
        if parts.scheme not in ("https", "http"):
            raise ValueError("must be an https:// URL")
        if not parts.hostname:
            raise ValueError("URL names no host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("URL must not carry credentials (user:password@)")
        if parts.fragment:
            raise ValueError("URL must not have a #fragment")
        if port == 0:
            raise ValueError("URL port must be 1..65535")
        return url

    @field_validator("events")
    @classmethod
    def _unique(cls, events: list[WebhookEvent]) -> list[WebhookEvent]:
        if len(set(events)) != len(events):
            raise ValueError("events must not repeat")
        return events


class JobSpec(Frozen):
    method: MethodSpec
    models: list[ModelRef] = Field(
        min_length=1,
        max_length=64,
        description="the models to merge: at least 2, except for passthrough (1 model: its slices may stack its "
        "own layer ranges)",
    )
    base_model: ModelRef | None = None
    architecture: ArchitectureSpec | None = None
    calibration: CalibrationSpec | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)
    labels: Annotated[dict[str, str], AfterValidator(_labels)] = Field(default_factory=dict)
    slices: list[LayerSlice] | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="passthrough only: the output's layers, slice after slice, each a layer range of one model "
        "(embeddings from the first slice's model, final norm and head from the last's)",
    )
    webhook: WebhookSpec | None = Field(
        None, description="deliver the outcome to this URL (default: the tenant's webhook, if any)"
    )

    @field_validator("models")
    @classmethod
    def _enough_models(cls, models: list[ModelRef], info: ValidationInfo) -> list[ModelRef]:
        """The method's model count, reported at ``models`` (the method is validated before them)."""
        method = info.data.get("method")
        if isinstance(method, MethodSpec):
            problem = METHODS[method.name].model_count_problem(len(models))
            if problem:
                raise ValueError(problem)
        elif len(models) < 2:  # the method did not validate: the common rule
            raise ValueError(f"at least 2 models are needed, got {len(models)} (1 only with method 'passthrough')")
        return models

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        """Every string of the request must be UTF-8 encodable: a lone surrogate (``"\\ud800"`` in JSON)
        would be stored, then fail every answer that renders the job."""
        _check_unicode(data, [])
        return data

    @model_validator(mode="after")
    def _method_requirements(self) -> JobSpec:
        METHODS[self.method.name].check_inputs(
            models=len(self.models),
            base=self.base_model is not None,
            architecture=self.architecture is not None,
            calibration=self.calibration is not None,
            weighted=any(m.weight != 1.0 for m in self.models),
        )
        self._check_slices()
        if getattr(self.method.typed_params(), "repair", False) and self.calibration is None:
            raise ValueError("method.params.repair renormalises merged units from activations: give calibration")
        if self.architecture is not None and self.architecture.reads_config_from_models:
            files = [i for i, m in enumerate(self.models) if not m.uri.endswith("/")]
            if files:
                raise ValueError(
                    f"architecture transformers without a config reads config.json from the model folders, but "
                    f"models[{files[0]}] is a single file: give Hugging Face folders (URIs ending in '/') or "
                    "architecture.config"
                )
        if any(m.lora is not None for m in self.models) and METHODS[self.method.name].family != "same_base":
            raise ValueError(
                f"method {self.method.name!r} takes no LoRA adapters (models[i].lora): adapters are inputs of "
                "same-base methods only"
            )
        if self.base_model is not None and self.base_model.lora is not None:
            raise ValueError("base_model takes no LoRA adapter (give the adapted model as one of the models)")
        if any(m.parameters for m in self.models):
            typed = self.method.typed_params()
            if not isinstance(typed, TensorParams):
                raise ValueError(
                    f"method {self.method.name!r} takes no per-model parameters (models[i].parameters are "
                    "used by same-base methods)"
                )
            problems = typed.model_parameter_problems([m.parameters for m in self.models])
            if problems:
                raise ValueError(f"method {self.method.name!r}: {problems[0]}")
        source = self.output.tokenizer_source
        if source == "auto":  # stored resolved, so the job record shows what the result carries
            source = "base" if self.base_model is not None else "first"
            object.__setattr__(self.output, "tokenizer_source", source)
        if source == "base" and self.base_model is None:
            raise ValueError('output.tokenizer_source "base" needs a base_model')
        if isinstance(source, int) and source >= len(self.models):
            raise ValueError(f"output.tokenizer_source {source} is not a model index (0..{len(self.models) - 1})")
        return self

    def _check_slices(self) -> None:
        if self.method.name != "passthrough":
            if self.slices is not None:
                raise ValueError(
                    f"slices (layer ranges) are taken by method 'passthrough' only, not {self.method.name!r}"
                )
            return
        if self.slices is None:
            raise ValueError(
                "method 'passthrough' needs slices: [{sources: [{model: <index into models>, layer_range: "
                "[start, end]}]}, ...]"
            )
        used: set[int] = set()
        for i, layer_slice in enumerate(self.slices):
            for j, source in enumerate(layer_slice.sources):
                if source.model >= len(self.models):
                    raise ValueError(
                        f"slices[{i}].sources[{j}].model {source.model} is not a model index "
                        f"(0..{len(self.models) - 1})"
                    )
                used.add(source.model)
        unused = [i for i in range(len(self.models)) if i not in used]
        if unused:
            raise ValueError(f"models[{unused[0]}] is used by no slice; remove it or name it in slices")
        if any(m.weight != 1.0 for m in self.models):
            raise ValueError("method 'passthrough' takes no model weights (each tensor comes from one model)")

    def tokenizer_folder_index(self) -> int | None:
        """Which input carries the tokenizer: a model index, len(models) for the base, None for none."""
        source = self.output.tokenizer_source
        if source is None:
            return None
        if source == "base":
            return len(self.models)
        return 0 if source in ("first", "auto") else int(source)

    def input_uris(self) -> list[str]:
        uris = [m.uri for m in self.models]
        uris += [m.lora.uri for m in self.models if m.lora is not None]
        if self.base_model is not None:
            uris.append(self.base_model.uri)
        if self.calibration is not None:
            uris.append(self.calibration.uri)
        return uris
