"""The task-arithmetic family as ONE implementation: a sparsifier x a sign rule x normalisation.

linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della
and della_linear are configurations of :class:`TaskArithmeticFamily` (see
``GeneralizedTaskArithmeticParams``). Per tensor, as mergekit's ``GTATask``:

    tau_i' = sparsify(tau_i)                     (density, per tensor or whole-model top-k)
    mixed  = sum_i w_i tau_i' [* agree_i]        (consensus 'sum' / 'count' / 'none')
    mixed /= sum_i w_i [* agree_i]               (normalize; 1 where nothing agrees)
    theta  = theta_0 + lambda * mixed

Per-model knobs (density, gamma, epsilon) and per-tensor ones (lambda too) come resolved for
the tensor in ``values`` (see :mod:`mudsc_core.same_base.base`); each task vector is sparsified
with its own model's values. A model's own ``lambda`` (``models[i].parameters.lambda``) scales
that model's term instead of the method's lambda:

    theta  = theta_0 + sum_i lambda_i w_i tau_i' [* agree_i] / (sum_i w_i [* agree_i])

(the sign election and the divisor are unchanged; a model without its own lambda has the method's,
so equal lambdas give the formula above, where lambda is applied once after mixing, as mergekit).

Memory: without a sign rule the task vectors are summed as they arrive (one at a time);
with one, the N sparsified task vectors are held and mixed in blocks into one output. The
task vectors passed to ``merge`` are its own: it may overwrite them. The stream merges large
tensors a row block at a time through ``merge`` with the blocked sparsifier of
:mod:`mudsc_core.same_base.blocks` (whole-tensor thresholds and RNG streams, applied per block).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mudsc_core.errors import InvalidParameters
from mudsc_core.same_base import sparsify as sp
from mudsc_core.same_base.base import FirstPass, SinglePass
from mudsc_core.schema.parameters import TensorValues, scalar, tensor_value
from mudsc_core.schema.same_base_params import (
    GeneralizedTaskArithmeticParams,
    GtaPreset,
    LinearParams,
    check_della_band,
)

# sparsify(name, task vector, model id, values) -> the sparsified task vector
Sparsify = Callable[[str, torch.Tensor, int, "TensorValues | None"], torch.Tensor]


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
        return WholeModelThresholds(scalar(self.params.density, "density"), self.thresholds)

    def value(self, key: str, values: TensorValues | None, model_id: int | None = None) -> float:
        """A knob for this tensor (and model): resolved by the stream, else the params' number."""
        return tensor_value(values, key, getattr(self.params, key), model_id)

    def sparsify(
        self,
        name: str,
        delta: torch.Tensor,
        model_id: int,
        values: TensorValues | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The sparsified task vector; ``generator``: the random sparsifiers' draws (default: a fresh one for
        this tensor and model; the blocked path passes one kept across the tensor's blocks)."""
        p = self.params
        if p.sparsifier == "none":
            return delta.clone()
        if p.sparsifier == "magnitude" and p.topk_scope == "model":
            return sp.magnitude_above(delta, self.thresholds[model_id], rescale=p.rescale)
        density = self.value("density", values, model_id)
        if p.sparsifier == "magnitude":  # in place: the task vectors given to merge() are the merger's own
            return sp.magnitude_(delta, density, rescale=p.rescale)
        if p.sparsifier == "breadcrumbs":
            return sp.breadcrumbs(delta, density, self.value("gamma", values, model_id), rescale=p.rescale)
        if generator is None:
            generator = sp.rng_for(p.seed, name, model_id)
        if p.sparsifier == "random":
            return sp.random_drop(delta, density, generator, rescale=p.rescale, rule=p.rescale_rule)
        epsilon = self.value("epsilon", values, model_id)
        try:
            check_della_band(density, epsilon)
        except ValueError as exc:
            raise InvalidParameters(f"tensor {name!r}, model {model_id}: {exc}") from exc
        return sp.della(delta, density, epsilon, generator, rescale=p.rescale, rule=p.rescale_rule)

    def model_lambdas(self, values: TensorValues | None, model_ids: Sequence[int]) -> list[float]:
        """Each model's lambda for this tensor: its own (``parameters.lambda``), else the method's."""
        lam = self.value("scaling_factor", values)
        own = [values.get("lambda", i) if values is not None else None for i in model_ids]
        return [lam if x is None else x for x in own]

    def merge(
        self,
        name: str,
        deltas: Iterable[torch.Tensor],
        weights: Sequence[float],
        model_ids: Sequence[int],
        values: TensorValues | None = None,
        sparsify: Sparsify | None = None,
    ) -> torch.Tensor:
        """The merged task vector; ``sparsify`` replaces :meth:`sparsify` (the blocked path's, which sees
        one row block of each task vector at a time and keeps the whole tensor's thresholds and RNG)."""
        p = self.params
        trim = sparsify if sparsify is not None else self.sparsify
        lambdas = self.model_lambdas(values, model_ids)
        # One lambda for every model: applied once after mixing (mergekit's order); else per model, in the mix.
        common = lambdas[0] if len(set(lambdas)) <= 1 else None
        scales = [1.0] * len(lambdas) if common is not None else lambdas
        if p.consensus == "none":
            mixed: torch.Tensor | None = None
            for delta, weight, model_id, scale in zip(deltas, weights, model_ids, scales):
                # Without a sparsifier, accumulate straight into the first input (the task vectors
                # are the merger's to overwrite): no allocation at all.
                part = delta if p.sparsifier == "none" else trim(name, delta, model_id, values)
                del delta
                if mixed is None:
                    mixed = part.mul_(weight * scale)
                else:
                    mixed.add_(part, alpha=weight * scale)
                del part
            assert mixed is not None  # at least one model holds every merged tensor
            if p.normalize:
                divisor = float(sum(weights))
                mixed.div_(divisor if abs(divisor) >= 1e-8 else 1.0)
        else:
            weighted = []
            for delta, weight, model_id in zip(deltas, weights, model_ids):
                weighted.append(trim(name, delta, model_id, values).mul_(weight))
                del delta
            # Into the first sparsified task vector (block by block, each block read before it is written).
            into = weighted[0] if weighted[0].is_contiguous() else None
            mixed = sp.elect_and_merge(weighted, weights, p.consensus, p.normalize, out=into, scales=scales)
        return mixed.mul_(common) if common is not None and common != 1.0 else mixed


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
        self,
        name: str,
        tensors: Iterable[torch.Tensor],
        weights: Sequence[float],
        model_ids: Sequence[int],
        values: TensorValues | None = None,
    ) -> torch.Tensor:
        return linear(tensors, weights, self.normalize)


def task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: GeneralizedTaskArithmeticParams,
    name: str = "tensor",
    thresholds: Mapping[int, float] | None = None,
    values: TensorValues | None = None,
) -> torch.Tensor:
    """Whole-tensor convenience: theta_0 + family(theta_i - theta_0) (inputs untouched).

    ``values``: per-model (by index) and per-tensor knobs, as the stream resolves them."""
    family = TaskArithmeticFamily(params, dict(thresholds or {}))
    merged = family.merge(name, (t - base for t in tensors), weights, range(len(tensors)), values)
    return merged.add_(base)


def linear(tensors: Iterable[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    total: torch.Tensor | None = None
    for tensor, weight in zip(tensors, weights):
        part = tensor.to(torch.float32) * weight
        total = part if total is None else total.add_(part)
        del part
    assert total is not None
    return total.div_(float(sum(weights))) if normalize else total
