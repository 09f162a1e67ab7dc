"""Typed parameters of every merge method and the registry that names them (torch-free).

Permutation methods (models trained separately) are all one algorithm, MuDSC =
matcher x similarity x iteration; the named methods of the paper's comparisons are presets
of :class:`MudscParams` (see ``to_mudsc``). Same-base methods (task vectors) register here
too; their implementations live in ``mudsc_core.same_base``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from mudsc_core.schema._base import Frozen

Fraction = float  # documented alias: fractions are fractions (0..1), never percentages


# --------------------------------------------------------------------------- permutation family
class _PermutationCommon(Frozen):
    reset_bn: bool = Field(True, description="Re-estimate BatchNorm statistics from the calibration inputs")
    heads: Literal["shared", "separate"] = Field(
        "shared",
        description="shared: one head, permuted on its input only; separate: merged body feeding every "
        "model's head, logits concatenated (models with different label sets)",
    )


class _ZipKnobs(Frozen):
    reduce: float | None = Field(
        None, ge=0.0, lt=1.0, description="r: fraction of the N*n stacked units removed; default 1-1/N keeps the width"
    )
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="a: damping of a fused unit's similarities (<=0: close its models)")
    budget: float = Field(1.0, ge=0.0, le=1000.0, description="b: same-model fusions allowed, as a multiple of each model's share")


class MudscParams(_PermutationCommon, _ZipKnobs):
    """MuDSC: dual-space similarity S = beta*S_weight + (1-beta)*S_act, coordinate ascent over groups."""

    mode: Literal["align", "zip"] = "zip"
    beta: float = Field(0.5, ge=0.0, le=1.0, description="weight-space share of the similarity")
    iterate: bool = Field(True, description="coordinate ascent over unit groups (False: one matching pass)")
    max_sweeps: int = Field(100, ge=1, le=10_000)
    patience: int = Field(5, ge=1, le=1000, description="stop after this many sweeps without strict improvement")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    match: bool = Field(True, description="False: no matching at all (plain weight averaging)")

    def to_mudsc(self) -> "MudscParams":
        return self


class WeightAverageParams(_PermutationCommon):
    def to_mudsc(self) -> MudscParams:
        return MudscParams(mode="align", match=False, reset_bn=self.reset_bn, heads=self.heads)


class GitRebasinParams(_PermutationCommon):
    max_sweeps: int = Field(100, ge=1, le=10_000)
    patience: int = Field(5, ge=1, le=1000)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    def to_mudsc(self) -> MudscParams:
        return MudscParams(mode="align", beta=1.0, **self.model_dump())


class ActivationAlignParams(_PermutationCommon):
    def to_mudsc(self) -> MudscParams:
        return MudscParams(mode="align", beta=0.0, iterate=False, **self.model_dump())


class ZipItParams(_PermutationCommon, _ZipKnobs):
    def to_mudsc(self) -> MudscParams:
        return MudscParams(mode="zip", beta=0.0, iterate=False, **self.model_dump())


class WeightZipParams(_PermutationCommon, _ZipKnobs):
    max_sweeps: int = Field(100, ge=1, le=10_000)
    patience: int = Field(5, ge=1, le=1000)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    def to_mudsc(self) -> MudscParams:
        return MudscParams(mode="zip", beta=1.0, **self.model_dump())


# --------------------------------------------------------------------------- registry
Calibration = Literal["required", "optional", "unused"]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    params: type[Frozen]
    family: Literal["permutation", "same_base"]
    description: str
    requires_base: bool = False
    requires_architecture: bool = False
    calibration: Calibration = "unused"
    min_models: int = 2
    max_models: int | None = None

    def describe(self) -> dict[str, object]:
        """The entry of ``GET /v1/methods``."""
        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "requires_base_model": self.requires_base,
            "requires_architecture": self.requires_architecture,
            "calibration": self.calibration,
            "min_models": self.min_models,
            "max_models": self.max_models,
            "params_schema": self.params.model_json_schema(),
        }


METHODS: dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> None:
    METHODS[info.name] = info


_perm = dict(family="permutation", requires_architecture=True)
register(MethodInfo("mudsc", MudscParams, description="MuDSC: dual-space (weight + activation) align or zip merging; "
                    "without calibration it runs in weight space only", calibration="optional", **_perm))
register(MethodInfo("weight_average", WeightAverageParams, description="Position-by-position average, no matching "
                    "(calibration only re-estimates BatchNorm)", calibration="optional", **_perm))
register(MethodInfo("git_rebasin", GitRebasinParams, description="Git Re-Basin weight matching (align, beta=1)",
                    calibration="optional", **_perm))
register(MethodInfo("activation_align", ActivationAlignParams, description="Align on activation correlation (beta=0)",
                    calibration="required", **_perm))
register(MethodInfo("zipit", ZipItParams, description="ZipIt!: greedy zip on activation correlation (beta=0, one pass)",
                    calibration="required", **_perm))
register(MethodInfo("weight_zip", WeightZipParams, description="Zip on weight correlation (beta=1), iterated",
                    calibration="optional", **_perm))

# Same-base (task-vector) methods register below, one line each (mudsc_core.same_base).


# --------------------------------------------------------------------------- same-base family
from pydantic import model_validator  # noqa: E402  (kept with the section that uses it)

# theta = theta_0 + lambda * merge(tau_1..tau_N), tau_i = theta_i - theta_0, per tensor unless said.
# TIES, DARE, breadcrumbs and DELLA are configurations of ONE algorithm (generalized task
# arithmetic = a sparsifier x a sign rule x normalisation); each named method below only picks
# defaults and exposes its knobs, and ``to_gta`` returns the full configuration that runs.
# Defaults follow mergekit's registry (normalize/rescale per method) and the papers' settings.
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
    consensus: Consensus = Field("none", description="sign election: 'sum' (TIES: sign of the weighted sum), "
                                 "'count' (majority of signs), 'none' (no election)")
    normalize: bool = Field(False, description="divide by the sum of the (agreeing) weights")
    rescale: bool = Field(False, description="random/della: survivors / keep probability; "
                          "magnitude/breadcrumbs: match the task vector's L1 norm")
    topk_scope: Literal["tensor", "model"] = Field(
        "tensor", description="magnitude trim per tensor (mergekit, default) or over the whole model (TIES paper)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="random/della drop seed (per tensor and model)")

    @model_validator(mode="after")
    def _della_band(self) -> "GeneralizedTaskArithmeticParams":
        if self.sparsifier == "della" and self.density < 1.0 and not (
            0.0 < self.density - self.epsilon and self.density + self.epsilon < 1.0
        ):
            raise ValueError("della: density +/- epsilon must lie inside (0, 1)")
        if self.topk_scope == "model" and self.sparsifier != "magnitude":
            raise ValueError("topk_scope='model' applies to magnitude trimming (ties) only")
        return self

    def to_gta(self) -> "GeneralizedTaskArithmeticParams":
        return self


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
    epsilon: Fraction = Field(0.15, ge=0.0, lt=1.0, description="keep probabilities run from density-eps "
                              "(smallest magnitude) to density+eps (largest)")
    rescale: bool = True
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _band(self) -> "_DellaKnobs":
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
    common_space_fraction: Fraction = Field(0.8, gt=0.0, le=1.0, description="share of the rank given to the "
                                            "common subspace (top directions of the summed task vector)")


_same = dict(family="same_base")
register(MethodInfo("linear", LinearParams, description="Weighted average of the models (normalised by default)",
                    **_same))
register(MethodInfo("task_arithmetic", TaskArithmeticParams, description="theta_0 + lambda * sum_i w_i tau_i",
                    requires_base=True, **_same))
register(MethodInfo("ties", TiesParams, description="TIES: trim to density, elect signs, disjoint mean",
                    requires_base=True, **_same))
register(MethodInfo("dare_linear", DareLinearParams, description="DARE: seeded random drop with rescale, then "
                    "task arithmetic", requires_base=True, **_same))
register(MethodInfo("dare_ties", DareTiesParams, description="DARE drop with rescale, then TIES sign election",
                    requires_base=True, **_same))
register(MethodInfo("breadcrumbs", BreadcrumbsParams, description="Model Breadcrumbs: drop the largest gamma and "
                    "the smallest magnitudes, then task arithmetic", requires_base=True, **_same))
register(MethodInfo("breadcrumbs_ties", BreadcrumbsTiesParams, description="Breadcrumbs band, then TIES sign "
                    "election", requires_base=True, **_same))
register(MethodInfo("della", DellaParams, description="DELLA: magnitude-ranked drop probabilities, rescale, TIES "
                    "sign election", requires_base=True, **_same))
register(MethodInfo("della_linear", DellaLinearParams, description="DELLA drop, then task arithmetic",
                    requires_base=True, **_same))
register(MethodInfo("slerp", SlerpParams, description="Spherical interpolation of two models at t",
                    min_models=2, max_models=2, **_same))
register(MethodInfo("multislerp", MultislerpParams, description="Weighted spherical interpolation of several "
                    "models", **_same))
register(MethodInfo("model_stock", ModelStockParams, description="Model Stock: interpolate the mean of the "
                    "fine-tuned models toward the base by their task vectors' angle", requires_base=True, **_same))
register(MethodInfo("tsv_merge", TsvParams, description="TSV-Merge: per 2-D weight, each task's top singular "
                    "vectors, decorrelated (orthogonal Procrustes); other tensors: task arithmetic",
                    requires_base=True, **_same))
register(MethodInfo("iso_c", IsoCParams, description="Iso-C: flatten the spectrum of the summed task vector "
                    "(2-D weights; other tensors: task arithmetic)", requires_base=True, **_same))
register(MethodInfo("iso_cts", IsoCtsParams, description="Iso-CTS: common plus task-specific subspaces with a flat "
                    "spectrum (2-D weights; other tensors: task arithmetic)", requires_base=True,
                    **_same))
