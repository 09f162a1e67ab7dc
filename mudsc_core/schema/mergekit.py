"""mergekit configurations (torch-free): our job spec as mergekit YAML, and mergekit YAML as our job spec.

**Ours -> mergekit** (:func:`to_mergekit`, the model card's "mergekit equivalent"): mergekit
(``merge_method``, ``base_model``, ``models: [{model, parameters}]``, ``parameters``, ``dtype``) names
some of our parameters differently (``scaling_factor`` is its ``lambda``) and has no counterpart for
others (our ``seed``; TIES's ``consensus: count`` and ``topk_scope: model``). A method whose
configuration mergekit cannot express gets no YAML, with the reason.

Per-model parameters (``models[i].parameters``) go to mergekit's ``models[i].parameters``, where
they override the method's per-model knobs given in ``method.params`` (which are written into every
model's parameters, as before); gradients stay lists of numbers and filter lists stay lists of
``{filter, value}`` (an entry without a filter is written as ``{value: ...}``), as mergekit reads them.

**mergekit -> ours** (:func:`parse_mergekit_yaml`, :func:`from_mergekit`, what ``POST /v1/merges``
does with an ``application/yaml`` body): the YAML is bounded before it is built (no aliases, at most
:data:`MAX_DEPTH` levels and :data:`MAX_EVENTS` nodes), read with ``yaml.safe_load``, then translated
key by key; mergekit's defaults are written explicitly where ours differ (``density`` 1.0; for DARE/DELLA
``rescale_rule: "l1_norm"``, mergekit 0.1.5's rescaling: survivors scaled to each tensor's L1 norm, where a
JSON job's default divides them by their keep probability). Every key
we cannot honour is a :class:`MergekitConfigError` whose ``errors[].loc`` points at it. For a method we
both have, ``to_mergekit(from_mergekit(config))`` gives the configuration back when it is written the
way :func:`to_mergekit` writes it (every per-model knob in each model, ``dtype`` given); any other
spelling gives an equivalent configuration (``int8_mask``, ``name`` and ``model_name`` are accepted
and dropped: they change no number).

A model's ``lambda`` (``models[i].parameters.lambda``) is taken and honoured (it scales that model's task
vector); mergekit 0.1.5 reads ``lambda`` globally only and ignores a per-model one, which :func:`to_mergekit`
writes back all the same and names in its reason.

``passthrough`` is translated with its ``slices`` (one source each: ``{model: s3://..., layer_range: [a, b]}``):
our ``models`` are the distinct models in order of first use (one is enough: a model stacked on itself) and each
source names its model by index; ``slices`` with any other method stays refused at its key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from mudsc_core.schema.job import JobSpec
from mudsc_core.schema.methods import METHODS
from mudsc_core.schema.same_base_params import TensorParams

# Our parameter -> mergekit's, where the names differ.
_RENAMED = {"scaling_factor": "lambda"}
_FROM_MERGEKIT = {v: k for k, v in _RENAMED.items()}
# Parameters mergekit takes per model (in ``models[i].parameters``) rather than globally.
_PER_MODEL = frozenset({"weight", "density", "gamma", "epsilon"})
# Our parameters with no mergekit counterpart (the two that change results are checked before they are dropped).
_NOT_IN_MERGEKIT = ("seed", "consensus", "topk_scope")
_RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
_METHODS = {
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "multislerp",
    "model_stock",
    "nuslerp",
    "karcher",
    "sce",
    "nearswap",
    "passthrough",
}
# Methods whose mergekit base_model is our models[0] (mergekit interpolates from it to the other model).
_BASE_IS_FIRST_MODEL = {"slerp", "nearswap"}
_TIES_LIKE = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
_SPARSIFYING = {"ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}


@dataclass(frozen=True)
class MergekitConfig:
    """The equivalent configuration as a mapping (``yaml`` renders it), or why there is none."""

    config: dict[str, Any] | None
    reason: str = ""

    @property
    def yaml(self) -> str | None:
        return None if self.config is None else yaml.safe_dump(self.config, sort_keys=False)


def _setting(value: Any) -> Any:
    """A parameter value as mergekit writes it: filter entries without a filter lose the null key."""
    if isinstance(value, list):
        return [
            {k: v for k, v in entry.items() if not (k == "filter" and v is None)} if isinstance(entry, dict) else entry
            for entry in value
        ]
    return value


def _model_parameters(model: dict[str, Any], per_model: dict[str, Any], weighted: bool) -> dict[str, Any]:
    own = dict(model.get("parameters") or {})
    weight = own.pop("weight", model.get("weight", 1.0))
    first = {"weight": weight} if weighted else {}
    return {k: _setting(v) for k, v in {**first, **per_model, **own}.items()}


def _tokenizer_source(spec: Mapping[str, Any], models: Sequence[Mapping[str, Any]]) -> str | None:
    """mergekit's ``tokenizer_source`` for ours, None where mergekit's default (the base, else the first
    model) is what we carry (or where we carry none: mergekit always writes one)."""
    source = (spec.get("output") or {}).get("tokenizer_source", "auto")
    has_base = bool(spec.get("base_model"))
    if source in (None, "auto") or (source == "base" and has_base):
        return None
    index = 0 if source == "first" else int(source) if isinstance(source, int) else None
    if index is None or index >= len(models) or (index == 0 and not has_base):
        return None
    return str(models[index]["uri"])


def to_mergekit(spec: dict[str, Any]) -> MergekitConfig:
    """The mergekit configuration of a job spec (as ``JobSpec.model_dump(mode="json")`` gives it)."""
    method = spec["method"]["name"]
    params = dict(spec["method"].get("params") or {})
    if method not in _METHODS:
        return MergekitConfig(None, f"mergekit has no {method!r} method")
    if method == "passthrough":
        return _passthrough_to_mergekit(spec)
    if method in _TIES_LIKE and params.get("consensus", "sum") != "sum":
        return MergekitConfig(None, f"mergekit's sign election is 'sum' only; this job uses {params['consensus']!r}")
    if params.get("topk_scope", "tensor") != "tensor":
        return MergekitConfig(None, "mergekit trims each tensor on its own (topk_scope 'tensor')")
    for key in _NOT_IN_MERGEKIT:
        params.pop(key, None)
    rescale_rule = params.pop("rescale_rule", "l1_norm")
    if method not in _RANDOM and not params.get("rescale"):  # mergekit's default there: no rescaling
        params.pop("rescale", None)
    per_model = {k: v for k, v in params.items() if k in _PER_MODEL}
    shared = {_RENAMED.get(k, k): v for k, v in params.items() if k not in _PER_MODEL}
    shared = {k: _setting(v) for k, v in shared.items()}
    weighted = "weight" in _params_class(method).PER_MODEL_PARAMETERS  # model_stock takes no weights
    models = [{"model": m["uri"], "parameters": _model_parameters(m, per_model, weighted)} for m in spec["models"]]
    models = [m if m["parameters"] else {"model": m["model"]} for m in models]
    config: dict[str, Any] = {"merge_method": method}
    if method in _BASE_IS_FIRST_MODEL:  # mergekit interpolates from its base model (t = 0) to the other model
        config["base_model"] = spec["models"][0]["uri"]
        models = [{"model": m["uri"]} for m in spec["models"]]
    elif spec.get("base_model"):
        config["base_model"] = spec["base_model"]["uri"]
    config["models"] = models
    if shared:
        config["parameters"] = shared
    config["dtype"] = spec.get("output", {}).get("dtype", "float32")
    tokenizer = _tokenizer_source(spec, spec["models"])
    if tokenizer is not None:
        config["tokenizer_source"] = tokenizer
    return MergekitConfig(config, _differences(method, params, rescale_rule, spec["models"]))


def _differences(method: str, params: Mapping[str, Any], rescale_rule: str, models: Sequence[Mapping[str, Any]]) -> str:
    """Where mergekit 0.1.5 would compute something else from the configuration written (empty: nothing)."""
    notes = []
    if method in _RANDOM:
        if params.get("rescale", True) and rescale_rule != "l1_norm":
            notes.append(
                "same drop rates; mergekit draws its random masks itself (no seed) and rescales a tensor's survivors "
                "to its L1 norm, where this job divided each by its keep probability (rescale_rule "
                "'keep_probability'; 'l1_norm' is mergekit's rule)"
            )
        else:
            notes.append("same drop rates and rescaling; mergekit draws its random masks itself (no seed)")
    with_lambda = [i for i, m in enumerate(models) if "lambda" in (m.get("parameters") or {})]
    if with_lambda:
        notes.append(
            f"models[{with_lambda[0]}].parameters.lambda: mergekit 0.1.5 reads lambda from the global parameters only "
            "and ignores a per-model value, which scaled that model's task vector here"
        )
    return "; ".join(notes)


def _passthrough_to_mergekit(spec: dict[str, Any]) -> MergekitConfig:
    """``passthrough`` with slices: each source's model index becomes the model's URI."""
    uris = [str(m["uri"]) for m in spec["models"]]
    slices = [
        {"sources": [{"model": uris[s["model"]], "layer_range": list(s["layer_range"])} for s in piece["sources"]]}
        for piece in spec.get("slices") or []
    ]
    if not slices:
        return MergekitConfig(None, "passthrough without slices has no mergekit equivalent here")
    config: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
    config["dtype"] = spec.get("output", {}).get("dtype", "float32")
    tokenizer = _tokenizer_source(spec, spec["models"])
    if tokenizer is not None:
        config["tokenizer_source"] = tokenizer
    return MergekitConfig(config, "")


def _params_class(method: str) -> type[TensorParams]:
    params = METHODS[method].params
    assert issubclass(params, TensorParams)  # every method of _METHODS is a same-base one
    return params


# =========================================================================== mergekit -> ours
YAML_MEDIA_TYPES = ("application/yaml", "application/x-yaml", "text/yaml")
MAX_DEPTH = 32  # mappings and sequences nested deeper than this are refused before they are built
MAX_EVENTS = 100_000  # YAML nodes (scalars, sequences, mappings) in one configuration

Loc = tuple[str | int, ...]

# mergekit's top-level keys: what each becomes here, or why it is refused.
_IGNORED_KEYS = {
    "name": "ignored (a name for the merge; the job id names it here)",
    "model_name": "ignored (a name for the merge; the job id names it here)",
}
_REFUSED_KEYS = {
    "slices": "slices (layer ranges, frankenmerges) are supported with merge_method: passthrough only (one source "
    "per slice); merge whole models with 'models'",
    "modules": "modules are not supported: merge whole models with 'models'",
    "tokenizer": "tokenizer merging (tokenizer: {source: union, ...}) is not supported: the models must share "
    "a vocabulary; use tokenizer_source (base, or one of the models) to pick whose tokenizer the result carries",
    "chat_template": "chat_template is not supported: the result carries the chat template of tokenizer_source's model",
}
_SUPPORTED_KEYS = (
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "name",
    "model_name",
)
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
# mergekit's global parameters of a method that we take and drop: they change no number.
_IGNORED_PARAMETERS = {"int8_mask": "int8_mask (the sign mask's dtype) changes no result; it is accepted and ignored"}
# mergekit's defaults where they differ from ours (filled in explicitly so the merge is mergekit's).
# DARE/DELLA: mergekit 0.1.5 rescales survivors to each tensor's L1 norm (our rescale_rule "l1_norm").
_MERGEKIT_DEFAULTS: dict[str, dict[str, Any]] = {
    m: {"density": 1.0, **({"rescale_rule": "l1_norm"} if m in _RANDOM else {})} for m in _SPARSIFYING
}
# Parameters mergekit requires (no default).
_REQUIRED = {"slerp": ("t",), "nearswap": ("t",)}
# mergekit parameters we have only at mergekit's default value.
_FIXED = {"multislerp": {"eps": 1e-8}}


class MergekitConfigError(ValueError):
    """A mergekit configuration we cannot honour; ``errors``: ``[{"loc": [...], "msg": ...}]`` (loc in the YAML)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        first = errors[0] if errors else {"loc": [], "msg": "invalid configuration"}
        where = ".".join(str(p) for p in first["loc"]) or "configuration"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{where}: {first['msg']}{more}")


def _error(loc: Loc, msg: str) -> dict[str, Any]:
    return {"loc": list(loc), "msg": msg}


def is_yaml_media_type(content_type: str | None) -> bool:
    """Whether a Content-Type header names YAML (parameters such as ``charset`` ignored)."""
    return (content_type or "").split(";", 1)[0].strip().lower() in YAML_MEDIA_TYPES


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"not valid YAML: {problem}{where}"


def _check_events(text: str) -> None:
    """Walk the YAML's events (no tree is built): refuse aliases, deep nesting and too many nodes."""
    depth = events = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise MergekitConfigError(
                [_error((), "YAML aliases (*name) are not accepted in a configuration; write the value out")]
            )
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise MergekitConfigError([_error((), f"nested more than {MAX_DEPTH} levels deep")])
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        if isinstance(event, yaml.NodeEvent):
            events += 1
            if events > MAX_EVENTS:
                raise MergekitConfigError([_error((), f"more than {MAX_EVENTS} YAML nodes")])


def parse_mergekit_yaml(body: bytes | str) -> dict[str, Any]:
    """The configuration mapping of a YAML body (bounded, ``yaml.safe_load``); MergekitConfigError otherwise."""
    if isinstance(body, bytes):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MergekitConfigError([_error((), f"not UTF-8 text (byte {exc.start})")]) from None
    else:
        text = body
    try:
        _check_events(text)
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MergekitConfigError([_error((), _yaml_problem(exc))]) from None
    except RecursionError:  # _check_events bounds the depth first; kept as a last guard
        raise MergekitConfigError([_error((), f"nested more than {MAX_DEPTH} levels deep")]) from None
    if not isinstance(config, dict):
        kind = "empty" if config is None else f"a {type(config).__name__}"
        raise MergekitConfigError([_error((), f"a mergekit configuration must be a mapping, got {kind}")])
    return config


def _value(value: Any) -> Any:
    """mergekit's setting as ours: a bare ``{filter, value}`` becomes a one-entry filter list."""
    if isinstance(value, dict):
        return [value]
    return value


def _with_fallback(value: Any, default: Any) -> Any:
    """A filter list where no entry matches falls back to mergekit's default, not ours: it is written in."""
    if default is None or not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        return value
    if any(e.get("filter") in (None, "*") for e in value):
        return value
    return [*value, {"value": default}]


def _is_uri(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("s3://")


def _model_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return "a model must be an s3:// URI string (mergekit's model objects are not supported)"
    if not value.startswith("s3://"):
        return (
            f"{value[:100]!r} is not an s3:// URI: models are read from S3 here (s3://bucket/folder/ or "
            "s3://bucket/model.safetensors), never downloaded from the Hugging Face Hub or a local path"
        )
    if "+" in value.rpartition("/")[2] or ("+" in value and not value.endswith((".safetensors", "/"))):
        return "mergekit's 'model+lora' syntax is not supported: merge the adapter into the model first"
    return None


@dataclass
class _Translation:
    spec: dict[str, Any]
    model_locs: list[Loc]  # our models[i] -> where it is in the YAML
    base_loc: Loc
    dtype_loc: Loc


def _translate(config: Mapping[Any, Any]) -> _Translation:
    errors: list[dict[str, Any]] = []
    for key in config:
        if key == "slices" and config.get("merge_method") == "passthrough":
            continue
        if key in _REFUSED_KEYS:
            if key == "chat_template" and config[key] is None:
                continue
            errors.append(_error((str(key),), _REFUSED_KEYS[key]))
        elif key not in _SUPPORTED_KEYS:
            errors.append(
                _error((str(key),), f"unknown or unsupported key {key!r}; supported keys: {', '.join(_SUPPORTED_KEYS)}")
            )
    method = config.get("merge_method")
    if method is None:
        errors.append(_error(("merge_method",), "missing: name the merge method"))
    elif method not in _METHODS:
        errors.append(
            _error(
                ("merge_method",),
                f"method {str(method)[:64]!r} is not one we run from a mergekit configuration; "
                f"supported: {', '.join(sorted(_METHODS))}",
            )
        )
    if errors or not isinstance(method, str):
        raise MergekitConfigError(errors)

    params_class = _params_class(method)
    fields = params_class.model_fields
    per_model_names = params_class.PER_MODEL_PARAMETERS
    ours_only = set(_NOT_IN_MERGEKIT) | {"sparsifier", "rescale_rule"}
    shared_names = sorted(
        {_RENAMED.get(k, k) for k in fields if k not in ours_only and k not in _PER_MODEL}
        | {k for k in per_model_names}
        | set(_IGNORED_PARAMETERS if method in _TIES_LIKE | _SPARSIFYING | {"task_arithmetic", "sce"} else ())
        | set(_FIXED.get(method, {}))
    )

    # ---- parameters (global)
    params: dict[str, Any] = dict(_MERGEKIT_DEFAULTS.get(method, {}))
    global_weight: Any = None
    raw_params = config.get("parameters")
    if raw_params is None:
        raw_params = {}
    if not isinstance(raw_params, dict):
        errors.append(_error(("parameters",), "must be a mapping of parameter names to values"))
        raw_params = {}
    for key, value in raw_params.items():
        loc: Loc = ("parameters", str(key))
        if key in _IGNORED_PARAMETERS and key in shared_names:
            if not isinstance(value, bool):
                errors.append(_error(loc, "must be true or false"))
            continue
        if key in _FIXED.get(method, {}):
            if value != _FIXED[method][key]:
                errors.append(_error(loc, f"only mergekit's default {_FIXED[method][key]!r} is supported"))
            continue
        if key not in shared_names:
            hint = " (mergekit's name for it is 'lambda')" if key == "scaling_factor" else ""
            errors.append(
                _error(
                    loc,
                    f"{method} has no parameter {str(key)!r}{hint}; it takes: {', '.join(shared_names) or 'none'}",
                )
            )
            continue
        if key == "weight":
            global_weight = _value(value)
            continue
        ours = _FROM_MERGEKIT.get(key, key)
        params[ours] = _with_fallback(_value(value), _MERGEKIT_DEFAULTS.get(method, {}).get(ours))
    for key in _REQUIRED.get(method, ()):
        if key not in raw_params:
            errors.append(_error(("parameters", key), f"missing: mergekit's {method} requires {key!r}"))

    # ---- base model
    info = METHODS[method]
    base = config.get("base_model")
    if base is not None:
        problem = _model_problem(base)
        if problem:
            errors.append(_error(("base_model",), problem))
    needs_base = info.requires_base or method in _BASE_IS_FIRST_MODEL
    if base is None and needs_base:
        errors.append(_error(("base_model",), f"missing: {method} needs a base_model"))
    if base is not None and not needs_base and method != "linear":
        why = "it copies the slices' layers" if method == "passthrough" else "it interpolates the models themselves"
        errors.append(_error(("base_model",), f"our {method} takes no base model ({why}); remove base_model"))
    if method == "linear":
        base = None  # mergekit's linear ignores its base_model

    # ---- models
    raw_models = config.get("models")
    models: list[dict[str, Any]] = []
    model_locs: list[Loc] = []
    slices: list[dict[str, Any]] | None = None
    if method == "passthrough":
        if raw_models is not None:
            errors.append(
                _error(
                    ("models",),
                    "passthrough here stacks layer ranges: give slices: [{sources: [{model: s3://..., "
                    "layer_range: [start, end]}]}] instead of models",
                )
            )
        slices = _translate_slices(config.get("slices"), models, model_locs, errors)
        raw_models = []
    elif raw_models is None:
        errors.append(_error(("models",), "missing: list the models to merge ([{model: s3://..., parameters}])"))
        raw_models = []
    elif not isinstance(raw_models, list):
        errors.append(_error(("models",), "must be a list of {model, parameters}"))
        raw_models = []
    for j, entry in enumerate(raw_models):
        loc = ("models", j)
        if not isinstance(entry, dict):
            errors.append(_error(loc, "must be a mapping {model: s3://..., parameters: {...}}"))
            continue
        for key in entry:
            if key not in ("model", "parameters"):
                errors.append(
                    _error((*loc, str(key)), f"unsupported key {key!r}; a model entry takes model, parameters")
                )
        problem = _model_problem(entry.get("model")) if "model" in entry else "missing: the model's s3:// URI"
        if problem:
            errors.append(_error((*loc, "model"), problem))
            continue
        own = entry.get("parameters") or {}
        if not isinstance(own, dict):
            errors.append(_error((*loc, "parameters"), "must be a mapping of parameter names to values"))
            continue
        if base is not None and entry["model"] == base:
            if own:
                errors.append(
                    _error((*loc, "parameters"), "the base model takes no parameters (mergekit ignores them too)")
                )
            continue  # mergekit's base listed among the models: it stays the base
        parameters: dict[str, Any] = {}
        for key, value in own.items():
            if key not in per_model_names:
                errors.append(
                    _error(
                        (*loc, "parameters", str(key)),
                        f"{method} takes no per-model parameter {str(key)!r}; per model it takes: "
                        f"{', '.join(per_model_names) or 'none'}",
                    )
                )
                continue
            parameters[str(key)] = _value(value)
        if global_weight is not None and "weight" not in parameters:
            parameters["weight"] = global_weight
        models.append({"uri": entry["model"], "parameters": parameters})
        model_locs.append((*loc,))
    if method in _BASE_IS_FIRST_MODEL and base is not None:
        if len(models) != 1:
            errors.append(
                _error(
                    ("models",), f"{method} interpolates the base_model and one other model; got {len(models)} others"
                )
            )
        models.insert(0, {"uri": base, "parameters": {}})
        model_locs.insert(0, ("base_model",))
        base = None

    # ---- output
    dtype_key = "out_dtype" if config.get("out_dtype") is not None else "dtype"
    output: dict[str, Any] = {}
    raw_dtype = config.get(dtype_key)
    if raw_dtype is not None:
        if raw_dtype not in _DTYPES:
            errors.append(
                _error(
                    (dtype_key,), f"unsupported dtype {str(raw_dtype)[:32]!r}; supported: float32, float16, bfloat16"
                )
            )
        else:
            output["dtype"] = _DTYPES[raw_dtype]
    source = config.get("tokenizer_source")
    if source is not None:
        uris = [m["uri"] for m in models]
        if source == "base":
            output["tokenizer_source"] = (
                "base" if config.get("base_model") and method not in _BASE_IS_FIRST_MODEL | {"linear"} else 0
            )
            if method == "linear" or not config.get("base_model"):
                errors.append(_error(("tokenizer_source",), "'base' needs a base_model"))
        elif source == "union":
            errors.append(
                _error(
                    ("tokenizer_source",),
                    "'union' (merging vocabularies) is not supported: the models must share one; "
                    "name base or one of the models",
                )
            )
        elif source == config.get("base_model") and base is not None:
            output["tokenizer_source"] = "base"
        elif source in uris:
            output["tokenizer_source"] = uris.index(source)
        else:
            errors.append(_error(("tokenizer_source",), "must be 'base' or the model (s3:// URI) of one of the models"))
    if not errors:
        errors += _method_problems(method, params, models, model_locs, base is not None)
    if errors:
        raise MergekitConfigError(errors)

    spec: dict[str, Any] = {"method": {"name": method, "params": params}, "models": models}
    if slices is not None:
        spec["slices"] = slices
    if base is not None:
        spec["base_model"] = {"uri": base}
    if output:
        spec["output"] = output
    return _Translation(spec, model_locs, ("base_model",), (dtype_key,))


_SLICE_KEYS = ("sources",)
_SOURCE_KEYS = ("model", "layer_range", "parameters")


def _translate_slices(
    raw: Any, models: list[dict[str, Any]], model_locs: list[Loc], errors: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """mergekit's ``slices`` as ours (model URIs -> indices into ``models``, which gets the distinct
    models in order of first use, ``model_locs`` where each is first named); problems into ``errors``."""
    if raw is None:
        errors.append(
            _error(
                ("slices",), "missing: passthrough needs slices: [{sources: [{model: s3://..., layer_range: [a, b]}]}]"
            )
        )
        return []
    if not isinstance(raw, list) or not raw:
        errors.append(_error(("slices",), "must be a non-empty list of {sources: [{model, layer_range}]}"))
        return []
    uris: list[str] = []
    slices: list[dict[str, Any]] = []
    for i, piece in enumerate(raw):
        loc: Loc = ("slices", i)
        if not isinstance(piece, dict):
            errors.append(_error(loc, "must be a mapping {sources: [{model, layer_range}]}"))
            continue
        for key in piece:
            if key not in _SLICE_KEYS:
                errors.append(
                    _error((*loc, str(key)), f"unsupported key {key!r}; a passthrough slice takes sources only")
                )
        sources = piece.get("sources")
        if not isinstance(sources, list) or len(sources) != 1:
            got = f"{len(sources)} sources" if isinstance(sources, list) else "no list of sources"
            errors.append(
                _error(
                    (*loc, "sources"),
                    f"passthrough takes exactly one source per slice, got {got} (merging several sources per "
                    "slice is not supported)",
                )
            )
            continue
        ours: list[dict[str, Any]] = []
        for j, source in enumerate(sources):
            where: Loc = (*loc, "sources", j)
            if not isinstance(source, dict):
                errors.append(_error(where, "must be a mapping {model: s3://..., layer_range: [start, end]}"))
                continue
            for key in source:
                if key not in _SOURCE_KEYS:
                    errors.append(
                        _error((*where, str(key)), f"unsupported key {key!r}; a source takes model, layer_range")
                    )
            if source.get("parameters"):
                errors.append(
                    _error(
                        (*where, "parameters"),
                        "passthrough takes no per-source parameters here (mergekit's scale is not supported)",
                    )
                )
            problem = _model_problem(source.get("model")) if "model" in source else "missing: the model's s3:// URI"
            if problem:
                errors.append(_error((*where, "model"), problem))
                continue
            if "layer_range" not in source:
                errors.append(_error((*where, "layer_range"), "missing: the layers [start, end) to take"))
                continue
            uri = source["model"]
            if uri not in uris:
                uris.append(uri)
                models.append({"uri": uri, "parameters": {}})
                model_locs.append(where)
            ours.append({"model": uris.index(uri), "layer_range": source["layer_range"]})
        slices.append({"sources": ours})
    return slices


def _method_problems(
    method: str, params: dict[str, Any], models: list[dict[str, Any]], model_locs: list[Loc], has_base: bool
) -> list[dict[str, Any]]:
    """The method's checks, each at its place in the YAML (the job spec would report them at its top)."""
    try:
        typed = _params_class(method).model_validate(params)
    except ValidationError as exc:
        return [
            _error(
                ("parameters", *[_RENAMED.get(str(p), p) if i == 0 else p for i, p in enumerate(err["loc"])]),
                str(err.get("msg", "invalid")).removeprefix("Value error, "),
            )
            for err in exc.errors()
        ]
    errors = [
        _error(("models",) if "model" in problem else ("base_model",), problem)
        for problem in METHODS[method].input_problems(
            models=len(models), base=has_base, architecture=False, calibration=False
        )
    ]
    for i, model in enumerate(models):
        for problem in typed.model_parameter_problems([model["parameters"]]):
            errors.append(_error((*model_locs[i], "parameters"), problem.removeprefix("models[0].parameters: ")))
    return errors


def _yaml_loc(loc: Sequence[str | int], translation: _Translation) -> Loc:
    """Where in the YAML a location of our job spec came from."""
    if not loc:
        return ()
    head, rest = loc[0], tuple(loc[1:])
    if head == "method":
        if rest[:1] == ("params",) and len(rest) > 1:
            return ("parameters", _RENAMED.get(str(rest[1]), str(rest[1])), *rest[2:])
        return ("merge_method",) if rest[:1] == ("name",) else ("parameters",)
    if head == "models":
        if rest and isinstance(rest[0], int) and rest[0] < len(translation.model_locs):
            where = translation.model_locs[rest[0]]
            tail = rest[1:]
            if where == ("base_model",):
                return where
            if tail[:1] == ("uri",):
                return (*where, "model")
            return (*where, *tail)
        return ("models",)
    if head == "base_model":
        return translation.base_loc
    if head == "output":
        if rest[:1] == ("dtype",):
            return translation.dtype_loc
        if rest[:1] == ("tokenizer_source",):
            return ("tokenizer_source",)
    return tuple(loc)


def from_mergekit(config: Mapping[Any, Any]) -> JobSpec:
    """Our job spec for a mergekit configuration (a parsed mapping); MergekitConfigError naming what we cannot honour."""
    translation = _translate(config)
    try:
        return JobSpec.model_validate(translation.spec)
    except ValidationError as exc:
        errors = [
            _error(_yaml_loc(err["loc"], translation), str(err.get("msg", "invalid")).removeprefix("Value error, "))
            for err in exc.errors()
        ]
        raise MergekitConfigError(errors) from None


def from_mergekit_yaml(body: bytes | str) -> JobSpec:
    """:func:`parse_mergekit_yaml` then :func:`from_mergekit`."""
    return from_mergekit(parse_mergekit_yaml(body))
