"""Typed parameters of the same-base (task-vector) methods (torch-free).

theta = theta_0 + lambda * merge(tau_1..tau_N), tau_i = theta_i - theta_0, per tensor unless said.
TIES, DARE, breadcrumbs and DELLA are configurations of ONE algorithm (generalized task
arithmetic = a sparsifier x a sign rule x normalisation); each named method below only picks
defaults and exposes its knobs, and ``to_gta`` returns the full configuration that runs.
Defaults follow mergekit's registry (normalize/rescale per method) and the papers' settings.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, ClassVar, Literal, Protocol

from pydantic import AfterValidator, Field, model_validator

from mudsc_core.schema._base import Frozen
from mudsc_core.schema.parameters import ParameterValue, checker

Fraction = float  # documented alias: fractions are fractions (0..1), never percentages
Sparsifier = Literal["none", "magnitude", "random", "breadcrumbs", "della"]
Consensus = Literal["sum", "count", "none"]
# How the random sparsifiers (DARE, DELLA) rescale their survivors (``sparsify.py``): divided by their keep
# probability (the papers) or scaled so that each tensor keeps its L1 norm (mergekit 0.1.5).
RescaleRule = Literal["keep_probability", "l1_norm"]
_RESCALE_RULE = (
    "random/della with rescale: 'keep_probability' divides each survivor by its keep probability "
    "(1/density for DARE, 1/p_i for DELLA: the papers); 'l1_norm' multiplies a tensor's survivors by one "
    "factor, ||tau||_1 / ||kept tau||_1, so that it keeps its L1 norm (mergekit 0.1.5's rescale; a mergekit "
    "YAML gets it)"
)

# Knobs that may vary per tensor: a number, a gradient over the layers or a filter list
# (``parameters.py``); every number in them is checked against the scalar bounds.
_VARIES = "; a number, a gradient over the layers (list of numbers) or a filter list [{filter, value}]"
Density = Annotated[ParameterValue, AfterValidator(checker("density"))]
Gamma = Annotated[ParameterValue, AfterValidator(checker("gamma"))]
Epsilon = Annotated[ParameterValue, AfterValidator(checker("epsilon"))]
Lambda = Annotated[ParameterValue, AfterValidator(checker("scaling_factor"))]
Position = Annotated[ParameterValue, AfterValidator(checker("t"))]


def _check_unit_interval(name: str) -> Callable[[ParameterValue], ParameterValue]:
    """Bounds [0, 1] (those of ``t``) for another knob, the message naming it."""
    check_t = checker("t")

    def check(value: ParameterValue) -> ParameterValue:
        try:
            return check_t(value)
        except ValueError as exc:
            raise ValueError(name + str(exc).removeprefix("t")) from None

    return check


SelectTopk = Annotated[ParameterValue, AfterValidator(_check_unit_interval("select_topk"))]


class TensorParams(Frozen):
    """Params of a same-base method: which knobs vary per tensor and which a model may carry.

    ``TENSOR_PARAMETERS``: the method's params resolved per tensor (they may be gradients or
    filter lists); ``PER_MODEL_PARAMETERS``: the names allowed in ``models[i].parameters``
    (mergekit's tensor parameters of the method).
    """

    TENSOR_PARAMETERS: ClassVar[tuple[str, ...]] = ()
    PER_MODEL_PARAMETERS: ClassVar[tuple[str, ...]] = ("weight",)

    def model_parameter_problems(self, per_model: Sequence[Mapping[str, ParameterValue]]) -> list[str]:
        """Every way the models' ``parameters`` do not fit these params (empty when they fit)."""
        allowed = ", ".join(self.PER_MODEL_PARAMETERS) or "none"
        return [
            f"models[{i}].parameters: no per-model parameter {key!r} for this method (it takes: {allowed})"
            for i, own in enumerate(per_model)
            for key in own
            if key not in self.PER_MODEL_PARAMETERS
        ]


class _Scaled(TensorParams):
    TENSOR_PARAMETERS: ClassVar[tuple[str, ...]] = ("scaling_factor",)
    scaling_factor: Lambda = Field(
        1.0, description="lambda: theta_0 + lambda * merged task vector, in [-100, 100]" + _VARIES
    )


class GeneralizedTaskArithmeticParams(_Scaled):
    """Every option of the task-arithmetic family (what each named method's ``to_gta`` returns)."""

    TENSOR_PARAMETERS: ClassVar[tuple[str, ...]] = ("density", "gamma", "epsilon", "scaling_factor")
    PER_MODEL_PARAMETERS: ClassVar[tuple[str, ...]] = ("weight", "density", "gamma", "epsilon", "lambda")

    sparsifier: Sparsifier = "none"
    density: Density = Field(1.0, description="fraction of each task vector's entries kept, in (0, 1]" + _VARIES)
    gamma: Gamma = Field(0.01, description="breadcrumbs: fraction of largest magnitudes removed, in [0, 1)" + _VARIES)
    epsilon: Epsilon = Field(
        0.15, description="della: keep probabilities span density +/- epsilon, in [0, 1)" + _VARIES
    )
    consensus: Consensus = Field(
        "none",
        description="sign election: 'sum' (TIES: sign of the weighted sum), "
        "'count' (majority of signs), 'none' (no election)",
    )
    normalize: bool = Field(False, description="divide by the sum of the (agreeing) weights")
    rescale: bool = Field(
        False,
        description="rescale the survivors: random/della by rescale_rule; "
        "magnitude/breadcrumbs: match the task vector's L1 norm",
    )
    rescale_rule: RescaleRule = Field(
        "keep_probability", description=_RESCALE_RULE + "; magnitude/breadcrumbs always match the L1 norm"
    )
    topk_scope: Literal["tensor", "model"] = Field(
        "tensor", description="magnitude trim per tensor (mergekit, default) or over the whole model (TIES paper)"
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="random/della drop seed (per tensor and model)")

    @model_validator(mode="after")
    def _della_band(self) -> GeneralizedTaskArithmeticParams:
        if self.sparsifier == "della":
            check_della_band(self.density, self.epsilon)
        if self.topk_scope == "model" and self.sparsifier != "magnitude":
            raise ValueError("topk_scope='model' applies to magnitude trimming (ties) only")
        if self.topk_scope == "model" and not isinstance(self.density, (int, float)):
            raise ValueError(
                "topk_scope='model' needs one number as density (one threshold over the whole model); "
                "a gradient or filter list varies it per tensor: use topk_scope='tensor'"
            )
        return self

    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return self

    def gta_model_problems(self, per_model: Sequence[Mapping[str, ParameterValue]]) -> list[str]:
        """What per-model values cannot do with this configuration (beyond unknown names)."""
        problems = []
        for i, own in enumerate(per_model):
            if self.topk_scope == "model" and "density" in own:
                problems.append(
                    f"models[{i}].parameters: per-model density does not fit topk_scope='model' "
                    "(one threshold over the whole model from the method's density); use topk_scope='tensor'"
                )
            if self.sparsifier == "della":
                try:
                    check_della_band(own.get("density", self.density), own.get("epsilon", self.epsilon))
                except ValueError as exc:
                    problems.append(f"models[{i}].parameters: {exc}")
        return problems


def check_della_band(density: ParameterValue | float, epsilon: ParameterValue | float) -> None:
    """DELLA's keep probabilities density +/- epsilon must lie inside (0, 1) (numbers only; the
    merge checks the values it resolves per tensor)."""
    if not (isinstance(density, (int, float)) and isinstance(epsilon, (int, float))):
        return
    if density < 1.0 and not (0.0 < density - epsilon and density + epsilon < 1.0):
        raise ValueError(
            f"della: density +/- epsilon must lie inside (0, 1) (density {density:g}, epsilon {epsilon:g})"
        )


class GtaPreset(Protocol):
    """What every task-arithmetic-family params model provides: the full configuration it stands for."""

    def to_gta(self) -> GeneralizedTaskArithmeticParams: ...


def _gta(params: Frozen, **fixed: object) -> GeneralizedTaskArithmeticParams:
    return GeneralizedTaskArithmeticParams(**{**params.model_dump(), **fixed})


class _GtaFamily(_Scaled):
    """A named method of the task-arithmetic family: defaults and knobs over the general configuration.

    Per model it takes (besides its sparsifier's knobs) ``lambda``: that model's own scaling factor (see
    :class:`~mudsc_core.same_base.task_arithmetic.TaskArithmeticFamily`)."""

    PER_MODEL_PARAMETERS: ClassVar[tuple[str, ...]] = ("weight", "lambda")

    @abstractmethod
    def to_gta(self) -> GeneralizedTaskArithmeticParams: ...

    @model_validator(mode="after")
    def _general_checks(self) -> _GtaFamily:
        self.to_gta()  # the checks live on the general model
        return self

    def model_parameter_problems(self, per_model: Sequence[Mapping[str, ParameterValue]]) -> list[str]:
        return super().model_parameter_problems(per_model) + self.to_gta().gta_model_problems(per_model)


class LinearParams(TensorParams):
    normalize: bool = Field(True, description="divide by the sum of the weights (a weighted mean)")


class TaskArithmeticParams(_GtaFamily):
    normalize: bool = Field(False, description="divide the summed task vectors by the sum of the weights")

    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return _gta(self)


class TiesParams(_GtaFamily):
    TENSOR_PARAMETERS: ClassVar[tuple[str, ...]] = ("density", "scaling_factor")
    PER_MODEL_PARAMETERS: ClassVar[tuple[str, ...]] = ("weight", "density", "lambda")

    density: Density = Field(0.2, description="top fraction kept by magnitude (paper: k=20%), in (0, 1]" + _VARIES)
    topk_scope: Literal["tensor", "model"] = "tensor"
    consensus: Consensus = "sum"
    normalize: bool = True
    rescale: bool = False

    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return _gta(self, sparsifier="magnitude")


class _DareKnobs(_GtaFamily):
    TENSOR_PARAMETERS: ClassVar[tuple[str, ...]] = ("density", "scaling_factor")
    PER_MODEL_PARAMETERS: ClassVar[tuple[str, ...]] = ("weight", "density", "lambda")

    density: Density = Field(0.5, description="keep probability 1-p (p: drop rate), in (0, 1]" + _VARIES)
    rescale: bool = True
    rescale_rule: RescaleRule = Field("keep_probability", description=_RESCALE_RULE)
    normalize: bool = False
    seed: int = Field(0, ge=0, le=2**31 - 1)


class DareLinearParams(_DareKnobs):
    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return _gta(self, sparsifier="random", consensus="none")


class DareTiesParams(_DareKnobs):
    consensus: Consensus = "sum"

    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return _gta(self, sparsifier="random")


class _BreadcrumbsKnobs(_GtaFamily):
    TENSOR_PARAMETERS: ClassVar[tuple[str, ...]] = ("density", "gamma", "scaling_factor")
    PER_MODEL_PARAMETERS: ClassVar[tuple[str, ...]] = ("weight", "density", "gamma", "lambda")

    density: Density = Field(0.9, description="fraction kept between the two cuts, in (0, 1]" + _VARIES)
    gamma: Gamma = Field(0.01, description="fraction of largest magnitudes removed, in [0, 1)" + _VARIES)
    normalize: bool = False
    rescale: bool = False


class BreadcrumbsParams(_BreadcrumbsKnobs):
    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return _gta(self, sparsifier="breadcrumbs", consensus="none")


class BreadcrumbsTiesParams(_BreadcrumbsKnobs):
    consensus: Consensus = "sum"

    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return _gta(self, sparsifier="breadcrumbs")


class _DellaKnobs(_GtaFamily):
    TENSOR_PARAMETERS: ClassVar[tuple[str, ...]] = ("density", "epsilon", "scaling_factor")
    PER_MODEL_PARAMETERS: ClassVar[tuple[str, ...]] = ("weight", "density", "epsilon", "lambda")

    density: Density = Field(0.5, description="mean keep probability, in (0, 1]" + _VARIES)
    epsilon: Epsilon = Field(
        0.15,
        description="keep probabilities run from density-eps (smallest magnitude) to density+eps (largest), "
        "in [0, 1)" + _VARIES,
    )
    rescale: bool = True
    rescale_rule: RescaleRule = Field("keep_probability", description=_RESCALE_RULE)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class DellaParams(_DellaKnobs):
    consensus: Consensus = "sum"
    normalize: bool = True

    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return _gta(self, sparsifier="della")


class DellaLinearParams(_DellaKnobs):
    normalize: bool = False

    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return _gta(self, sparsifier="della", consensus="none")


class SlerpParams(TensorParams):
    TENSOR_PARAMETERS: ClassVar[tuple[str, ...]] = ("t",)
    PER_MODEL_PARAMETERS: ClassVar[tuple[str, ...]] = ()  # mergekit's slerp has no per-model parameter

    t: Position = Field(0.5, description="0 returns the first model, 1 the second, in [0, 1]" + _VARIES)


class MultislerpParams(TensorParams):
    normalize_weights: bool = Field(True, description="weights / sum(weights)")


class ModelStockParams(TensorParams):
    PER_MODEL_PARAMETERS: ClassVar[tuple[str, ...]] = ()  # mergekit's model_stock uses no weights

    filter_wise: bool = Field(False, description="one interpolation ratio per row (output unit) instead of per tensor")


class TsvParams(_Scaled):
    pass


class IsoCParams(_Scaled):
    pass


class IsoCtsParams(_Scaled):
    common_space_fraction: Fraction = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="share of the rank given to the common subspace (top directions of the summed task vector)",
    )


class NuslerpParams(TensorParams):
    """mergekit's ``nuslerp`` without a base model: t = w_1 / (w_0 + w_1) from the two models' weights."""

    nuslerp_flatten: bool = Field(True, description="treat the whole tensor as one vector (mergekit's default)")
    nuslerp_row_wise: bool = Field(
        False,
        description="without flattening: interpolate along dim 0 (each column) instead of the last dim (each row)",
    )


class KarcherParams(TensorParams):
    PER_MODEL_PARAMETERS: ClassVar[tuple[str, ...]] = ()  # mergekit's karcher weighs the models equally

    max_iter: int = Field(10, ge=0, le=1000, description="Riemannian gradient steps at most")
    tol: float = Field(1e-5, gt=0.0, le=1.0, description="stop once the tangent step's norm is below tol")


class SceParams(TensorParams):
    TENSOR_PARAMETERS: ClassVar[tuple[str, ...]] = ("select_topk",)
    PER_MODEL_PARAMETERS: ClassVar[tuple[str, ...]] = ()  # mergekit's sce weighs by task-vector energy only

    select_topk: SelectTopk = Field(
        1.0,
        description="fraction of the entries with the largest variance across the task vectors kept, "
        "in [0, 1] (1 keeps all)" + _VARIES,
    )


class NearswapParams(TensorParams):
    TENSOR_PARAMETERS: ClassVar[tuple[str, ...]] = ("t",)
    PER_MODEL_PARAMETERS: ClassVar[tuple[str, ...]] = ()  # mergekit's nearswap has no per-model parameter

    t: Position = Field(
        0.0001,
        description="similarity threshold: each entry moves from models[0] toward models[1] by "
        "min(1, t / |difference|), in [0, 1] (mergekit requires t; 0.0001 is the method's reference "
        "merge)" + _VARIES,
    )


class PassthroughParams(TensorParams):
    """``passthrough``: layer ranges of the models stacked as the job's ``slices`` say (no knobs: each tensor is
    copied unchanged; mergekit's per-source ``scale`` is not supported)."""

    PER_MODEL_PARAMETERS: ClassVar[tuple[str, ...]] = ()  # no weights: a tensor comes from one model
