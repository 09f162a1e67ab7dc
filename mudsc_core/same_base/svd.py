"""SVD-based merges of 2-D weights: TSV-Merge, Iso-C and Iso-CTS.

Every 2-D tensor gets the SVD rule; any other tensor (biases, norms, 1-D/3-D+) falls back
to task arithmetic, lambda * sum_i w_i tau_i. Per-model weights scale each task vector
before its SVD (all 1 reproduces the papers). Computation is float32 ``torch.linalg.svd``.

- TSV-Merge (Gargiulo et al., "Task Singular Vectors"): T tasks, r = min(m, n); each task
  keeps k = max(1, int(r * (1 / T))) top singular triplets (the reference code's rounding);
  the stacked U (m x Tk) and V^T (Tk x n) are replaced by their nearest orthogonal matrices
  (polar factor P Q^T of A = P S Q^T); delta = U_perp diag(S) V_perp^T.
- Iso-C (Marczak et al., "No Task Left Behind"): delta = sum_i tau_i = U S V^T; every
  singular value replaced by their mean.
- Iso-CTS: common subspace = top int(r * common_space_fraction) directions of sum_i tau_i;
  each task adds its top int((r - common) / T) directions of tau_i projected off the common
  left subspace; U and V of the union are orthogonalised (polar factor) and every direction
  gets the mean of the kept singular values. Difference from the reference code: the slots
  its rounding leaves empty (zero columns, which its polar step fills with arbitrary
  directions) are not created here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch

from mudsc_core.same_base.base import SinglePass
from mudsc_core.schema.parameters import ParameterValue, TensorValues, tensor_value
from mudsc_core.schema.same_base_params import IsoCParams, IsoCtsParams, TsvParams

SvdRule = Literal["tsv", "iso_c", "iso_cts"]


@dataclass(frozen=True)
class SvdMerge(SinglePass):
    rule: SvdRule
    scaling_factor: ParameterValue = 1.0  # resolved per tensor by the stream (``values``)
    common_space_fraction: float = 0.8
    needs_base: bool = True

    # The registry's factories, one per method of this module.
    @classmethod
    def tsv(cls, params: TsvParams) -> SvdMerge:
        return cls("tsv", params.scaling_factor)

    @classmethod
    def iso_c(cls, params: IsoCParams) -> SvdMerge:
        return cls("iso_c", params.scaling_factor)

    @classmethod
    def iso_cts(cls, params: IsoCtsParams) -> SvdMerge:
        return cls("iso_cts", params.scaling_factor, params.common_space_fraction)

    def merge(
        self,
        name: str,
        deltas: Iterable[torch.Tensor],
        weights: Sequence[float],
        model_ids: Sequence[int],
        values: TensorValues | None = None,
    ) -> torch.Tensor:
        weighted = (d.mul(w) if w != 1.0 else d for d, w in zip(deltas, weights))
        if self.rule == "tsv":
            merged = tsv_merge(weighted, len(weights))
        elif self.rule == "iso_c":
            merged = iso_c(weighted)
        else:
            merged = iso_cts(list(weighted), self.common_space_fraction)
        lam = tensor_value(values, "scaling_factor", self.scaling_factor)
        return merged.mul_(lam) if lam != 1.0 else merged


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (or rows): P Q^T for matrix = P S Q^T."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return cast(torch.Tensor, p @ qh)


def _sum(deltas: Iterable[torch.Tensor]) -> torch.Tensor:
    total: torch.Tensor | None = None
    for d in deltas:
        total = d.clone() if total is None else total.add_(d)
        del d
    assert total is not None
    return total


def tsv_merge(deltas: Iterable[torch.Tensor], num_tasks: int) -> torch.Tensor:
    """TSV-Merge of (weighted) task vectors; non-2-D tensors are summed (task arithmetic)."""
    us, ss, vhs = [], [], []
    fallback: torch.Tensor | None = None
    for delta in deltas:
        if delta.dim() != 2:
            fallback = delta.clone() if fallback is None else fallback.add_(delta)
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = max(1, int(s.shape[0] * (1.0 / num_tasks)))
        us.append(u[:, :k].clone())
        ss.append(s[:k].clone())
        vhs.append(vh[:k].clone())
        del u, s, vh, delta
    if fallback is not None:
        return fallback
    u_cat, s_cat, vh_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)  # (m, Tk) (Tk,) (Tk, n)
    return (polar_factor(u_cat) * s_cat) @ polar_factor(vh_cat)


def iso_c(deltas: Iterable[torch.Tensor]) -> torch.Tensor:
    """Iso-C: the summed task vector with a flat spectrum (2-D); other tensors: the sum."""
    total = _sum(deltas)
    if total.dim() != 2:
        return total
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return cast(torch.Tensor, (u * s.mean()) @ vh)


def iso_cts(deltas: Sequence[torch.Tensor], common_space_fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS: common + task-specific subspaces, orthogonalised, flat spectrum (2-D)."""
    total = _sum(deltas)
    if total.dim() != 2:
        return total
    rank = min(total.shape)
    num_tasks = len(deltas)
    n_common = int(rank * common_space_fraction)
    n_task = int((rank - n_common) / num_tasks)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    if n_task == 0 or n_common == rank:
        u_parts, s_parts, vh_parts = [u[:, :n_common]], [s[:n_common]], [vh[:n_common]]
    else:
        common_u = u[:, :n_common]  # (m, c)
        u_parts, s_parts, vh_parts = [], [], []
        for delta in deltas:
            specific = delta - common_u @ (common_u.T @ delta)  # task directions off the common subspace
            tu, ts, tvh = torch.linalg.svd(specific, full_matrices=False)
            u_parts.append(tu[:, :n_task])
            s_parts.append(ts[:n_task])
            vh_parts.append(tvh[:n_task])
        u_parts.append(common_u)
        s_parts.append(s[:n_common])
        vh_parts.append(vh[:n_common])
    u_all = polar_factor(torch.cat(u_parts, 1))
    vh_all = polar_factor(torch.cat(vh_parts, 0))
    return (u_all * torch.cat(s_parts).mean()) @ vh_all
