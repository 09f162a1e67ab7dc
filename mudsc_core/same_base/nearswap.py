"""``nearswap``: mergekit's NearSwap of two models (models[0] is mergekit's base_model).

Per entry, with a = models[0] and b = models[1]: w = clamp(t / max(|a - b|, 1e-6), 0, 1) and the
result is w b + (1 - w) a: entries closer than t become b's, the others move toward b by t / |a - b|.
``t`` may vary per tensor (gradient or filter list). A tensor held by one model only is that
model's. Memory: the two inputs and two temporaries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mudsc_core.same_base.base import SinglePass
from mudsc_core.schema.parameters import ParameterValue, TensorValues, tensor_value
from mudsc_core.schema.same_base_params import NearswapParams

DIFF_FLOOR = 1e-6


@dataclass(frozen=True)
class Nearswap(SinglePass):
    t: ParameterValue = 0.0001  # a number, or a gradient / filter list the stream resolves per tensor
    needs_base: bool = False

    @classmethod
    def from_params(cls, params: NearswapParams) -> Nearswap:
        return cls(t=params.t)

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
        return nearswap(tensor_value(values, "t", self.t), pair[0], pair[1])


def nearswap(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.to(torch.float32), b.to(torch.float32)
    weight = (t / (a - b).abs_().clamp_(min=DIFF_FLOOR)).clamp_(min=0, max=1)
    return weight * b + (1 - weight) * a
