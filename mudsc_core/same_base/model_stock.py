"""Model Stock (Jang et al.), as mergekit's ``model_stock``.

Per tensor (or per row with ``filter_wise``; 1-D tensors are one row), with k task vectors:
cos = mean over pairs of cos(tau_i, tau_j) (norm product clamped to >= 1e-6, cos clamped to
[-1, 1]); t = k cos / (1 + (k - 1) cos); theta = t * mean_i theta_i + (1 - t) * theta_0, i.e.
theta_0 + t * mean_i tau_i. Per-model weights are not used (as in mergekit). With one task
vector (a tensor that only one model holds) t = 1: that model's tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mudsc_core.same_base.base import SinglePass
from mudsc_core.schema.parameters import TensorValues
from mudsc_core.schema.same_base_params import ModelStockParams


@dataclass(frozen=True)
class ModelStock(SinglePass):
    filter_wise: bool = False
    needs_base: bool = True

    @classmethod
    def from_params(cls, params: ModelStockParams) -> ModelStock:
        return cls(filter_wise=params.filter_wise)

    def merge(
        self,
        name: str,
        deltas: Iterable[torch.Tensor],
        weights: Sequence[float],
        model_ids: Sequence[int],
        values: TensorValues | None = None,
    ) -> torch.Tensor:
        return model_stock_delta(list(deltas), filter_wise=self.filter_wise)


def model_stock_delta(deltas: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """The merged task vector t * mean(tau_i)."""
    shape = deltas[0].shape
    k = len(deltas)
    if filter_wise:
        rows = [d.reshape(1, -1) if d.dim() < 2 else d for d in deltas]
    else:
        rows = [d.reshape(-1) for d in deltas]
    mean = rows[0].clone()
    for r in rows[1:]:
        mean.add_(r)
    mean.div_(k)
    if k == 1:
        return mean.view(shape)
    norms = [torch.linalg.vector_norm(r, dim=-1) for r in rows]
    cos_sum = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(k):
        for j in range(i + 1, k):
            cos_ij = (rows[i] * rows[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)
            cos_sum.add_(cos_ij.clamp(-1.0, 1.0))
            pairs += 1
    cos = (cos_sum / pairs).unsqueeze(-1)
    t = (k * cos) / (1 + (k - 1) * cos)
    return mean.mul_(t).view(shape)
