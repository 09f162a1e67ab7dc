"""The method registry (torch-free): one entry per method, with everything the service knows about it.

An entry carries the method's name, its typed params model, its family, its requirements
(base model, architecture, calibration, model count) and the import path of its implementation,
which is imported only when a merge runs (the API never imports torch). The implementation
follows its family's protocol:

- ``permutation``: :func:`mudsc_core.permutation.merge.merge` for every preset; the preset's
  params map to the full MuDSC configuration with ``to_mudsc`` (see ``permutation_params``);
- ``same_base``: a factory ``params -> Merger`` (:class:`mudsc_core.same_base.base.Merger`).

Adding a method: its implementation module, its params model, one line below, its tests.
Requirements are checked here only (:meth:`MethodInfo.check_inputs`), by the job spec and by the
core's entry points alike.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from mudsc_core.schema._base import Frozen
from mudsc_core.schema.permutation_params import (
    ActivationAlignParams,
    GitRebasinParams,
    MudscParams,
    MudscPreset,
    WeightAverageParams,
    WeightZipParams,
    ZipItParams,
)
from mudsc_core.schema.same_base_params import (
    BreadcrumbsParams,
    BreadcrumbsTiesParams,
    DareLinearParams,
    DareTiesParams,
    DellaLinearParams,
    DellaParams,
    GeneralizedTaskArithmeticParams,
    IsoCParams,
    IsoCtsParams,
    KarcherParams,
    LinearParams,
    ModelStockParams,
    MultislerpParams,
    NearswapParams,
    NuslerpParams,
    PassthroughParams,
    SceParams,
    SlerpParams,
    TaskArithmeticParams,
    TiesParams,
    TsvParams,
)

Calibration = Literal["required", "optional", "unused"]
Family = Literal["permutation", "same_base"]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    params: type[Frozen]
    family: Family
    description: str
    implementation: str  # "package.module:attribute[.attribute]", imported by load()
    requires_base: bool = False
    requires_architecture: bool = False
    calibration: Calibration = "unused"
    min_models: int = 2
    max_models: int | None = None

    def load(self) -> Any:
        """The implementation (imported now: this is where torch comes in)."""
        module_name, _, path = self.implementation.partition(":")
        target: Any = importlib.import_module(module_name)
        for attribute in path.split("."):
            target = getattr(target, attribute)
        return target

    def input_problems(
        self, *, models: int, base: bool, architecture: bool, calibration: bool, weighted: bool = False
    ) -> list[str]:
        """Every way the given inputs miss this method's requirements (empty when they fit)."""
        count = self.model_count_problem(models)
        problems = [count] if count else []
        if self.requires_base and not base:
            problems.append(f"method {self.name!r} requires a base model (base_model)")
        if not self.requires_base and base:
            problems.append(f"method {self.name!r} does not use a base_model; remove it")
        if self.requires_architecture and not architecture:
            problems.append(f"method {self.name!r} requires architecture")
        if not self.requires_architecture and architecture:
            problems.append(f"method {self.name!r} does not use an architecture; remove it")
        if self.calibration == "required" and not calibration:
            problems.append(f"method {self.name!r} requires calibration data")
        if self.calibration == "unused" and calibration:
            problems.append(f"method {self.name!r} does not use calibration data; remove it")
        if self.family == "permutation" and weighted:
            problems.append(
                f"method {self.name!r} averages matched units equally; per-model weights are only "
                "used by same-base methods"
            )
        return problems

    def model_count_problem(self, models: int) -> str | None:
        """Why ``models`` models do not fit this method (None when they do)."""
        if models < self.min_models:
            return f"method {self.name!r} needs at least {self.min_models} models, got {models}{_ONE_MODEL}"
        if self.max_models is not None and models > self.max_models:
            return f"method {self.name!r} takes at most {self.max_models} models, got {models}"
        return None

    def check_inputs(self, **inputs: Any) -> None:
        """Raise ``ValueError`` naming the first requirement the inputs miss."""
        problems = self.input_problems(**inputs)
        if problems:
            raise ValueError(problems[0])

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
_ONE_MODEL = " (only 'passthrough' takes a single model: its slices stack that model's layers)"


def register(info: MethodInfo) -> None:
    METHODS[info.name] = info


def _permutation(name: str, params: type[Frozen], description: str, calibration: Calibration) -> MethodInfo:
    return MethodInfo(
        name,
        params,
        "permutation",
        description,
        "mudsc_core.permutation.merge:merge",
        requires_architecture=True,
        calibration=calibration,
    )


def _same_base(
    name: str,
    params: type[Frozen],
    description: str,
    implementation: str,
    *,
    requires_base: bool = True,
    min_models: int = 2,
    max_models: int | None = None,
) -> MethodInfo:
    return MethodInfo(
        name,
        params,
        "same_base",
        description,
        "mudsc_core.same_base." + implementation,
        requires_base=requires_base,
        min_models=min_models,
        max_models=max_models,
    )


_GTA = "task_arithmetic:TaskArithmeticFamily.from_params"

for _info in (
    # ---- permutation family (models trained separately): presets of MuDSC
    _permutation(
        "mudsc",
        MudscParams,
        "MuDSC: dual-space (weight + activation) align or zip merging; without "
        "calibration it runs in weight space only",
        "optional",
    ),
    _permutation(
        "weight_average",
        WeightAverageParams,
        "Position-by-position average, no matching (calibration only re-estimates BatchNorm)",
        "optional",
    ),
    _permutation("git_rebasin", GitRebasinParams, "Git Re-Basin weight matching (align, beta=1)", "optional"),
    _permutation("activation_align", ActivationAlignParams, "Align on activation correlation (beta=0)", "required"),
    _permutation("zipit", ZipItParams, "ZipIt!: greedy zip on activation correlation (beta=0, one pass)", "required"),
    _permutation("weight_zip", WeightZipParams, "Zip on weight correlation (beta=1), iterated", "optional"),
    # ---- same-base family (fine-tunes of one base): streamed tensor by tensor
    _same_base(
        "linear",
        LinearParams,
        "Weighted average of the models (normalised by default)",
        "task_arithmetic:Linear.from_params",
        requires_base=False,
    ),
    _same_base("task_arithmetic", TaskArithmeticParams, "theta_0 + lambda * sum_i w_i tau_i", _GTA),
    _same_base("ties", TiesParams, "TIES: trim to density, elect signs, disjoint mean", _GTA),
    _same_base("dare_linear", DareLinearParams, "DARE: seeded random drop with rescale, then task arithmetic", _GTA),
    _same_base("dare_ties", DareTiesParams, "DARE drop with rescale, then TIES sign election", _GTA),
    _same_base(
        "breadcrumbs",
        BreadcrumbsParams,
        "Model Breadcrumbs: drop the largest gamma and the smallest magnitudes, then task arithmetic",
        _GTA,
    ),
    _same_base("breadcrumbs_ties", BreadcrumbsTiesParams, "Breadcrumbs band, then TIES sign election", _GTA),
    _same_base("della", DellaParams, "DELLA: magnitude-ranked drop probabilities, rescale, TIES sign election", _GTA),
    _same_base("della_linear", DellaLinearParams, "DELLA drop, then task arithmetic", _GTA),
    _same_base(
        "slerp",
        SlerpParams,
        "Spherical interpolation of two models at t",
        "slerp:Slerp.from_params",
        requires_base=False,
        max_models=2,
    ),
    _same_base(
        "multislerp",
        MultislerpParams,
        "Weighted spherical interpolation of several models",
        "slerp:Multislerp.from_params",
        requires_base=False,
    ),
    _same_base(
        "model_stock",
        ModelStockParams,
        "Model Stock: interpolate the mean of the fine-tuned models toward the base by their task vectors' angle",
        "model_stock:ModelStock.from_params",
    ),
    _same_base(
        "nuslerp",
        NuslerpParams,
        "NuSLERP: spherical interpolation of two models at t = w_1 / (w_0 + w_1), whole tensor or per row",
        "nuslerp:Nuslerp.from_params",
        requires_base=False,
        max_models=2,
    ),
    _same_base(
        "karcher",
        KarcherParams,
        "Karcher mean: equal-weight Riemannian mean of the models' directions on the sphere, times their mean norm",
        "karcher:Karcher.from_params",
        requires_base=False,
    ),
    _same_base(
        "sce",
        SceParams,
        "SCE: keep the highest-variance entries, weigh task vectors by energy, TIES sign election",
        "sce:Sce.from_params",
    ),
    _same_base(
        "nearswap",
        NearswapParams,
        "NearSwap: take models[1]'s entries where they are within t of models[0]'s, move toward them by t/|diff|",
        "nearswap:Nearswap.from_params",
        requires_base=False,
        max_models=2,
    ),
    _same_base(
        "tsv_merge",
        TsvParams,
        "TSV-Merge: per 2-D weight, each task's top singular vectors, decorrelated "
        "(orthogonal Procrustes); other tensors: task arithmetic",
        "svd:SvdMerge.tsv",
    ),
    _same_base(
        "iso_c",
        IsoCParams,
        "Iso-C: flatten the spectrum of the summed task vector (2-D weights; other tensors: task arithmetic)",
        "svd:SvdMerge.iso_c",
    ),
    _same_base(
        "iso_cts",
        IsoCtsParams,
        "Iso-CTS: common plus task-specific subspaces with a flat spectrum (2-D "
        "weights; other tensors: task arithmetic)",
        "svd:SvdMerge.iso_cts",
    ),
    _same_base(
        "passthrough",
        PassthroughParams,
        "Passthrough: layer ranges of the models stacked into one (deeper or shallower) model, tensors unchanged "
        "(needs the job's slices)",
        "passthrough:Passthrough.from_params",
        requires_base=False,
        min_models=1,  # one model's layer ranges stacked (mergekit's self-stacking frankenmerge)
    ),
):
    register(_info)

__all__ = [
    "METHODS",
    "MethodInfo",
    "Calibration",
    "Family",
    "register",
    "MudscPreset",
    "MudscParams",
    "GeneralizedTaskArithmeticParams",
    "LinearParams",
    "TaskArithmeticParams",
    "TiesParams",
    "DareLinearParams",
    "DareTiesParams",
    "BreadcrumbsParams",
    "BreadcrumbsTiesParams",
    "DellaParams",
    "DellaLinearParams",
    "SlerpParams",
    "MultislerpParams",
    "ModelStockParams",
    "TsvParams",
    "IsoCParams",
    "IsoCtsParams",
    "PassthroughParams",
    "WeightAverageParams",
    "GitRebasinParams",
    "ActivationAlignParams",
    "ZipItParams",
    "WeightZipParams",
]
