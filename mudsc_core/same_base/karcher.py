"""``karcher``: mergekit's Karcher (Riemannian) mean of the models on the unit sphere.

As mergekit's ``karcher``: every model counts equally (alpha_i = 1/N; no weights). The directions
u_i = theta_i / |theta_i| of the models with |theta_i| > tol are averaged on the sphere: start at
their normalised mean (u_first when it vanishes), then up to ``max_iter`` times step along

    g = sum_i a_i (phi_i / sin phi_i) (u_i - cos(phi_i) m),  cos(phi_i) = <m, u_i>   (terms with phi_i < tol skipped)

with the exponential map m <- cos|g| m + sin|g| g/|g| (renormalised), stopping once |g| < tol
(a_i: alpha renormalised over those models). The result is (sum_i alpha_i |theta_i|) m, all
models' norms included. Whole tensors are the vectors. Memory: the N inputs (normalised in
place), the mean and the step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mudsc_core.same_base.base import SinglePass
from mudsc_core.schema.parameters import TensorValues
from mudsc_core.schema.same_base_params import KarcherParams


@dataclass(frozen=True)
class Karcher(SinglePass):
    max_iter: int = 10
    tol: float = 1e-5
    needs_base: bool = False

    @classmethod
    def from_params(cls, params: KarcherParams) -> Karcher:
        return cls(max_iter=params.max_iter, tol=params.tol)

    def merge(
        self,
        name: str,
        tensors: Iterable[torch.Tensor],
        weights: Sequence[float],
        model_ids: Sequence[int],
        values: TensorValues | None = None,
    ) -> torch.Tensor:
        return karcher_mean(list(tensors), max_iter=self.max_iter, tol=self.tol)


def karcher_mean(tensors: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The equal-weight Karcher mean (mergekit's rule); normalises ``tensors`` in place (float32 ones)."""
    if len(tensors) == 1:
        return tensors[0].to(torch.float32).clone()
    alpha = 1.0 / len(tensors)
    norms: list[torch.Tensor] = []
    units: list[torch.Tensor] = []
    for tensor in tensors:
        x = tensor.to(torch.float32)
        norm: torch.Tensor = torch.linalg.vector_norm(x)
        norms.append(norm)
        # all zeros when the norm is 0: already its "unit"
        units.append(x if norm.item() == 0.0 else x.div_(norm))
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return torch.zeros_like(units[0])
    alpha_sum = sum(alpha for _ in valid)
    share = [alpha / alpha_sum for _ in valid]
    directions = [units[i] for i in valid]

    mean = torch.zeros_like(directions[0])
    for a, u in zip(share, directions):
        mean += a * u
    mean_norm: torch.Tensor = torch.linalg.vector_norm(mean)
    mean = directions[0].clone() if mean_norm.item() < tol else mean / mean_norm

    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for a, u in zip(share, directions):
            cos = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            angle = torch.arccos(cos)
            if angle.item() < tol:
                continue
            step += a * (angle / torch.sin(angle)) * (u - cos * mean)
        step_norm: torch.Tensor = torch.linalg.vector_norm(step)
        if step_norm.item() < tol:
            break
        mean = torch.cos(step_norm) * mean + torch.sin(step_norm) * (step / step_norm)
        length: torch.Tensor = torch.linalg.vector_norm(mean)
        if length.item() > tol:
            mean = mean / length
        del step

    scale = sum(alpha * norm for norm in norms)
    return scale * mean
