"""Per-model and per-layer parameter values, as mergekit defines them (torch-free).

A parameter value (:data:`ParameterValue`) is, as mergekit's ``ParameterSetting``:

- a number;
- a *gradient*: a list of numbers, interpolated over the layer index (anchors evenly spaced
  from the first layer, t = 0, to the last, t = 1; piecewise linear in between);
- a list of *filter overrides* ``{"filter": "<substring>", "value": <number or gradient>}``:
  the first entry whose ``filter`` is a substring of the tensor name wins; an entry without
  ``filter`` (or with ``"*"``) matches every tensor. When none matches the value is *unset*
  for that tensor and the next level decides (a model's value -> the method's value -> the
  method's default), as in mergekit's ``ConfigReader.parameter``.

The layer of a tensor is read off its name (:func:`layer_index`); a tensor outside the layers
(embeddings, final norm, lm_head) gets t = 0 (a gradient's first value): mergekit plans its
pre- and post-layer weights with a config reader at t = 0. A checkpoint with one layer gets
t = 1 for it (mergekit: ``t = 1`` when a slice has one layer). A gradient may have any length
>= 1; its anchors are spread over the layers whatever their number (mergekit accepts a
gradient longer than the layer count too: values between anchors are then skipped).

:func:`resolve` is the whole rule: ``(value, tensor name, layer index, layer count) -> float``
(``None`` when a filter list has no match). :class:`ParameterResolver` applies it per tensor
for a merge: the method's per-tensor values and each model's values (with the fallbacks above).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Discriminator, Field, Tag, TypeAdapter

from mudsc_core.errors import InvalidParameters
from mudsc_core.schema._base import Frozen

_SHAPES = "a number, a list of numbers (a gradient over the layers) or a list of {filter, value} entries"


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind(v: object) -> str | None:
    """Which form a value has (a union discriminator: errors then name the form that was meant)."""
    if _is_number(v):
        return "number"
    if isinstance(v, (list, tuple)):
        return "gradient" if all(_is_number(e) for e in v) else "filters"
    return None


def _scalar_kind(v: object) -> str | None:
    kind = _kind(v)
    return kind if kind != "filters" else None


Gradient = Annotated[list[float], Field(min_length=1, max_length=1024)]
ScalarOrGradient = Annotated[
    Annotated[float, Tag("number")] | Annotated[Gradient, Tag("gradient")],
    Discriminator(
        _scalar_kind,
        custom_error_type="scalar_or_gradient",
        custom_error_message="a filter entry's value must be a number or a list of numbers (a gradient)",
    ),
]


class FilterOverride(Frozen):
    """One entry of a filter list: ``value`` for tensors whose name contains ``filter``."""

    filter: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description='substring of the tensor name; absent (or "*") matches every tensor',
    )
    value: ScalarOrGradient


FilterList = Annotated[list[FilterOverride], Field(min_length=1, max_length=64)]
ParameterValue = Annotated[
    Annotated[float, Tag("number")] | Annotated[Gradient, Tag("gradient")] | Annotated[FilterList, Tag("filters")],
    Discriminator(_kind, custom_error_type="parameter_value", custom_error_message="must be " + _SHAPES),
]

# Layer index from the tensor name: the first of these patterns that matches (in this order).
LAYER_PATTERNS = tuple(re.compile(rf"(?:^|\.){word}\.(\d+)\.") for word in ("layers", "h", "layer", "blocks"))


def layer_index(tensor_name: str) -> int | None:
    """The layer a tensor belongs to (``layers.{i}.``, ``h.{i}.``, ``layer.{i}.``, ``blocks.{i}.``), else None."""
    for pattern in LAYER_PATTERNS:
        match = pattern.search(tensor_name)
        if match is not None:
            return int(match.group(1))
    return None


def layer_count(tensor_names: Iterable[str]) -> int:
    """The number of layers of a checkpoint: the largest layer index + 1 (0 when no tensor is in a layer)."""
    indices = [i for i in (layer_index(n) for n in tensor_names) if i is not None]
    return max(indices) + 1 if indices else 0


def layer_t(layer: int | None, layers: int) -> float:
    """mergekit's interpolation position: layer / (layers - 1); 1 for a single layer; 0 outside the layers."""
    if layer is None:
        return 0.0
    if layers <= 1:
        return 1.0
    return min(1.0, max(0.0, layer / (layers - 1)))


def interpolate(gradient: Sequence[float], t: float) -> float:
    """mergekit's gradient: piecewise linear over ``len(gradient)`` evenly spaced anchors on [0, 1]."""
    scaled = t * (len(gradient) - 1)
    i0 = int(scaled)
    i1 = min(len(gradient) - 1, i0 + 1)
    frac = scaled - i0
    return float((1 - frac) * gradient[i0] + frac * gradient[i1])


def evaluate(value: ParameterValue, tensor_name: str, t: float) -> float | None:
    """mergekit's ``evaluate_setting``: the value at position ``t`` for ``tensor_name`` (None: no filter matched)."""
    if isinstance(value, (int, float)):
        return float(value)
    if all(isinstance(v, (int, float)) for v in value):
        return interpolate([float(v) for v in value if isinstance(v, (int, float))], t)
    for entry in value:
        if not isinstance(entry, FilterOverride):
            raise TypeError(f"unexpected parameter value {value!r}")
        if entry.filter is None or entry.filter == "*" or entry.filter in tensor_name:
            return evaluate(entry.value, tensor_name, t)
    return None


def resolve(value: ParameterValue, tensor_name: str, layer: int | None, layers: int) -> float | None:
    """The value of a parameter for one tensor: ``(value, tensor name, layer index, layer count) -> float``."""
    return evaluate(value, tensor_name, layer_t(layer, layers))


def longest_gradient(value: ParameterValue) -> int:
    """The number of anchors of the longest gradient in ``value`` (0 for a plain number)."""
    if isinstance(value, list):
        if value and isinstance(value[0], FilterOverride):
            return max(longest_gradient(entry.value) for entry in value)
        return len(value)
    return 0


def is_scalar(value: ParameterValue) -> bool:
    return isinstance(value, (int, float))


def scalar(value: ParameterValue, name: str) -> float:
    """``value`` as a number; a ValueError when it is a gradient or filter list (resolved per tensor)."""
    if isinstance(value, (int, float)):
        return float(value)
    raise ValueError(
        f"{name!r} is a gradient or filter list here: it is resolved per tensor by the streaming merge "
        "(merge_checkpoints), not by a whole-tensor call"
    )


# --------------------------------------------------------------------------- bounds
@dataclass(frozen=True)
class Bound:
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def contains(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# The bounds of every parameter that may be a gradient or a filter list (the scalar params' bounds).
BOUNDS: dict[str, Bound] = {
    "weight": Bound(0.0, 1e6, low_open=True),
    "density": Bound(0.0, 1.0, low_open=True),
    "gamma": Bound(0.0, 1.0, high_open=True),
    "epsilon": Bound(0.0, 1.0, high_open=True),
    "scaling_factor": Bound(-100.0, 100.0),
    "lambda": Bound(-100.0, 100.0),  # a model's own scaling_factor (models[i].parameters, mergekit's name)
    "t": Bound(0.0, 1.0),
}
# Parameters a model may carry (``models[i].parameters``), by mergekit's names: its per-model tensor
# parameters, and ``lambda`` (a model's own scaling factor; mergekit 0.1.5 reads lambda globally only).
PER_MODEL_NAMES = ("weight", "density", "gamma", "epsilon", "lambda")
# A per-model name -> the method's parameter it overrides, where the names differ.
METHOD_PARAMETER = {"lambda": "scaling_factor"}
_GLOBAL_ONLY_HINTS = {
    "scaling_factor": "per model, the scaling factor has mergekit's name 'lambda' (models[i].parameters.lambda); "
    "'scaling_factor' is the method's (method.params)",
    "t": "'t' applies to the whole merge (as in mergekit): set it in method.params "
    "(it may be a gradient or a filter list)",
}


def _elements(value: ParameterValue) -> Iterable[tuple[str, float]]:
    """Every number in a value, with where it is (for error messages)."""
    if isinstance(value, (int, float)):
        yield "", float(value)
        return
    for i, entry in enumerate(value):
        if isinstance(entry, FilterOverride):
            where = f"filter entry {i}" + (f" ({entry.filter!r})" if entry.filter else "")
            for inner, x in _elements(entry.value):
                yield where + (", " + inner if inner else ""), x
        elif isinstance(entry, (int, float)):
            yield f"gradient element {i}", float(entry)


def check_bounds(name: str, value: ParameterValue) -> ParameterValue:
    """``value`` if every number in it lies in ``name``'s bounds, else a ValueError naming the element."""
    bound = BOUNDS[name]
    for where, x in _elements(value):
        if not bound.contains(x):
            place = f" ({where})" if where else ""
            raise ValueError(f"{name}{place}: {x:g} is outside {bound}")
    return value


def checker(name: str) -> Callable[[ParameterValue], ParameterValue]:
    """A pydantic ``AfterValidator`` function checking ``name``'s bounds."""

    def check(value: ParameterValue) -> ParameterValue:
        return check_bounds(name, value)

    return check


def check_model_parameter_values(parameters: dict[str, ParameterValue]) -> dict[str, ParameterValue]:
    """A model's ``parameters``: known names (mergekit's per-model ones), every value within its bounds."""
    if len(parameters) > 16:
        raise ValueError("at most 16 per-model parameters")
    for key, value in parameters.items():
        if key in _GLOBAL_ONLY_HINTS:
            raise ValueError(f"per-model parameter {key!r}: {_GLOBAL_ONLY_HINTS[key]}")
        if key not in PER_MODEL_NAMES:
            raise ValueError(f"unknown per-model parameter {key!r}; per-model parameters: {', '.join(PER_MODEL_NAMES)}")
        check_bounds(key, value)
    return parameters


_MODEL_PARAMETERS = TypeAdapter(dict[str, ParameterValue])


def validate_model_parameters(raw: Mapping[str, Any]) -> dict[str, ParameterValue]:
    """Typed and checked per-model parameters from plain data (what a direct caller may pass)."""
    return check_model_parameter_values(_MODEL_PARAMETERS.validate_python(dict(raw)))


def dump_value(value: ParameterValue) -> Any:
    """A value as mergekit writes it (filter entries without a filter as ``{"value": ...}``)."""
    if isinstance(value, (int, float)):
        return value
    return [
        entry.model_dump(mode="json", exclude_none=True) if isinstance(entry, FilterOverride) else entry
        for entry in value
    ]


# --------------------------------------------------------------------------- per tensor
@dataclass(frozen=True)
class TensorValues:
    """The parameters resolved for one tensor: the method's (``shared``) and each model's (by model id)."""

    shared: Mapping[str, float]
    per_model: Mapping[int, Mapping[str, float]]

    def get(self, key: str, model_id: int | None = None) -> float | None:
        if model_id is not None:
            own = self.per_model.get(model_id, {})
            if key in own:
                return own[key]
        return self.shared.get(key)


def tensor_value(values: TensorValues | None, key: str, fallback: ParameterValue, model_id: int | None = None) -> float:
    """A knob for one tensor (and model): the value the stream resolved, else ``fallback`` as a plain number."""
    resolved = values.get(key, model_id) if values is not None else None
    return scalar(fallback, key) if resolved is None else resolved


class ParameterResolver:
    """Resolves a merge's parameters tensor by tensor.

    ``shared_keys``: the method's parameters that may vary per tensor; ``model_keys``: those a
    model may carry. A model's value falls back to (its ``weight`` for ``weight``) the method's
    value, then to the method's default, as mergekit's ``ConfigReader.parameter`` does.
    """

    def __init__(
        self,
        params: Frozen,
        shared_keys: Sequence[str],
        model_keys: Sequence[str],
        model_parameters: Sequence[Mapping[str, ParameterValue]],
        weights: Sequence[float],
        layers: int,
    ) -> None:
        self.params = params
        self.shared_keys = [k for k in shared_keys if k in type(params).model_fields]
        self.model_keys = list(model_keys)
        self.model_parameters = list(model_parameters)
        self.weights = list(weights)
        self.layers = layers
        self._check_gradient_lengths()

    def _check_gradient_lengths(self) -> None:
        """A gradient with more anchors than the checkpoint has layers is refused (it cannot mean what it says)."""
        if self.layers < 1:
            return
        named = [(key, getattr(self.params, key)) for key in self.shared_keys]
        named += [
            (f"models[{i}].{key}", value) for i, own in enumerate(self.model_parameters) for key, value in own.items()
        ]
        for where, value in named:
            anchors = longest_gradient(value)
            if anchors > self.layers:
                raise InvalidParameters(
                    f"{where}: a gradient of {anchors} values for a checkpoint of {self.layers} layers; give at "
                    f"most {self.layers} (one per layer) or fewer anchors"
                )

    def _method_value(self, key: str, name: str, layer: int | None) -> float | None:
        fields = type(self.params).model_fields
        if key not in fields:
            return None
        value = resolve(getattr(self.params, key), name, layer, self.layers)
        if value is None:
            default = fields[key].default
            value = float(default) if isinstance(default, (int, float)) else None
        return value

    def at(self, name: str) -> TensorValues:
        layer = layer_index(name)
        shared: dict[str, float] = {}
        for key in self.shared_keys:
            value = self._method_value(key, name, layer)
            if value is not None:
                shared[key] = value
        per_model: dict[int, dict[str, float]] = {}
        for i, own in enumerate(self.model_parameters):
            values: dict[str, float] = {}
            for key in self.model_keys:
                value = resolve(own[key], name, layer, self.layers) if key in own else None
                if value is None:  # the model's weight, else the method's value (lambda: its scaling_factor)
                    value = (
                        self.weights[i]
                        if key == "weight"
                        else self._method_value(METHOD_PARAMETER.get(key, key), name, layer)
                    )
                if value is not None:
                    values[key] = value
            per_model[i] = values
        return TensorValues(shared, per_model)
