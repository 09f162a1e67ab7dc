"""``nuslerp``: mergekit's spherical interpolation of two models, t from their weights.

As mergekit's ``nuslerp`` (without a base model): t = w_1 / (w_0 + w_1) (0.5 when the weights sum
to about 0), then per vector

    slerp(t, v0, v1) = (sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta),  cos(theta) = <v0, v1> / |v0||v1|

with the raw (not normalised) vectors, and linear interpolation where they are colinear
(1 - cos^2 <= 1e-16). The vectors are the whole tensor (``nuslerp_flatten``, the default), else
each row (last dimension) or, with ``nuslerp_row_wise``, each slice along dimension 0. A tensor
held by one model only is that model's. Memory: the two inputs and a few temporaries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mudsc_core.same_base.base import SinglePass
from mudsc_core.schema.parameters import TensorValues
from mudsc_core.schema.same_base_params import NuslerpParams

COLINEAR_EPS = 1e-8
NORM_FLOOR = 1e-7


@dataclass(frozen=True)
class Nuslerp(SinglePass):
    flatten: bool = True
    row_wise: bool = False
    needs_base: bool = False

    @classmethod
    def from_params(cls, params: NuslerpParams) -> Nuslerp:
        return cls(flatten=params.nuslerp_flatten, row_wise=params.nuslerp_row_wise)

    def merge(
        self,
        name: str,
        tensors: Iterable[torch.Tensor],
        weights: Sequence[float],
        model_ids: Sequence[int],
        values: TensorValues | None = None,
    ) -> torch.Tensor:
        pair = list(tensors)
        if len(pair) == 1:  # the tensor is in one model only: take it
            return pair[0].to(torch.float32).clone()
        total = float(sum(weights))
        t = 0.5 if abs(total) < 1e-6 else float(weights[1]) / total
        return nuslerp(t, pair[0], pair[1], flatten=self.flatten, row_wise=self.row_wise)


def _unit(x: torch.Tensor) -> torch.Tensor:
    norm: torch.Tensor = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norm.clamp(min=NORM_FLOOR)


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool = True, row_wise: bool = False
) -> torch.Tensor:
    """Slerp of ``v0`` and ``v1`` at ``t``: over the whole tensor, or per last-dim row / dim-0 slice."""
    shape = v0.shape
    a, b = v0.to(torch.float32), v1.to(torch.float32)
    if flatten or a.dim() == 0:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    cos = (_unit(a) * _unit(b)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * a + t * b, spherical)
    if row_wise and not flatten and v0.dim() > 0:
        result = result.transpose(0, -1)
    return result.reshape(shape)
