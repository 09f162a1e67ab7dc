"""Plain tensor functions of the task-arithmetic family: sparsifiers and the sign rule.

Each sparsifier takes one task vector (any shape, float32) and returns a NEW tensor (the
input is never modified). Semantics follow mergekit's ``sparsify.py`` unless a docstring
says otherwise:

- ``magnitude``: keep exactly ``k = int(density * numel)`` entries of largest magnitude
  (ties at the threshold: lowest flat index first; mergekit's order there is unspecified).
  ``rescale`` matches the L1 norm of the input (mergekit ``rescale``/``RescaleNorm.l1``).
- ``breadcrumbs``: drop the ``int(gamma * numel)`` largest and then the smallest so that
  ``int(density * numel)`` remain (if density + gamma > 1 fewer large ones are dropped).
  Difference from mergekit: with ``int(gamma * numel) == 0`` mergekit's slice
  ``indices[n_bot:-0]`` keeps nothing (a small tensor loses its whole task vector); here the
  band is what the paper means, the kept ranks ``[n_bot, numel - n_top)``.
- ``random`` (DARE): keep each entry with probability ``density``.
- ``della``: keep probabilities rise linearly with the magnitude rank along dim 1 (a row;
  1-D tensors are one row) from ``density - epsilon`` to ``density + epsilon`` (mergekit
  ``della_magprune``).

The random sparsifiers rescale their survivors by one of two rules (:data:`RescaleRule`):
``"keep_probability"`` divides each survivor by its keep probability (``1 / density`` for DARE,
``1 / p_i`` for DELLA: the papers, unbiased per entry); ``"l1_norm"`` multiplies every survivor
of the tensor by one factor ``||delta||_1 / ||kept||_1`` so that the tensor keeps its L1 norm
(mergekit 0.1.5's ``rescale``: ``rescaled_masked_tensor`` with ``RescaleNorm.l1``, used by every
sparsifier there; left unscaled when either norm is below 1e-7, as there).

Random masks come from a ``torch.Generator`` the caller seeds per (seed, tensor, model), so
a merge is reproducible and independent of tensor order; the numbers cannot equal
mergekit's, which draws from the global RNG.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from mudsc_core.schema.same_base_params import RescaleRule

ConsensusRule = Literal["sum", "count", "none"]
_CHUNK = 1 << 20  # elements per block where a step would otherwise allocate large temporaries


def rng_for(seed: int, tensor_name: str, model_index: int) -> torch.Generator:
    """A generator seeded from (seed, tensor, model) with a stable hash (not Python's ``hash``)."""
    digest = hashlib.blake2b(f"{seed}\0{tensor_name}\0{model_index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _kth_largest(flat: torch.Tensor, k: int, *, scratch: bool = False) -> torch.Tensor:
    """The ``k``-th largest entry of a 1-D tensor (0-d, its dtype and device), ``0 < k < numel``.

    On the CPU by numpy's introselect: the same order statistic as ``torch.kthvalue``, which also
    allocates an int64 index per entry (three times the input in all) and is several times slower
    on large tensors. ``scratch``: ``flat`` is the caller's to reorder (selected in place, no copy)."""
    position = flat.numel() - k  # 0-based position in ascending order
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        values = flat.detach().numpy()
        if scratch:
            values.partition(position)
        else:
            values = np.partition(values, position)
        return torch.tensor(values[position], dtype=flat.dtype)
    return torch.kthvalue(flat, position + 1).values


def _mask_at(flat: torch.Tensor, k: int, threshold: torch.Tensor) -> torch.Tensor:
    """Exactly ``k`` entries of ``flat`` kept: those above ``threshold`` (the k-th largest), then
    the ones equal to it, lowest index first."""
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        mask[(flat == threshold).nonzero().squeeze(1)[:missing]] = True
    return mask


def topk_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` largest entries (ties at the threshold: lowest flat index first)."""
    flat = magnitudes.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    return _mask_at(flat, k, _kth_largest(flat, k)).view(magnitudes.shape)


def _l1_rescaled(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``kept`` scaled in place to ``delta``'s L1 norm (mergekit's ``rescaled_masked_tensor``, its eps)."""
    before, after = float(delta.abs().sum()), float(kept.abs().sum())
    if before >= eps and after >= eps:
        kept.mul_(before / after)
    return kept


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """TIES trim: keep the top ``density`` fraction by magnitude."""
    if density >= 1.0:
        return delta.clone()
    mask = topk_mask(delta.abs(), int(density * delta.numel()))
    kept = delta * mask
    return _l1_rescaled(delta, kept) if rescale else kept


def magnitude_(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """:func:`magnitude` in place: ``delta`` (the caller's to overwrite) becomes the trimmed task vector.
    The same numbers, one task-vector-sized tensor fewer per model while TIES holds them all."""
    if density >= 1.0:
        return delta
    k, n = int(density * delta.numel()), delta.numel()
    if 0 < k < n:  # the threshold from one scratch |delta| (selected in place), then the mask from another
        threshold = _kth_largest(delta.abs().reshape(-1), k, scratch=True)
        mask = _mask_at(delta.abs().reshape(-1), k, threshold).view(delta.shape)
    else:
        mask = topk_mask(delta.abs(), k)
    before = float(delta.abs().sum()) if rescale else 0.0
    kept = delta.mul_(mask)
    del mask
    if rescale:
        after = float(kept.abs().sum())
        if before >= 1e-7 and after >= 1e-7:  # _l1_rescaled's rule
            kept.mul_(before / after)
    return kept


def magnitude_above(delta: torch.Tensor, threshold: float, rescale: bool = False) -> torch.Tensor:
    """Keep entries with ``|x| >= threshold`` (the whole-model TIES variant's second pass)."""
    kept = delta * (delta.abs() >= threshold)
    return _l1_rescaled(delta, kept) if rescale else kept


def breadcrumbs(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: remove the ``gamma`` largest magnitudes and the smallest, keep ``density``."""
    if density >= 1.0:
        return delta.clone()
    n = delta.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bottom = n - target - n_top
    if n_bottom < 0:  # mergekit: give up large-outlier removal to reach the density
        n_top += n_bottom
        n_bottom = 0
    magnitudes = delta.abs()
    mask = topk_mask(magnitudes, n - n_bottom) & ~topk_mask(magnitudes, n_top)
    kept = delta * mask
    return _l1_rescaled(delta, kept) if rescale else kept


def random_drop(
    delta: torch.Tensor,
    density: float,
    generator: torch.Generator,
    rescale: bool = True,
    rule: RescaleRule = "keep_probability",
) -> torch.Tensor:
    """DARE: drop each entry with probability ``1 - density``; when rescaling, survivors / density
    (``rule="keep_probability"``) or times the tensor's L1 norm over theirs (``"l1_norm"``, mergekit)."""
    if density >= 1.0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator) < density
    kept = delta * keep
    if not rescale:
        return kept
    return _l1_rescaled(delta, kept) if rule == "l1_norm" else kept.div_(density)


def della_keep_probabilities(magnitudes: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probability per entry from its magnitude rank along dim 1 (shape (rows, n, ...))."""
    n = magnitudes.shape[1]
    ranks = magnitudes.argsort(dim=1).argsort(dim=1).to(torch.float32)  # 0 = smallest
    rank_norm = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    return rank_norm.mul_(2 * epsilon).add_(density - epsilon)


def della(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: bool = True,
    rule: RescaleRule = "keep_probability",
) -> torch.Tensor:
    """DELLA MagPrune: magnitude-ranked keep probabilities; when rescaling, each survivor / its
    probability (``rule="keep_probability"``) or the whole tensor's survivors times one factor that
    restores its L1 norm (``"l1_norm"``, mergekit)."""
    if density >= 1.0 or delta.numel() == 0:
        return delta.clone()
    per_entry = rescale and rule == "keep_probability"
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta  # 0-d and 1-D: one row of all entries
    out = torch.empty_like(rows)
    # Row blocks keep the int64 argsort temporaries small.
    block = max(1, _CHUNK // max(1, rows[0].numel()))
    for start in range(0, rows.shape[0], block):
        part = rows[start : start + block]
        probs = della_keep_probabilities(part.abs(), density, epsilon)
        keep = torch.rand(part.shape, generator=generator) < probs
        kept = part * keep
        out[start : start + block] = kept.div_(probs) if per_entry else kept
    out = out.view(delta.shape)
    return _l1_rescaled(delta, out) if rescale and rule == "l1_norm" else out


def elect_and_merge(
    weighted: Sequence[torch.Tensor],
    weights: Sequence[float],
    consensus: ConsensusRule,
    normalize: bool,
    out: torch.Tensor | None = None,
    scales: Sequence[float] | None = None,
) -> torch.Tensor:
    """Mix weighted task vectors ``w_i * tau_i`` into one (mergekit ``get_mask`` + mix).

    consensus 'sum': majority sign s = +1 where sum_i w_i tau_i >= 0 else -1; 'count': by the
    count of signs; entries whose sign differs from s (zeros included) are left out; the mix is
    sum over agreeing entries, divided (normalize) by the sum of the agreeing entries' weights
    (1 where none agree). 'none': plain sum, divided (normalize) by sum_i w_i. ``scales``: a
    factor per task vector applied in the mix only (per-model lambdas: the election and the
    divisor do not see it). Works in blocks so that the temporaries stay small; writes into
    ``out`` when given.
    """
    factors = list(scales) if scales is not None else [1.0] * len(weighted)
    shape = weighted[0].shape
    flats = [w.reshape(-1) for w in weighted]
    result = (out if out is not None else torch.empty(shape, dtype=torch.float32, device=weighted[0].device)).reshape(
        -1
    )
    if consensus == "none":
        _sum_into(flats, result, factors)
        if normalize:
            total_weight = float(sum(weights))
            result.div_(total_weight if abs(total_weight) >= 1e-8 else 1.0)
        return result.view(shape)
    for start in range(0, result.numel(), _CHUNK):
        part = [f[start : start + _CHUNK] for f in flats]
        signs = [p.sign() for p in part]
        if consensus == "sum":
            total = part[0].clone()
            for p in part[1:]:
                total.add_(p)
        else:
            total = signs[0].clone()
            for s in signs[1:]:
                total.add_(s)
        majority = torch.where(total >= 0, 1.0, -1.0)
        mixed = torch.zeros_like(majority)
        divisor = torch.zeros_like(majority)
        for p, s, w, factor in zip(part, signs, weights, factors):
            agree = s == majority
            mixed.add_(torch.where(agree, p, 0.0), alpha=factor)
            divisor.add_(agree.to(torch.float32), alpha=w)
        if normalize:
            divisor[divisor == 0] = 1.0
            mixed.div_(divisor)
        result[start : start + _CHUNK] = mixed
    return result.view(shape)


def _sum_into(flats: Sequence[torch.Tensor], result: torch.Tensor, factors: Sequence[float]) -> None:
    result.copy_(flats[0])
    if factors[0] != 1.0:
        result.mul_(factors[0])
    for f, factor in zip(flats[1:], factors[1:]):
        result.add_(f, alpha=factor)


class MagnitudeHistogram:
    """Streaming top-k threshold over many tensors (the whole-model TIES variant's first pass).

    Magnitudes are counted in log2-spaced bins (``bins_per_octave`` per factor of 2, from
    2**-64 to 2**64; smaller magnitudes and zeros fall in the lowest bin). ``threshold(k)`` is
    the lower edge of the bin holding the k-th largest magnitude, so ``|x| >= threshold``
    keeps at least k entries and at most the ones sharing that bin more (a relative band of
    2**(1/bins_per_octave), 0.27% by default); 0.0 when the lowest bin is reached.
    """

    LOW, HIGH = -64.0, 64.0

    def __init__(self, bins_per_octave: int = 256) -> None:
        self.bins_per_octave = bins_per_octave
        self.bins = int((self.HIGH - self.LOW) * bins_per_octave)
        self.counts = torch.zeros(self.bins, dtype=torch.float64)
        self.total = 0

    def add(self, values: torch.Tensor) -> None:
        flat = values.reshape(-1)
        for start in range(0, flat.numel(), 16 * _CHUNK):
            logs = flat[start : start + 16 * _CHUNK].abs().log2_().clamp_(self.LOW, self.HIGH - 1e-3)
            self.counts.add_(torch.histc(logs, self.bins, self.LOW, self.HIGH).to(torch.float64))
        self.total += flat.numel()

    def threshold(self, k: int) -> float:
        if k <= 0:
            return float("inf")
        from_top = self.counts.flip(0).cumsum(0)
        reached = int(torch.searchsorted(from_top, torch.tensor([float(k)], dtype=torch.float64)))
        bin_index = self.bins - 1 - min(reached, self.bins - 1)
        if bin_index == 0:
            return 0.0
        return float(2.0 ** (self.LOW + bin_index / self.bins_per_octave))
