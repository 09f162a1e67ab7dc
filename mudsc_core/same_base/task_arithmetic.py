"""The task-arithmetic family as ONE implementation: a sparsifier x a sign rule x normalisation.

linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della
and della_linear are configurations of :class:`TaskArithmeticFamily` (see
``GeneralizedTaskArithmeticParams``). Per tensor, as mergekit's ``GTATask``:

    tau_i' = sparsify(tau_i)                     (density, per tensor or whole-model top-k)
    mixed  = sum_i w_i tau_i' [* agree_i]        (consensus 'sum' / 'count' / 'none')
    mixed /= sum_i w_i [* agree_i]               (normalize; 1 where nothing agrees)
    theta  = theta_0 + lambda * mixed

Memory: without a sign rule the task vectors are summed as they arrive (one at a time);
with one, the N sparsified task vectors are held and mixed in blocks into one output. The
task vectors passed to ``merge`` are its own: it may overwrite them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mudsc_core.same_base import sparsify as sp
from mudsc_core.same_base.base import FirstPass, SinglePass
from mudsc_core.schema.same_base_params import GeneralizedTaskArithmeticParams, GtaPreset, LinearParams


@dataclass(frozen=True)
class TaskArithmeticFamily:
    params: GeneralizedTaskArithmeticParams
    # Whole-model TIES (topk_scope="model"): per model id, the magnitude threshold found by
    # the first pass over the whole model.
    # the first pass over the whole model fills it in.
    thresholds: dict[int, float] = field(default_factory=dict)
    needs_base: bool = True

    @classmethod
    def from_params(cls, params: GtaPreset) -> TaskArithmeticFamily:
        return cls(params.to_gta())

    def first_pass(self) -> FirstPass | None:
        if self.params.topk_scope != "model":
            return None
        return WholeModelThresholds(self.params.density, self.thresholds)

    def sparsify(self, name: str, delta: torch.Tensor, model_id: int) -> torch.Tensor:
        p = self.params
        if p.sparsifier == "none":
            return delta.clone()
        if p.sparsifier == "magnitude":
            if p.topk_scope == "model":
                return sp.magnitude_above(delta, self.thresholds[model_id], rescale=p.rescale)
            return sp.magnitude(delta, p.density, rescale=p.rescale)
        if p.sparsifier == "breadcrumbs":
            return sp.breadcrumbs(delta, p.density, p.gamma, rescale=p.rescale)
        generator = sp.rng_for(p.seed, name, model_id)
        if p.sparsifier == "random":
            return sp.random_drop(delta, p.density, generator, rescale=p.rescale)
        return sp.della(delta, p.density, p.epsilon, generator, rescale=p.rescale)

    def merge(
        self, name: str, deltas: Iterable[torch.Tensor], weights: Sequence[float], model_ids: Sequence[int]
    ) -> torch.Tensor:
        p = self.params
        if p.consensus == "none":
            mixed: torch.Tensor | None = None
            for delta, weight, model_id in zip(deltas, weights, model_ids):
                # Without a sparsifier, accumulate straight into the first input (the task vectors
                # are the merger's to overwrite): no allocation at all.
                part = delta if p.sparsifier == "none" else self.sparsify(name, delta, model_id)
                del delta
                if mixed is None:
                    mixed = part.mul_(weight)
                else:
                    mixed.add_(part, alpha=weight)
                del part
            assert mixed is not None  # at least one model holds every merged tensor
            if p.normalize:
                divisor = float(sum(weights))
                mixed.div_(divisor if abs(divisor) >= 1e-8 else 1.0)
        else:
            weighted = []
            for delta, weight, model_id in zip(deltas, weights, model_ids):
                weighted.append(self.sparsify(name, delta, model_id).mul_(weight))
                del delta
            mixed = sp.elect_and_merge(weighted, weights, p.consensus, p.normalize)
        return mixed.mul_(p.scaling_factor) if p.scaling_factor != 1.0 else mixed


class WholeModelThresholds:
    """First pass of whole-model TIES: each model's top-``density`` magnitude threshold over all its tensors."""

    def __init__(self, density: float, thresholds: dict[int, float]) -> None:
        self.density = density
        self.thresholds = thresholds
        self.histograms: dict[int, sp.MagnitudeHistogram] = {}

    def observe(self, name: str, model_id: int, task_vector: torch.Tensor) -> None:
        self.histograms.setdefault(model_id, sp.MagnitudeHistogram()).add(task_vector)

    def finish(self) -> list[str]:
        for model_id, histogram in self.histograms.items():
            if histogram.total:
                self.thresholds[model_id] = histogram.threshold(int(self.density * histogram.total))
        return [
            "ties over the whole model: per-model magnitude thresholds "
            + ", ".join(f"model {i}={self.thresholds[i]:.3g}" for i in sorted(self.thresholds))
        ]


@dataclass(frozen=True)
class Linear(SinglePass):
    """Weighted sum of the models' tensors, divided by the sum of the weights when normalising."""

    normalize: bool = True
    needs_base: bool = False

    @classmethod
    def from_params(cls, params: LinearParams) -> Linear:
        return cls(normalize=params.normalize)

    def merge(
        self, name: str, tensors: Iterable[torch.Tensor], weights: Sequence[float], model_ids: Sequence[int]
    ) -> torch.Tensor:
        return linear(tensors, weights, self.normalize)


def task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: GeneralizedTaskArithmeticParams,
    name: str = "tensor",
    thresholds: Mapping[int, float] | None = None,
) -> torch.Tensor:
    """Whole-tensor convenience: theta_0 + family(theta_i - theta_0) (inputs untouched)."""
    family = TaskArithmeticFamily(params, dict(thresholds or {}))
    merged = family.merge(name, (t - base for t in tensors), weights, range(len(tensors)))
    return merged.add_(base)


def linear(tensors: Iterable[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    total: torch.Tensor | None = None
    for tensor, weight in zip(tensors, weights):
        part = tensor.to(torch.float32) * weight
        total = part if total is None else total.add_(part)
        del part
    assert total is not None
    return total.div_(float(sum(weights))) if normalize else total
