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
