"""Typed parameters of the same-base (task-vector) methods (torch-free).

theta = theta_0 + lambda * merge(tau_1..tau_N), tau_i = theta_i - theta_0, per tensor unless said.
TIES, DARE, breadcrumbs and DELLA are configurations of ONE algorithm (generalized task
arithmetic = a sparsifier x a sign rule x normalisation); each named method below only picks
defaults and exposes its knobs, and ``to_gta`` returns the full configuration that runs.
Defaults follow mergekit's registry (normalize/rescale per method) and the papers' settings.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Literal, Protocol

from pydantic import Field, model_validator

from mudsc_core.schema._base import Frozen

Fraction = float  # documented alias: fractions are fractions (0..1), never percentages
Sparsifier = Literal["none", "magnitude", "random", "breadcrumbs", "della"]
Consensus = Literal["sum", "count", "none"]


class _Scaled(Frozen):
    scaling_factor: float = Field(1.0, ge=-100.0, le=100.0, description="lambda: theta_0 + lambda * merged task vector")


class GeneralizedTaskArithmeticParams(_Scaled):
    """Every option of the task-arithmetic family (what each named method's ``to_gta`` returns)."""

    sparsifier: Sparsifier = "none"
    density: Fraction = Field(1.0, gt=0.0, le=1.0, description="fraction of each task vector's entries kept")
    gamma: Fraction = Field(0.01, ge=0.0, lt=1.0, description="breadcrumbs: fraction of largest magnitudes removed")
    epsilon: Fraction = Field(0.15, ge=0.0, lt=1.0, description="della: keep probabilities span density +/- epsilon")
    consensus: Consensus = Field(
        "none",
        description="sign election: 'sum' (TIES: sign of the weighted sum), "
        "'count' (majority of signs), 'none' (no election)",
    )
    normalize: bool = Field(False, description="divide by the sum of the (agreeing) weights")
    rescale: bool = Field(
        False,
        description="random/della: survivors / keep probability; "
        "magnitude/breadcrumbs: match the task vector's L1 norm",
    )
    topk_scope: Literal["tensor", "model"] = Field(
        "tensor", description="magnitude trim per tensor (mergekit, default) or over the whole model (TIES paper)"
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="random/della drop seed (per tensor and model)")

    @model_validator(mode="after")
    def _della_band(self) -> GeneralizedTaskArithmeticParams:
        if (
            self.sparsifier == "della"
            and self.density < 1.0
            and not (0.0 < self.density - self.epsilon and self.density + self.epsilon < 1.0)
        ):
            raise ValueError("della: density +/- epsilon must lie inside (0, 1)")
        if self.topk_scope == "model" and self.sparsifier != "magnitude":
            raise ValueError("topk_scope='model' applies to magnitude trimming (ties) only")
        return self

    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return self


class GtaPreset(Protocol):
    """What every task-arithmetic-family params model provides: the full configuration it stands for."""

    def to_gta(self) -> GeneralizedTaskArithmeticParams: ...


def _gta(params: Frozen, **fixed: object) -> GeneralizedTaskArithmeticParams:
    return GeneralizedTaskArithmeticParams(**{**params.model_dump(), **fixed})


class LinearParams(Frozen):
    normalize: bool = Field(True, description="divide by the sum of the weights (a weighted mean)")


class TaskArithmeticParams(_Scaled):
    normalize: bool = Field(False, description="divide the summed task vectors by the sum of the weights")

    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return _gta(self)


class TiesParams(_Scaled):
    density: Fraction = Field(0.2, gt=0.0, le=1.0, description="top fraction kept by magnitude (paper: k=20%)")
    topk_scope: Literal["tensor", "model"] = "tensor"
    consensus: Consensus = "sum"
    normalize: bool = True
    rescale: bool = False

    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return _gta(self, sparsifier="magnitude")


class _DareKnobs(_Scaled):
    density: Fraction = Field(0.5, gt=0.0, le=1.0, description="keep probability 1-p (p: drop rate)")
    rescale: bool = True
    normalize: bool = False
    seed: int = Field(0, ge=0, le=2**31 - 1)


class DareLinearParams(_DareKnobs):
    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return _gta(self, sparsifier="random", consensus="none")


class DareTiesParams(_DareKnobs):
    consensus: Consensus = "sum"

    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return _gta(self, sparsifier="random")


class _BreadcrumbsKnobs(_Scaled):
    density: Fraction = Field(0.9, gt=0.0, le=1.0, description="fraction kept between the two cuts")
    gamma: Fraction = Field(0.01, ge=0.0, lt=1.0, description="fraction of largest magnitudes removed")
    normalize: bool = False
    rescale: bool = False


class BreadcrumbsParams(_BreadcrumbsKnobs):
    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return _gta(self, sparsifier="breadcrumbs", consensus="none")


class BreadcrumbsTiesParams(_BreadcrumbsKnobs):
    consensus: Consensus = "sum"

    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return _gta(self, sparsifier="breadcrumbs")


class _DellaKnobs(_Scaled):
    density: Fraction = Field(0.5, gt=0.0, le=1.0, description="mean keep probability")
    epsilon: Fraction = Field(
        0.15,
        ge=0.0,
        lt=1.0,
        description="keep probabilities run from density-eps (smallest magnitude) to density+eps (largest)",
    )
    rescale: bool = True
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @abstractmethod
    def to_gta(self) -> GeneralizedTaskArithmeticParams: ...

    @model_validator(mode="after")
    def _band(self) -> _DellaKnobs:
        self.to_gta()  # the one check lives on the general model
        return self


class DellaParams(_DellaKnobs):
    consensus: Consensus = "sum"
    normalize: bool = True

    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return _gta(self, sparsifier="della")


class DellaLinearParams(_DellaKnobs):
    normalize: bool = False

    def to_gta(self) -> GeneralizedTaskArithmeticParams:
        return _gta(self, sparsifier="della", consensus="none")


class SlerpParams(Frozen):
    t: Fraction = Field(0.5, ge=0.0, le=1.0, description="0 returns the first model, 1 the second")


class MultislerpParams(Frozen):
    normalize_weights: bool = Field(True, description="weights / sum(weights)")


class ModelStockParams(Frozen):
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
