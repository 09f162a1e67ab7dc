"""Typed parameters of the permutation methods (torch-free).

Permutation methods (models trained separately) are all one algorithm, MuDSC =
matcher x similarity x iteration; the named methods of the paper's comparisons are presets
of :class:`MudscParams`: each params model's ``to_mudsc`` returns the configuration that runs.
"""

from __future__ import annotations

from typing import Annotated, Literal, Protocol

from pydantic import Field

from mudsc_core.schema._base import Frozen


class MudscPreset(Protocol):
    """What every permutation method's params provide: the full MuDSC configuration they stand for."""

    def to_mudsc(self) -> MudscParams: ...


class _PermutationCommon(Frozen):
    reset_bn: bool = Field(True, description="Re-estimate BatchNorm statistics from the calibration inputs")
    repair: bool = Field(
        False,
        description="REPAIR (Jordan et al., 2022): set each merged unit's mean and std over the calibration "
        "inputs, at every Linear/Conv/LayerNorm/GroupNorm output that produces it (a residual stream at each "
        "projection and norm, q and k at each projection), to the interpolation of its input models'; groups "
        "with BatchNorm are left to reset_bn (for models without BatchNorm, e.g. LayerNorm transformers); needs "
        "calibration",
    )
    heads: Literal["shared", "separate"] = Field(
        "shared",
        description="shared: one head, permuted on its input only; separate: merged body feeding every "
        "model's head, logits concatenated (models with different label sets)",
    )
    stop_after: (
        Annotated[int, Field(ge=1, le=100_000, strict=True)]
        | Annotated[str, Field(min_length=1, max_length=512)]
        | None
    ) = Field(
        None,
        description="partial zip: merge the unit groups up to this one (a depth in forward order, or a group "
        "name from the report's spec) and keep the rest of every model separate: one shared trunk, one branch "
        "per model, outputs concatenated (heads separate) or averaged (shared); entries of branch i are "
        "named 'branches.{i}.<name>'. The cut must not fall inside a residual stream; an invalid one fails "
        "with the valid cuts listed",
    )


class _ZipKnobs(Frozen):
    reduce: float | None = Field(
        None, ge=0.0, lt=1.0, description="r: fraction of the N*n stacked units removed; default 1-1/N keeps the width"
    )
    alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="a: damping of a fused unit's similarities (<=0: close its models)"
    )
    budget: float = Field(
        1.0, ge=0.0, le=1000.0, description="b: same-model fusions allowed, as a multiple of each model's share"
    )


class MudscParams(_PermutationCommon, _ZipKnobs):
    """MuDSC: dual-space similarity S = beta*S_weight + (1-beta)*S_act, coordinate ascent over groups."""

    mode: Literal["align", "zip"] = "zip"
    beta: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] = Field(
        0.5,
        description='weight-space share of the similarity; "auto": chosen without labels from calibration '
        "inputs (a grid of betas scored by how well each merge reproduces the input models on held-out inputs)",
    )
    iterate: bool = Field(True, description="coordinate ascent over unit groups (False: one matching pass)")
    max_sweeps: int = Field(100, ge=1, le=10_000)
    patience: int = Field(5, ge=1, le=1000, description="stop after this many sweeps without strict improvement")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    match: bool = Field(True, description="False: no matching at all (plain weight averaging)")

    def to_mudsc(self) -> MudscParams:
        return self


class WeightAverageParams(_PermutationCommon):
    def to_mudsc(self) -> MudscParams:
        return MudscParams(mode="align", match=False, **self.model_dump())


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
