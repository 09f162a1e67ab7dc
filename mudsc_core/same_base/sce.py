"""``sce``: mergekit's Select, Calculate, Erase over the task vectors (arXiv:2408.07990).

As mergekit's ``sce`` (weights unused, as there), per tensor with the N task vectors tau_i:

- **select**: with ``select_topk`` < 1, keep the int(count_nonzero(var) * select_topk) entries with
  the largest variance across the task vectors (``var`` over the models, biased), zero the rest
  (``select_topk`` <= 0 keeps none);
- **calculate**: model i's coefficient is mean(tau_i^2) / sum_j mean(tau_j^2) (1/N each when the
  sum is below 1e-6);
- **erase**: TIES's sign election ('sum': the sign of sum_i tau_i), then the disjoint weighted mean
  sum_i c_i m_i tau_i / max(sum_i c_i m_i, 1e-6) (m_i: tau_i's sign agrees).

Memory: the N task vectors (stacked as they arrive), the coefficients per entry and one temporary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mudsc_core.same_base.base import SinglePass
from mudsc_core.schema.parameters import ParameterValue, TensorValues, tensor_value
from mudsc_core.schema.same_base_params import SceParams


@dataclass(frozen=True)
class Sce(SinglePass):
    select_topk: ParameterValue = 1.0  # a number, or a gradient / filter list the stream resolves per tensor
    needs_base: bool = True

    @classmethod
    def from_params(cls, params: SceParams) -> Sce:
        return cls(select_topk=params.select_topk)

    def merge(
        self,
        name: str,
        deltas: Iterable[torch.Tensor],
        weights: Sequence[float],
        model_ids: Sequence[int],
        values: TensorValues | None = None,
    ) -> torch.Tensor:
        topk = tensor_value(values, "select_topk", self.select_topk)
        stacked: torch.Tensor | None = None
        for i, delta in enumerate(deltas):
            if stacked is None:
                stacked = torch.empty((len(weights), *delta.shape), dtype=torch.float32)
            stacked[i].copy_(delta)
            del delta
        assert stacked is not None  # at least one model holds every merged tensor
        return sce(stacked, topk)


def select_mask(task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """1 on the int(nonzero * select_topk) entries of largest variance across the models, else 0."""
    if select_topk <= 0:
        return torch.zeros_like(task_vectors[0])
    if select_topk >= 1:
        return torch.ones_like(task_vectors[0])
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * select_topk)  # as mergekit: a float32 product, truncated
    mask = torch.zeros_like(variance)
    if k > 0:
        _, indices = torch.topk(variance.abs().reshape(-1), k=k, largest=True)
        mask.view(-1)[indices] = 1
    return mask


def sce(task_vectors: torch.Tensor, select_topk: float = 1.0) -> torch.Tensor:
    """The merged task vector of the stacked ``task_vectors`` (N, ...); overwrites them."""
    n = task_vectors.shape[0]
    shape = task_vectors.shape[1:]
    if task_vectors[0].numel() == 0:
        return torch.zeros(shape, dtype=torch.float32)
    if select_topk < 1:
        task_vectors.mul_(select_mask(task_vectors, select_topk).unsqueeze(0))
    majority = (task_vectors.sum(dim=0) >= 0).to(torch.float32) * 2 - 1
    agree = (task_vectors.sign() == majority).to(torch.float32)
    del majority
    energy = task_vectors.square().reshape(n, -1).mean(dim=1)
    energy_sum = float(torch.sum(energy).item())
    coefficients = torch.ones_like(energy) / n if abs(energy_sum) < 1e-6 else energy / energy_sum
    erased = agree.mul_(coefficients.view(n, *([1] * len(shape))))  # c_i m_i per entry
    merged = task_vectors.mul_(erased).sum(dim=0)
    return merged.div_(erased.sum(dim=0).clamp_(min=1e-6))
