"""Matchers: from a stacked similarity matrix to merge/unmerge matrices (docs/design/MUDSC.md §3).

Every matcher reads the ``(N*n, N*n)`` similarity of ``N`` models' units, stacked
model-major (rows ``[i*n:(i+1)*n]`` are model ``i``), and returns a :class:`Match`: per model
an ``(n, m)`` unmerge matrix ``U_i`` (0/1: which merged unit each unit becomes) and an
``(n, m)`` merge matrix ``M_i`` (the weight of each unit in each merged unit), so that the
merged weights are ``W* = sum_i M_i^T W_i U_i``.

- :func:`align_match`: one unit of every model per merged unit (Git Re-Basin style linear
  assignment against model 0).
- :func:`zip_match`: ZipIt!'s greedy fusion, including same-model fusions, with an
  O(n^2) incremental implementation; :func:`zip_match_reference` is the O(n^3)
  full-rescan version of the same definition, kept for tests and ``bench/zip_speed.py``.

Greedy zip definition (both implementations follow it exactly)
--------------------------------------------------------------
``O = N*n`` current units; the target width is ``m = round(O * (1 - r))`` with
``r = 1 - 1/N`` by default. A current unit is named by its *index* (its lowest original
stacked index) and has an *origin* (the model of that lowest-index constituent). The
diagonal of the similarity is ``-inf``. Each model ``k`` has a budget of
``floor(b * (O - m) / N + 1e-4)`` same-model fusions (``origin(p) == origin(q)`` counts
against ``origin(p)``); whenever model ``k``'s budget is ``<= 0`` (from the start when it
is 0) every pair of current units both of origin ``k`` is closed (``-inf``).

While the width exceeds ``m``:

1. take the pair ``p < q`` (by index) of current units with the largest similarity.
   **Tie rule:** among equal values the smallest ``p`` wins, then the smallest ``q``
   (row-major order of the upper triangle). This also applies when every remaining
   similarity is ``-inf`` (all pairs closed before the target width is reached): the
   fusion still happens, with the first pair in that order, so the loop always
   terminates after exactly ``O - m`` fusions.
2. fuse ``q`` into ``p`` (the fused unit keeps ``p``'s index and origin); its similarity to
   every other unit ``u`` becomes ``min(sim[p, u], sim[q, u])``;
3. ``alpha > 0``: multiply the fused unit's row and column by ``alpha``; ``alpha <= 0``:
   set its similarity to every unit of origin ``origin(p)`` or ``origin(q)`` to ``-inf``;
4. charge a same-model fusion to the budget and close that model's pairs when the budget
   reaches 0.

Merged units are ordered by index. The similarity is symmetrised as ``(S + S^T) / 2``
(exactly ``S`` for a symmetric input) and computed in float64 by both implementations, so
they produce bit-identical matrices.

Group-structured matching (``num_blocks = G > 1``): a group's units form ``G`` contiguous
blocks of ``n/G`` (attention heads). Blocks of model ``i`` are paired with model 0's blocks
(scored by the mean of each block pair's own optimal unit assignment, then assigned), or a
given ``block_pairing`` is reused (tied groups); units are matched only inside paired
blocks, and merged block ``g`` holds ``m/G`` units in model 0's block order.

Whole blocks (``whole_blocks=True``: rotary q/k heads, whose dims are fixed by the cos/sin
tables): blocks move only as wholes and unit ``t`` of a block only ever meets unit ``t`` of
another block. Two blocks are compared by the mean of their position-aligned similarities
(unit ``t`` with unit ``t``). Align assigns blocks against model 0 on those means, identity
inside; zip runs the greedy zip above on the ``(N*G, N*G)`` block similarity and expands the
block labels to units (unit ``t`` of block ``b`` joins merged unit ``label(b) * n/G + t``).
Such a zip need not pair blocks one per model, so its result carries ``block_labels`` (the
merged block of every stacked block) instead of a ``block_pairing``; a group tied to it zips
inside each merged block's set of blocks (every set's blocks acting as the "models").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import linear_sum_assignment

from mudsc_core.errors import InvalidCalibration, SpecError
from mudsc_core.schema.permutation_params import MudscParams

__all__ = [
    "InvalidMatchInput",
    "MATCHERS",
    "Match",
    "Matcher",
    "align_match",
    "zip_match",
    "zip_match_reference",
]

log = logging.getLogger(__name__)

_NEG_INF = -np.inf
# Rows per chunk for row-wise passes over the (O, O) matrix (bounds temporary memory).
_ROW_CHUNK = 512


class InvalidMatchInput(SpecError, ValueError):
    """Shapes or parameters a matcher cannot work with (a bug in the caller or its spec)."""


@dataclass
class Match:
    merge: list[torch.Tensor]  # per model i: (n, m) float32 merge matrix M_i
    unmerge: list[torch.Tensor]  # per model i: (n, m) float32 0/1 unmerge matrix U_i
    score: float  # mean, over merged units of >= 2 units, of their mean pairwise similarity
    block_pairing: torch.Tensor | None  # (N, G) long; None when num_blocks == 1
    index: list[torch.Tensor] | None  # align only: per model (m,) long source unit of merged unit j
    # (N*G,) long merged block of every stacked block; None when num_blocks == 1 (and no whole blocks)
    block_labels: torch.Tensor | None = None
    merged_blocks: int = 1  # number of blocks of the merged group (merged block size = m / merged_blocks)


# --------------------------------------------------------------------------- input checks
def _similarity_array(similarity: torch.Tensor, num_models: int) -> tuple[np.ndarray, int]:
    """Validate and return a private float64 symmetric copy (N*n, N*n) and n."""
    if not isinstance(similarity, torch.Tensor) or similarity.ndim != 2:
        raise InvalidMatchInput("similarity must be a 2-D tensor")
    rows, cols = similarity.shape
    if rows != cols:
        raise InvalidMatchInput(f"similarity must be square, got {tuple(similarity.shape)}")
    if not isinstance(num_models, (int, np.integer)) or num_models < 1:
        raise InvalidMatchInput(f"num_models must be a positive int, got {num_models!r}")
    if rows == 0 or rows % num_models:
        raise InvalidMatchInput(f"similarity size {rows} is not a positive multiple of num_models={num_models}")
    values = similarity.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(values).all():
        raise InvalidCalibration("similarity contains NaN or infinite values", stage="matching")
    # (S + S^T) / 2 is a fresh array (never the caller's memory) and equals S when symmetric.
    symmetric = values + values.T
    symmetric /= 2.0  # in place: no second (N*n, N*n) temporary
    return symmetric, rows // num_models


def _check_blocks(num_blocks: int, n: int) -> int:
    if not isinstance(num_blocks, (int, np.integer)) or num_blocks < 1 or n % num_blocks:
        raise InvalidMatchInput(f"num_blocks={num_blocks!r} must be a positive divisor of the group size {n}")
    return n // num_blocks


def _check_pairing(block_pairing: torch.Tensor, num_models: int, num_blocks: int) -> np.ndarray:
    pairing = block_pairing.detach().cpu().numpy().astype(np.int64)  # (N, G) private copy
    if pairing.shape != (num_models, num_blocks):
        raise InvalidMatchInput(f"block_pairing must have shape {(num_models, num_blocks)}, got {tuple(pairing.shape)}")
    identity = np.arange(num_blocks)
    if not np.array_equal(pairing[0], identity):
        raise InvalidMatchInput("block_pairing[0] must be arange(num_blocks): merged blocks follow model 0")
    for row in pairing:
        if not np.array_equal(np.sort(row), identity):
            raise InvalidMatchInput("every row of block_pairing must be a permutation of the blocks")
    return pairing


def _zip_width(num_units: int, num_models: int, reduce: float | None, alpha: float, budget: float) -> int:
    r = 1.0 - 1.0 / num_models if reduce is None else float(reduce)
    if not np.isfinite(r) or not 0.0 <= r < 1.0:
        raise InvalidMatchInput(f"reduce must be in [0, 1), got {reduce!r}")
    if not np.isfinite(alpha):
        raise InvalidMatchInput(f"alpha must be finite, got {alpha!r}")
    if not np.isfinite(budget) or budget < 0:
        raise InvalidMatchInput(f"budget must be a finite non-negative number, got {budget!r}")
    width = round(num_units * (1.0 - r))
    if width < 1:
        raise InvalidMatchInput(f"reduce={reduce!r} leaves no merged unit out of {num_units}")
    return width


# --------------------------------------------------------------------------- shared helpers
def _assign(block: np.ndarray) -> np.ndarray:
    """Columns maximising the sum of ``block`` (a, a): cols[k] is the partner of row k."""
    cols: np.ndarray
    _, cols = linear_sum_assignment(block, maximize=True)
    return cols


def _pair_blocks(
    sim: np.ndarray, num_models: int, n: int, num_blocks: int
) -> tuple[np.ndarray, dict[tuple[int, int, int], np.ndarray]]:
    """Pair every model's blocks with model 0's blocks.

    Returns the (N, G) pairing and the optimal unit assignment of every scored block pair,
    keyed by (model, block of model 0, block of model i).
    """
    size = n // num_blocks
    pairing = np.empty((num_models, num_blocks), dtype=np.int64)
    pairing[0] = np.arange(num_blocks)
    inner: dict[tuple[int, int, int], np.ndarray] = {}
    for model in range(1, num_models):
        scores = np.empty((num_blocks, num_blocks))  # (G, G) mean assigned similarity
        for a in range(num_blocks):
            rows = slice(a * size, (a + 1) * size)
            for b in range(num_blocks):
                start = model * n + b * size
                block = sim[rows, start : start + size]  # (n/G, n/G)
                cols = _assign(block)
                inner[(model, a, b)] = cols
                scores[a, b] = block[np.arange(size), cols].mean()
        pairing[model] = _assign(scores)
    return pairing, inner


def _block_similarity(sim: np.ndarray, num_models: int, n: int, num_blocks: int) -> np.ndarray:
    """(N*G, N*G): mean over t of the similarity of unit t of one block with unit t of another."""
    size = n // num_blocks
    total = num_models * num_blocks
    blocks = sim.reshape(total, size, total, size)  # (NG, b, NG, b) view
    means: np.ndarray = np.einsum("atbt->ab", blocks) / size
    return means


def _pair_whole_blocks(sim: np.ndarray, num_models: int, n: int, num_blocks: int) -> np.ndarray:
    """(N, G) pairing of every model's blocks with model 0's, scored by position-aligned means."""
    block_sim = _block_similarity(sim, num_models, n, num_blocks)
    pairing = np.empty((num_models, num_blocks), dtype=np.int64)
    pairing[0] = np.arange(num_blocks)
    for model in range(1, num_models):
        pairing[model] = _assign(block_sim[:num_blocks, model * num_blocks : (model + 1) * num_blocks])
    return pairing


def _labels_of_pairing(pairing: np.ndarray) -> np.ndarray:
    """(N*G,) merged block of every stacked block under an (N, G) pairing."""
    num_models, num_blocks = pairing.shape
    labels = np.empty(num_models * num_blocks, dtype=np.int64)
    for model in range(num_models):
        labels[model * num_blocks + pairing[model]] = np.arange(num_blocks)
    return labels


def _check_block_labels(block_labels: torch.Tensor, num_models: int, num_blocks: int) -> np.ndarray:
    labels = block_labels.detach().cpu().numpy().astype(np.int64)  # (N*G,) private copy
    if labels.shape != (num_models * num_blocks,):
        raise InvalidMatchInput(f"block_labels must have shape {(num_models * num_blocks,)}, got {labels.shape}")
    merged = int(labels.max()) + 1 if labels.size else 0
    if labels.min() < 0 or not np.array_equal(np.unique(labels), np.arange(merged)):
        raise InvalidMatchInput("block_labels must label the merged blocks 0..k-1, each at least once")
    return labels


def _cluster_score(sim: np.ndarray, labels: np.ndarray, width: int) -> float:
    """Mean over merged units of >= 2 units of the mean similarity of their constituent pairs."""
    num_units = labels.shape[0]
    counts = np.bincount(labels, minlength=width)
    if not (counts >= 2).any():
        return 0.0
    onehot_t = sparse.csr_matrix(
        (np.ones(num_units), (labels, np.arange(num_units))), shape=(width, num_units)
    )  # (m, O)
    within = np.empty(num_units)  # within[a] = sum of sim[a, b] over b in a's merged unit
    for start in range(0, num_units, _ROW_CHUNK):
        stop = min(start + _ROW_CHUNK, num_units)
        per_unit = onehot_t @ sim[start:stop].T  # (m, chunk): sums over each merged unit
        within[start:stop] = per_unit[labels[start:stop], np.arange(stop - start)]
    pair_sums = np.bincount(labels, weights=within - np.diag(sim), minlength=width)  # (m,)
    multi = counts >= 2
    pair_means = pair_sums[multi] / (counts[multi] * (counts[multi] - 1))
    return float(pair_means.mean())


def _match_from_labels(
    labels: np.ndarray,
    num_models: int,
    width: int,
    score: float,
    device: torch.device,
    block_pairing: np.ndarray | None,
    index: list[np.ndarray] | None,
    block_labels: np.ndarray | None = None,
    merged_blocks: int = 1,
) -> Match:
    """Build per-model U_i and M_i from ``labels`` (O,): the merged unit of each stacked unit."""
    num_units = labels.shape[0]
    n = num_units // num_models
    unmerge = np.zeros((num_units, width), dtype=np.float32)  # (N*n, m)
    unmerge[np.arange(num_units), labels] = 1.0
    counts = unmerge.sum(axis=0, keepdims=True)  # (1, m): constituents of each merged unit
    merge = unmerge / counts  # stacked columns sum to 1

    def per_model(stacked: np.ndarray) -> list[torch.Tensor]:  # (N*n, m) -> N x (n, m)
        return [torch.from_numpy(stacked[i * n : (i + 1) * n].copy()).to(device) for i in range(num_models)]

    return Match(
        merge=per_model(merge),
        unmerge=per_model(unmerge),
        score=score,
        block_pairing=None if block_pairing is None else torch.from_numpy(block_pairing).to(device),
        index=None if index is None else [torch.from_numpy(ix).to(device) for ix in index],
        block_labels=None if block_labels is None else torch.from_numpy(block_labels).to(device),
        merged_blocks=merged_blocks,
    )


# --------------------------------------------------------------------------- align
def align_match(
    similarity: torch.Tensor,
    num_models: int,
    *,
    num_blocks: int = 1,
    block_pairing: torch.Tensor | None = None,
    whole_blocks: bool = False,
) -> Match:
    """Permutation matching against model 0; merged unit j averages one unit of each model.

    ``whole_blocks``: blocks are assigned on their position-aligned mean similarity and keep
    the order of their units (identity inside every paired block).
    """
    sim, n = _similarity_array(similarity, num_models)
    size = _check_blocks(num_blocks, n)
    inner: dict[tuple[int, int, int], np.ndarray]
    if block_pairing is not None:
        pairing, inner = _check_pairing(block_pairing, num_models, num_blocks), {}
    elif whole_blocks:
        pairing, inner = _pair_whole_blocks(sim, num_models, n, num_blocks), {}
    elif num_blocks > 1:
        pairing, inner = _pair_blocks(sim, num_models, n, num_blocks)
    else:
        pairing, inner = np.zeros((num_models, 1), dtype=np.int64), {}

    index = [np.arange(n, dtype=np.int64)]
    for model in range(1, num_models):
        source = np.empty(n, dtype=np.int64)  # (n,) unit of this model feeding merged unit j
        for a in range(num_blocks):
            b = int(pairing[model, a])
            cols = inner.get((model, a, b))
            if whole_blocks:
                cols = np.arange(size)
            elif cols is None:
                start = model * n + b * size
                cols = _assign(sim[a * size : (a + 1) * size, start : start + size])
            source[a * size : (a + 1) * size] = b * size + cols
        index.append(source)

    labels = np.empty(num_models * n, dtype=np.int64)  # merged unit of every stacked unit
    for model, source in enumerate(index):
        labels[model * n + source] = np.arange(n)
    structured = num_blocks > 1
    return _match_from_labels(
        labels,
        num_models,
        n,
        _cluster_score(sim, labels, n),
        similarity.device,
        pairing if structured else None,
        index,
        _labels_of_pairing(pairing) if structured else None,
        num_blocks,
    )


# --------------------------------------------------------------------------- zip: common
def _budgets(num_units: int, width: int, num_models: int, budget: float) -> np.ndarray:
    share = budget * (num_units - width) / num_models
    return np.full(num_models, int(np.floor(share + 1e-4)), dtype=np.int64)


def _fused_row(sim: np.ndarray, p: int, q: int, origin: np.ndarray, alpha: float) -> np.ndarray:
    """Similarity of the fusion of current units p and q to every unit (same arithmetic in both)."""
    row: np.ndarray = np.minimum(sim[p], sim[q])
    if alpha > 0:
        row *= alpha
    else:
        row[(origin == origin[p]) | (origin == origin[q])] = _NEG_INF
    return row


# --------------------------------------------------------------------------- zip: reference
def _zip_labels_reference(sim: np.ndarray, num_models: int, width: int, alpha: float, budget: float) -> np.ndarray:
    """Greedy zip by full rescans and copies: O(n^2) per fusion, O(n^3) overall."""
    num_units = sim.shape[0]
    n = num_units // num_models
    current = sim.copy()  # (k, k) similarity of the k current units, index order
    np.fill_diagonal(current, _NEG_INF)
    origin = np.arange(num_units) // n  # (k,)
    members: list[list[int]] = [[unit] for unit in range(num_units)]
    budgets = _budgets(num_units, width, num_models, budget)
    closed = np.zeros(num_models, dtype=bool)
    for exhausted in np.flatnonzero(budgets <= 0):
        same = origin == exhausted
        current[np.ix_(same, same)] = _NEG_INF
        closed[exhausted] = True

    while current.shape[0] > width:
        rows, cols = np.triu_indices(current.shape[0], 1)
        best = int(np.argmax(current[rows, cols]))  # first maximum in row-major order = tie rule
        p, q = int(rows[best]), int(cols[best])
        row = _fused_row(current, p, q, origin, alpha)
        current[p, :] = row
        current[:, p] = row
        members[p].extend(members.pop(q))
        same_model = origin[p] == origin[q]
        current = np.delete(np.delete(current, q, axis=0), q, axis=1)
        origin = np.delete(origin, q)
        if same_model:
            model = int(origin[p])
            budgets[model] -= 1
            if budgets[model] <= 0 and not closed[model]:
                same = origin == model
                current[np.ix_(same, same)] = _NEG_INF
                closed[model] = True

    labels = np.empty(num_units, dtype=np.int64)
    for merged, constituents in enumerate(members):
        labels[constituents] = merged
    return labels


# --------------------------------------------------------------------------- zip: fast
def _row_bests(sim: np.ndarray, live: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact best partner of each of ``rows`` (R,) among live units of larger index.

    Returns the best similarity (R,) and the smallest index attaining it (R,); when a row's
    best is -inf that is its first live successor (the tie rule), or -1 if it has none.
    """
    columns = np.arange(sim.shape[1])
    values = sim[rows]  # (R, O) copy; entries of dead units are stale, masked here
    values[(columns[None, :] <= rows[:, None]) | ~live[None, :]] = _NEG_INF
    partner = values.argmax(axis=1)  # first maximum = smallest index
    best = values[np.arange(rows.shape[0]), partner]
    closed = best == _NEG_INF
    if closed.any():
        candidates = live[None, :] & (columns[None, :] > rows[closed][:, None])
        partner[closed] = np.where(candidates.any(axis=1), candidates.argmax(axis=1), -1)
    return best, partner


def _best_after(values: np.ndarray, live: np.ndarray, row: int) -> tuple[float, int]:
    """``_row_bests`` of one row given its (O,) values: best over live units of index > ``row``."""
    tail = np.where(live[row + 1 :], values[row + 1 :], _NEG_INF)  # (O - row - 1,)
    if tail.shape[0] == 0:
        return _NEG_INF, -1
    offset = int(tail.argmax())  # first maximum = smallest index
    best = float(tail[offset])
    if best == _NEG_INF:
        successors = np.flatnonzero(live[row + 1 :])
        return best, (row + 1 + int(successors[0])) if successors.shape[0] else -1
    return best, row + 1 + offset


def _zip_labels_fast(sim: np.ndarray, num_models: int, width: int, alpha: float, budget: float) -> np.ndarray:
    """Greedy zip with per-row best partners and lazy invalidation: O(n) per fusion on average.

    Units keep their original positions (a fused unit keeps p's, which is its index); the
    rows and columns of dead units are left stale and masked with ``live``. For every live
    row r, ``best[r]`` is the maximum of ``sim[r, u]`` over live ``u > r`` and ``partner[r]``
    its smallest arg -- exactly when ``dirty[r]`` is False, otherwise ``best[r]`` is only an
    upper bound (the row lost its best entry or had entries lowered). The pair to fuse is the
    first row with the largest ``best`` (the tie rule); a dirty row found there is recomputed
    and the choice retried, which is exact because no other row can beat an upper bound it
    does not exceed. After fusing q into p only these rows change: p itself (recomputed),
    rows r < p (entry p changed: a raise is applied at once, the loss of the best entry
    makes the row dirty), rows p < r < q whose partner was q, and the rows of a model whose
    budget just closed (entries only lowered: dirty).
    """
    num_units = sim.shape[0]
    n = num_units // num_models
    current = sim.copy()  # (O, O) similarity; row/column p rewritten at each fusion
    np.fill_diagonal(current, _NEG_INF)
    origin = np.arange(num_units) // n  # (O,) fixed: a unit's index never changes
    live = np.ones(num_units, dtype=bool)
    owner = np.arange(num_units)  # (O,) current unit holding each original unit
    budgets = _budgets(num_units, width, num_models, budget)
    closed = np.zeros(num_models, dtype=bool)
    for exhausted in np.flatnonzero(budgets <= 0):
        block = slice(exhausted * n, (exhausted + 1) * n)
        current[block, block] = _NEG_INF
        closed[exhausted] = True

    best = np.empty(num_units)  # (O,) best (or upper bound) over live partners of larger index
    partner = np.empty(num_units, dtype=np.int64)  # (O,) its smallest index, -1 if none
    dirty = np.zeros(num_units, dtype=bool)  # (O,) best[r] is only an upper bound
    for start in range(0, num_units, _ROW_CHUNK):
        rows = np.arange(start, min(start + _ROW_CHUNK, num_units))
        best[rows], partner[rows] = _row_bests(current, live, rows)

    fallback_logged = False
    for _ in range(num_units - width):
        while True:
            p = int(np.argmax(best))
            if best[p] == _NEG_INF or not dirty[p]:
                break
            best[p], partner[p] = _best_after(current[p], live, p)
            dirty[p] = False
        if best[p] == _NEG_INF:
            # Every remaining pair is closed: the first pair in tie-rule order.
            p, q = (int(u) for u in np.flatnonzero(live)[:2])
            if not fallback_logged:
                log.debug("zip: all similarities closed before width %d; fusing in index order", width)
                fallback_logged = True
        else:
            q = int(partner[p])

        row = _fused_row(current, p, q, origin, alpha)
        current[p, :] = row
        current[:, p] = row
        live[q] = False
        owner[owner == q] = p
        best[q], partner[q], dirty[q] = _NEG_INF, -1, False

        if origin[p] == origin[q]:
            model = int(origin[p])
            budgets[model] -= 1
            if budgets[model] <= 0 and not closed[model]:
                block = slice(model * n, (model + 1) * n)
                current[block, block] = _NEG_INF
                closed[model] = True
                dirty[block] |= live[block]

        # Rows r < p: entry p changed (read from row p: the matrix is symmetric), q is gone.
        row = current[p]  # (O,) view, closed pairs included
        entry = row[:p]  # (p,)
        head_best, head_partner, head_dirty = best[:p], partner[:p], dirty[:p]  # views
        raised = live[:p] & ((entry > head_best) | (~head_dirty & (entry == head_best) & (p < head_partner)))
        lost = ~raised & ~head_dirty & ((head_partner == q) | ((head_partner == p) & (entry < head_best)))
        head_best[raised] = entry[raised]
        head_partner[raised] = p
        head_dirty[raised] = False
        head_dirty[lost] = True
        # Rows p < r < q whose best partner was q (p is not a candidate for them).
        dirty[p + 1 : q] |= partner[p + 1 : q] == q

        best[p], partner[p] = _best_after(row, live, p)
        dirty[p] = False

    survivors = np.flatnonzero(live)  # merged units in index order
    rank = np.empty(num_units, dtype=np.int64)
    rank[survivors] = np.arange(survivors.shape[0])
    return rank[owner]


# --------------------------------------------------------------------------- zip: entry points
def zip_match(
    similarity: torch.Tensor,
    num_models: int,
    *,
    reduce: float | None = None,
    alpha: float = 0.5,
    budget: float = 1.0,
    num_blocks: int = 1,
    block_pairing: torch.Tensor | None = None,
    whole_blocks: bool = False,
    block_labels: torch.Tensor | None = None,
) -> Match:
    """Greedy ZipIt!-style fusion (see the module docstring for the exact definition).

    ``block_pairing`` (N, G) or, when it is None, ``block_labels`` (N*G,) give the block sets
    of a tied group; ``whole_blocks`` zips whole blocks on their position-aligned similarity.
    """
    sim, n = _similarity_array(similarity, num_models)
    num_units = num_models * n
    width = _zip_width(num_units, num_models, reduce, alpha, budget)
    size = _check_blocks(num_blocks, n)
    if whole_blocks or (block_pairing is None and block_labels is not None):
        return _zip_block_sets(
            sim, num_models, n, num_blocks, reduce, alpha, budget, whole_blocks, block_pairing, block_labels, similarity
        )
    if num_blocks == 1:
        labels = _zip_labels_fast(sim, num_models, width, alpha, budget)
        score = _cluster_score(sim, labels, width)
        return _match_from_labels(labels, num_models, width, score, similarity.device, None, None)

    if width % num_blocks:
        raise InvalidMatchInput(f"merged width {width} is not divisible by num_blocks={num_blocks}")
    if block_pairing is not None:
        pairing = _check_pairing(block_pairing, num_models, num_blocks)
    else:
        pairing, _ = _pair_blocks(sim, num_models, n, num_blocks)
    block_width = width // num_blocks
    labels = np.empty(num_units, dtype=np.int64)
    for g in range(num_blocks):
        # Stacked indices of the paired block set, model-major: (N * n/G,)
        units = np.concatenate([model * n + pairing[model, g] * size + np.arange(size) for model in range(num_models)])
        set_labels = _zip_labels_fast(sim[np.ix_(units, units)], num_models, block_width, alpha, budget)
        labels[units] = g * block_width + set_labels
    score = _cluster_score(sim, labels, width)
    return _match_from_labels(
        labels, num_models, width, score, similarity.device, pairing, None, _labels_of_pairing(pairing), num_blocks
    )


def _zip_block_sets(
    sim: np.ndarray,
    num_models: int,
    n: int,
    num_blocks: int,
    reduce: float | None,
    alpha: float,
    budget: float,
    whole_blocks: bool,
    block_pairing: torch.Tensor | None,
    block_labels: torch.Tensor | None,
    similarity: torch.Tensor,
) -> Match:
    """Zip of whole blocks, or zip inside given block sets (a group tied to a whole-block zip)."""
    size = n // num_blocks
    pairing: np.ndarray | None = None
    if block_pairing is not None:
        pairing = _check_pairing(block_pairing, num_models, num_blocks)
        labels_of_blocks = _labels_of_pairing(pairing)
    elif block_labels is not None:
        labels_of_blocks = _check_block_labels(block_labels, num_models, num_blocks)
    else:  # whole blocks, nothing given: zip the (N*G, N*G) block similarity
        total = num_models * num_blocks
        block_width = _zip_width(total, num_models, reduce, alpha, budget)
        block_sim = _block_similarity(sim, num_models, n, num_blocks)
        labels_of_blocks = _zip_labels_fast(block_sim, num_models, block_width, alpha, budget)
    merged_blocks = int(labels_of_blocks.max()) + 1
    sets = [np.flatnonzero(labels_of_blocks == g) for g in range(merged_blocks)]  # stacked blocks, model-major
    offsets = np.arange(size)
    labels = np.empty(num_models * n, dtype=np.int64)
    if whole_blocks:
        unit_width = size
        for g, blocks in enumerate(sets):
            for block in blocks:
                model, b = divmod(int(block), num_blocks)
                labels[model * n + b * size + offsets] = g * size + offsets
    else:
        unit_width = _zip_width(num_models * size, num_models, reduce, alpha, budget)
        smallest = min(len(blocks) for blocks in sets) * size
        if unit_width > smallest:
            raise InvalidMatchInput(f"a merged block of {smallest} units cannot keep {unit_width} units")
        for g, blocks in enumerate(sets):
            units = np.concatenate(
                [(block // num_blocks) * n + (block % num_blocks) * size + offsets for block in blocks]
            )  # (k * n/G,) stacked units of the set
            set_labels = _zip_labels_fast(sim[np.ix_(units, units)], len(blocks), unit_width, alpha, budget)
            labels[units] = g * unit_width + set_labels
    width = merged_blocks * unit_width
    score = _cluster_score(sim, labels, width)
    return _match_from_labels(
        labels, num_models, width, score, similarity.device, pairing, None, labels_of_blocks, merged_blocks
    )


def zip_match_reference(
    similarity: torch.Tensor,
    num_models: int,
    *,
    reduce: float | None = None,
    alpha: float = 0.5,
    budget: float = 1.0,
) -> Match:
    """The greedy zip by its definition (full rescan and copy per fusion); for tests and benches."""
    sim, n = _similarity_array(similarity, num_models)
    width = _zip_width(num_models * n, num_models, reduce, alpha, budget)
    labels = _zip_labels_reference(sim, num_models, width, alpha, budget)
    score = _cluster_score(sim, labels, width)
    return _match_from_labels(labels, num_models, width, score, similarity.device, None, None)


# --------------------------------------------------------------------------- registry
class Matcher(Protocol):
    """A matcher as the MuDSC iteration calls it: the group's similarity and the method's knobs in, a Match out."""

    def __call__(
        self,
        similarity: torch.Tensor,
        num_models: int,
        params: MudscParams,
        *,
        num_blocks: int,
        block_pairing: torch.Tensor | None,
        whole_blocks: bool = False,
        block_labels: torch.Tensor | None = None,
    ) -> Match: ...


def _align(
    similarity: torch.Tensor,
    num_models: int,
    params: MudscParams,
    *,
    num_blocks: int,
    block_pairing: torch.Tensor | None,
    whole_blocks: bool = False,
    block_labels: torch.Tensor | None = None,
) -> Match:
    return align_match(
        similarity, num_models, num_blocks=num_blocks, block_pairing=block_pairing, whole_blocks=whole_blocks
    )


def _zip(
    similarity: torch.Tensor,
    num_models: int,
    params: MudscParams,
    *,
    num_blocks: int,
    block_pairing: torch.Tensor | None,
    whole_blocks: bool = False,
    block_labels: torch.Tensor | None = None,
) -> Match:
    return zip_match(
        similarity,
        num_models,
        reduce=params.reduce,
        alpha=params.alpha,
        budget=params.budget,
        num_blocks=num_blocks,
        block_pairing=block_pairing,
        whole_blocks=whole_blocks,
        block_labels=block_labels,
    )


# One entry per value of ``MudscParams.mode``.
MATCHERS: dict[str, Matcher] = {"align": _align, "zip": _zip}
