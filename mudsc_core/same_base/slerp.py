"""Spherical interpolation: ``slerp`` (two models at t) and ``multislerp`` (weighted, N models).

Both follow mergekit (``slerp.py``, ``multislerp.py``): whole tensors are treated as vectors;
slerp falls back to linear interpolation when the two directions are nearly colinear
(|cos| > 0.9995); multislerp averages the unit directions, interpolates in the tangent space
at their normalised mean, maps back with the exponential map and rescales by the weighted
mean norm (two exactly opposite inputs fall back to the weighted sum, more raise
IncompatibleModels). Here models[0] is slerp's t=0 end (mergekit's base_model).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mudsc_core.errors import IncompatibleModels
from mudsc_core.same_base.base import SinglePass
from mudsc_core.schema.parameters import ParameterValue, TensorValues, tensor_value
from mudsc_core.schema.same_base_params import MultislerpParams, SlerpParams

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@dataclass(frozen=True)
class Slerp(SinglePass):
    t: ParameterValue  # a number, or a gradient / filter list the stream resolves per tensor (``values``)
    needs_base: bool = False

    @classmethod
    def from_params(cls, params: SlerpParams) -> Slerp:
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
            return pair[0].clone()
        return slerp(tensor_value(values, "t", self.t), pair[0], pair[1])


@dataclass(frozen=True)
class Multislerp(SinglePass):
    normalize_weights: bool = True
    needs_base: bool = False

    @classmethod
    def from_params(cls, params: MultislerpParams) -> Multislerp:
        return cls(normalize_weights=params.normalize_weights)

    def merge(
        self,
        name: str,
        tensors: Iterable[torch.Tensor],
        weights: Sequence[float],
        model_ids: Sequence[int],
        values: TensorValues | None = None,
    ) -> torch.Tensor:
        try:
            return multislerp(list(tensors), weights, normalize_weights=self.normalize_weights)
        except ValueError as exc:
            raise IncompatibleModels(f"multislerp: tensor {name!r}: {exc}") from exc


def lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    return (1 - t) * v0 + t * v1


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS
) -> torch.Tensor:
    """mergekit's slerp on whole tensors (float32); ends returned exactly at t=0 and t=1."""
    v0, v1 = v0.to(torch.float32), v1.to(torch.float32)
    n0, n1 = float(torch.linalg.vector_norm(v0)), float(torch.linalg.vector_norm(v1))
    s0 = 1.0 / n0 if n0 > eps else 1.0
    s1 = 1.0 / n1 if n1 > eps else 1.0
    dot = float(torch.sum(v0 * v1, dtype=torch.float64)) * s0 * s1
    if abs(dot) > dot_threshold:
        return lerp(t, v0, v1)
    theta_0 = math.acos(dot)
    sin_theta_0 = math.sin(theta_0)
    theta_t = theta_0 * t
    c0 = math.sin(theta_0 - theta_t) / sin_theta_0
    c1 = math.sin(theta_t) / sin_theta_0
    if t == 0.0:
        return v0.clone()
    if t == 1.0:
        return v1.clone()
    return c0 * v0 + c1 * v1


def multislerp(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize_weights: bool = True, eps: float = EPS
) -> torch.Tensor:
    if len(tensors) == 1 or tensors[0].numel() == 0:  # nothing to interpolate (a zero-size tensor stays empty)
        return tensors[0].to(torch.float32).clone()
    shape = tensors[0].shape
    flat = torch.stack([t.to(torch.float32).reshape(-1) for t in tensors])  # (N, numel)
    w = torch.tensor(list(weights), dtype=torch.float32)
    if normalize_weights:
        w = w / w.sum()
    norms: torch.Tensor = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)  # (N, 1)
    unit = flat.div_(norms + eps)  # in place: ``flat`` is ours
    mean = (unit * w.view(-1, 1)).sum(0)
    mean_norm: torch.Tensor = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:
            return (tensors[0].to(torch.float32) * w[0] + tensors[1].to(torch.float32) * w[1]).view(shape)
        raise ValueError("the weighted directions cancel out (antipodal inputs); change the weights")
    mean = mean / mean_norm
    dots = (unit * mean).sum(-1, keepdim=True)
    tangent = unit.sub_(dots * mean)  # (N, numel) tangent vectors at the mean
    tangent_result = (tangent * w.view(-1, 1)).sum(0)
    del tangent, unit, flat
    tangent_norm: torch.Tensor = torch.linalg.vector_norm(tangent_result) + eps
    result = mean * torch.cos(tangent_norm) + tangent_result * (torch.sin(tangent_norm) / tangent_norm)
    return result.mul_((norms.squeeze(-1) * w).sum()).view(shape)
