"""The MuDSC iteration and the construction of the merged state dict.

matcher (align | zip) x similarity (weight, activation, dual with beta) x iteration
(one pass | seeded coordinate ascent over unit groups). Every named method of the paper's
comparisons is a configuration of :class:`~mudsc_core.schema.methods.MudscParams`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mudsc_core.errors import SpecError
from mudsc_core.permutation.matching import MATCHERS, Match
from mudsc_core.permutation.permute import expand_index, expand_matrix
from mudsc_core.permutation.similarity import Correspondence, UnitMap, dual_similarity, weight_similarity
from mudsc_core.permutation.spec import PermSpec
from mudsc_core.progress import StageProgress
from mudsc_core.schema.permutation_params import MudscParams

log = logging.getLogger(__name__)

# Largest total size of the dual similarities find_correspondences keeps between sweeps (the cache of
# unchanged groups); counted by memory.estimate_merge_memory.
SIMILARITY_CACHE_BYTES = 1 << 30


@dataclass
class MatchingOutcome:
    correspondences: dict[str, Correspondence]
    group_scores: dict[str, float]
    objective_per_sweep: list[float] = field(default_factory=list)
    sweeps: int = 0


def match_clusters(spec: PermSpec) -> list[list[str]]:
    """Groups matched together: a root group first, then the groups whose block pairing is tied to it."""
    clusters: dict[str, list[str]] = {}
    for name in spec.group_order():
        clusters.setdefault(spec.block_tie_root(name), [])
    for name in spec.group_order():
        root = spec.block_tie_root(name)
        if name != root:
            clusters[root].append(name)
    for root, members in clusters.items():
        members.insert(0, root)
    return list(clusters.values())


def pair_score(correspondence: Correspondence, similarity: Tensor) -> float:
    """Mean, over merged units made of >= 2 units, of the mean similarity over their pairs.

    With U = the stacked unmerge matrices (N*n, m) and S the similarity, merged unit g totals
    sum_{u,v} U_ug U_vg S_uv - sum_u U_ug S_uu over its members' ordered pairs. A unit feeds one merged
    unit, so U is read by index (:class:`~mudsc_core.permutation.similarity.UnitMap`: each merged unit's
    members) and only the members' entries of S are read: O(m K^2) for K members at most, not the
    O(m (N n)^2) of forming U^T S U, which dominated the matching of wide groups.
    """
    unmerge = torch.cat(correspondence.unmerge, dim=0)  # (N*n, m)
    members = UnitMap.from_matrix(unmerge)
    if members is None:  # a unit in several merged units: the definition, densely
        dense, sim = unmerge.to(torch.float64).T, similarity.to(torch.float64)
        counts = dense.sum(dim=1)
        totals = ((dense @ sim) * dense).sum(dim=1) - dense @ torch.diagonal(sim)
    else:
        index, weight = members.sources.T, members.weights.T.to(torch.float64)  # (m, K), 0-weight padding
        counts = weight.sum(dim=1)
        diag = torch.diagonal(similarity).to(torch.float64)
        totals = torch.empty(members.width, dtype=torch.float64)
        step = max(1, (1 << 24) // max(1, index.shape[1]) ** 2)  # merged units per chunk: bounded temporaries
        for start in range(0, members.width, step):
            idx, w = index[start : start + step], weight[start : start + step]
            block = similarity[idx[:, :, None], idx[:, None, :]].to(torch.float64)  # (chunk, K, K)
            totals[start : start + step] = (block * w[:, :, None] * w[:, None, :]).sum(dim=(1, 2)) - (
                w * diag[idx]
            ).sum(1)
    pairs = counts * (counts - 1)
    merged = pairs > 0
    if not bool(merged.any()):
        return 0.0
    return float((totals[merged] / pairs[merged]).mean())


def space_scores(
    states: Sequence[Mapping[str, Tensor]],
    spec: PermSpec,
    correspondences: Mapping[str, Correspondence],
    activation_sims: Mapping[str, Tensor] | None,
) -> dict[str, dict[str, float | None]]:
    """Per group, the final matching scored in each space separately, and where the spaces disagree.

    ``weight`` / ``activation``: :func:`pair_score` of the final correspondence on the weight similarity
    (built from the other groups' final correspondences) and on the activation correlation. ``disagreement``:
    the fraction of model i's units (i >= 1) whose most similar unit of model 0 is another one in weight space
    than in activation space (the MuDSC paper's point: the two spaces pick different partners).
    """
    out: dict[str, dict[str, float | None]] = {}
    for group, correspondence in correspondences.items():
        weight = weight_similarity(states, spec, group, correspondences)
        activation = activation_sims.get(group) if activation_sims else None
        entry: dict[str, float | None] = {"weight": pair_score(correspondence, weight), "activation": None}
        entry["disagreement"] = None
        if activation is not None:
            entry["activation"] = pair_score(correspondence, activation)
            n = weight.shape[0] // len(states)
            differ = [
                float(
                    (weight[i * n : (i + 1) * n, :n].argmax(1) != activation[i * n : (i + 1) * n, :n].argmax(1))
                    .float()
                    .mean()
                )
                for i in range(1, len(states))
            ]
            entry["disagreement"] = sum(differ) / len(differ) if differ else None
        out[group] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in entry.items()}
    return out


def _identity(num_models: int, size: int, blocks: int = 1) -> Correspondence:
    eye = torch.eye(size)
    return Correspondence(
        merge=[eye / num_models] * num_models,
        unmerge=[eye] * num_models,
        index=[torch.arange(size)] * num_models,
        blocks=blocks,
    )


def _from_match(match: Match) -> Correspondence:
    return Correspondence(merge=match.merge, unmerge=match.unmerge, index=match.index, blocks=match.merged_blocks)


@dataclass
class _Blocks:
    """The block structure a tied group inherits from its root's match (None for the root itself)."""

    pairing: Tensor | None = None
    labels: Tensor | None = None

    def update(self, match: Match) -> None:
        self.pairing, self.labels = match.block_pairing, match.block_labels


def _run_matcher(
    params: MudscParams, similarity: Tensor, num_models: int, spec: PermSpec, group: str, blocks: _Blocks
) -> Match:
    unit_group = spec.groups[group]
    return MATCHERS[params.mode](
        similarity,
        num_models,
        params,
        num_blocks=unit_group.num_blocks,
        block_pairing=blocks.pairing,
        whole_blocks=unit_group.whole_blocks,
        block_labels=blocks.labels,
    )


def find_correspondences(
    states: Sequence[Mapping[str, Tensor]],
    spec: PermSpec,
    params: MudscParams,
    activation_sims: Mapping[str, Tensor] | None,
    progress: StageProgress | None = None,
) -> MatchingOutcome:
    """Initial activation matching, then seeded coordinate ascent over unit groups."""
    num_models = len(states)
    clusters = match_clusters(spec)
    if params.beta == "auto":
        raise ValueError('beta "auto" is resolved by merge() before matching (permutation.auto_beta)')
    beta = params.beta if activation_sims else 1.0
    if not params.match:
        correspondences = {
            g: _identity(num_models, spec.groups[g].size, spec.groups[g].num_blocks) for g in spec.groups
        }
        return MatchingOutcome(correspondences, {g: 0.0 for g in spec.groups})

    # A group's weight similarity depends only on the correspondences of the groups on the other axes of
    # its tensors: it is rebuilt only when one of those changed (by identity; an unchanged match keeps its
    # Correspondence object), and a matcher run on the same similarity and block inputs is not repeated.
    # The similarities kept are bounded by SIMILARITY_CACHE_BYTES (oldest first out): wide groups' (N*n)^2
    # matrices are not all held at once; the other caches name a similarity by its version, not the tensor.
    depends = {g: _weight_dependencies(spec, g) for g in spec.groups}
    similarities: dict[str, tuple[tuple[Correspondence | None, ...], Tensor, int]] = {}
    matches: dict[str, tuple[int, Tensor | None, Tensor | None, Match, Correspondence]] = {}
    pair_scores: dict[str, tuple[Correspondence, int, float]] = {}
    versions = iter(range(1 << 62))

    def similarity(group: str, current: Mapping[str, Correspondence]) -> tuple[Tensor, int]:
        """S = beta * S_weight + (1 - beta) * S_act, S_weight from the others' current correspondences, and
        its version (the same version: the same matrix)."""
        key = tuple(current.get(g) for g in depends[group])
        cached = similarities.get(group)
        if cached is not None and all(a is b for a, b in zip(cached[0], key, strict=True)):
            return cached[1], cached[2]
        similarities.pop(group, None)
        act = activation_sims.get(group) if activation_sims else None
        sim = dual_similarity(weight_similarity(states, spec, group, current), act, beta if act is not None else 1.0)
        version = next(versions)
        size = sim.numel() * sim.element_size()
        while similarities and size + sum(v[1].numel() * v[1].element_size() for v in similarities.values()) > (
            SIMILARITY_CACHE_BYTES
        ):
            similarities.pop(next(iter(similarities)))
        if size <= SIMILARITY_CACHE_BYTES:
            similarities[group] = (key, sim, version)
        return sim, version

    def score(group: str, current: Mapping[str, Correspondence]) -> float:
        sim, version = similarity(group, current)
        cached = pair_scores.get(group)
        if cached is not None and cached[0] is current[group] and cached[1] == version:
            return cached[2]
        value = pair_score(current[group], sim)
        pair_scores[group] = (current[group], version, value)
        return value

    def match_cluster(cluster: list[str], current: dict[str, Correspondence]) -> None:
        blocks = _Blocks()  # a tied group reuses its root's head pairing
        for group in cluster:
            sim, version = similarity(group, current)
            cached = matches.get(group)
            if (
                cached is not None
                and cached[0] == version
                and cached[1] is blocks.pairing
                and cached[2] is blocks.labels
            ):
                match, correspondence = cached[3], cached[4]
            else:
                match = _run_matcher(params, sim, num_models, spec, group, blocks)
                correspondence = _from_match(match)
                previous = current.get(group)
                if previous is not None and _same_correspondence(previous, correspondence):
                    correspondence = previous
                matches[group] = (version, blocks.pairing, blocks.labels, match, correspondence)
            del sim
            blocks.update(match)
            current[group] = correspondence

    current: dict[str, Correspondence] = {}
    scores: dict[str, float] = {}
    steps_done = 0
    if activation_sims:
        # Initial correspondences: every group matched on its activation similarity alone.
        for cluster in clusters:
            blocks = _Blocks()
            for group in cluster:
                sim = activation_sims.get(group)
                if sim is None:
                    continue
                match = _run_matcher(params, sim, num_models, spec, group, blocks)
                blocks.update(match)
                current[group] = _from_match(match)
                scores[group] = pair_score(current[group], sim)
            steps_done += 1
            if progress:
                progress(steps_done / (len(clusters) * (2 if params.iterate else 1)), f"initial matching {cluster[0]}")
    if beta == 0.0:  # activation space only: the initial matching is the answer
        missing = [g for g in spec.groups if g not in current]
        if missing:
            raise SpecError(f"groups {missing} have no activation site; they need weight matching (beta > 0)")
        return MatchingOutcome(current, scores, [_mean(scores)], 1)

    # iterate=False: one pass over the groups with the dual (or weight) similarity.
    max_sweeps = params.max_sweeps if params.iterate else 1
    rng = random.Random(params.seed)
    best = (float("-inf"), dict(current), dict(scores))
    history: list[float] = []
    stale = 0
    for sweep in range(max_sweeps):
        order = list(clusters)
        rng.shuffle(order)
        for position, cluster in enumerate(order):
            match_cluster(cluster, current)
            if progress:
                progress(
                    min(0.99, 0.5 + 0.5 * (sweep + (position + 1) / len(order)) / max_sweeps),
                    f"sweep {sweep + 1}, group {cluster[0]}",
                )
        # Objective of this sweep's final correspondences, each group scored on the similarity
        # built from the others' final state (not the stale value from when it was matched).
        scores = {g: score(g, current) for g in spec.groups}
        objective = _mean(scores)
        history.append(objective)
        log.debug("sweep %d objective %.6f", sweep + 1, objective)
        if objective > best[0]:
            best = (objective, dict(current), dict(scores))
            stale = 0
        else:
            stale += 1
            if stale >= params.patience:
                break
    return MatchingOutcome(best[1], best[2], history, len(history))


def _weight_dependencies(spec: PermSpec, group: str) -> tuple[str, ...]:
    """The groups whose correspondences :func:`weight_similarity` of ``group`` reads (the other unit axes)."""
    found: dict[str, None] = {}
    for param, axis, _start, _segment in spec.segments_of(group):
        for other_axis, axis_spec in enumerate(spec.axes[param]):
            if other_axis != axis and axis_spec is not None:
                found.update((seg.group, None) for seg in axis_spec)
    return tuple(found)


def _same_correspondence(a: Correspondence, b: Correspondence) -> bool:
    """Whether two correspondences hold the same matrices (and indices, and block count)."""

    def same(x: Sequence[Tensor] | None, y: Sequence[Tensor] | None) -> bool:
        if x is None or y is None:
            return x is y
        return len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y, strict=True))

    return a.blocks == b.blocks and same(a.unmerge, b.unmerge) and same(a.merge, b.merge) and same(a.index, b.index)


def _mean(values: Mapping[str, float]) -> float:
    return sum(values.values()) / max(len(values), 1)


# --------------------------------------------------------------------------- building
AxisSegment = tuple[int, int, Tensor | None, Tensor | None, float]  # start, stop, index, matrix, scale
AxisPlan = list[tuple[int, list[AxisSegment]]]


def _plan(
    spec: PermSpec,
    param: str,
    model: int,
    num_models: int,
    correspondences: Mapping[str, Correspondence],
    only: frozenset[str] | None = None,
) -> AxisPlan:
    """Per unit axis of ``param``: segments (start, stop, align index, dense matrix, scale).

    ``only``: map the segments of these groups, leave the others' entries as they are (partial zip).

    Out axes go through the merge matrix M_i, in axes through the unmerge matrix U_i. For
    align both are one-hot (M_i = P_i / N), so the map is a gather by index (times 1/N on
    the out axis), never a dense matmul. A segment carrying its group ``expand`` times per
    block is gathered with the expanded index, or mapped by the matrix block-diagonal per copy.
    """
    plan: AxisPlan = []
    for axis, axis_spec in enumerate(spec.axes[param]):
        if axis_spec is None:
            continue
        segments: list[AxisSegment] = []
        offset = 0
        for seg in axis_spec:
            out = seg.role == "out"
            if only is not None and seg.group not in only:
                segments.append((offset, offset + seg.length, None, None, 1.0))
                offset += seg.length
                continue
            corr = correspondences[seg.group]
            group = spec.groups[seg.group]
            if corr.index is not None:
                index = expand_index(corr.index[model], group.block_size, seg.expand)
                segments.append((offset, offset + seg.length, index, None, 1.0 / num_models if out else 1.0))
            else:
                matrix = corr.merge[model] if out else corr.unmerge[model]
                matrix = expand_matrix(matrix, group.num_blocks, corr.blocks, seg.expand)
                segments.append((offset, offset + seg.length, None, matrix, 1.0))
            offset += seg.length
        plan.append((axis, segments))
    return plan


def _map_param(tensor: Tensor, plan: AxisPlan) -> Tensor:
    for axis, segments in plan:
        pieces = []
        for start, stop, index, matrix, scale in segments:
            piece = tensor.narrow(axis, start, stop - start)
            if index is not None:
                piece = piece.index_select(axis, index.to(piece.device))
            elif matrix is not None:
                piece = torch.tensordot(piece.movedim(axis, -1), matrix.to(piece), dims=1).movedim(-1, axis)
            pieces.append(piece * scale if scale != 1.0 else piece)
        tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=axis)
    return tensor


def build_merged_state(
    states: Sequence[Mapping[str, Tensor]],
    spec: PermSpec,
    correspondences: Mapping[str, Correspondence],
    heads: str = "shared",
    params: Collection[str] | None = None,
) -> dict[str, Tensor]:
    """W* = sum_i M_i^T W_i U_i for every covered tensor (of ``params`` only, without the excluded
    bookkeeping entries, when given: a partial zip's trunk).

    A tensor with no out unit axis (the head: its rows are the label space) has no merge
    matrix to carry the average, so its mapped copies are averaged (heads='shared') or
    stacked along the label axis (heads='separate': every model's head, logits concatenated).
    """
    num_models = len(states)
    merged: dict[str, Tensor] = {}
    for param, axes in spec.axes.items():
        if params is not None and param not in params:
            continue
        out_axes = sum(1 for a in axes if a and any(seg.role == "out" for seg in a))
        if out_axes > 1:
            raise SpecError(f"{param}: more than one out axis carries unit groups")
        mapped = [
            _map_param(state[param], _plan(spec, param, i, num_models, correspondences))
            for i, state in enumerate(states)
        ]
        if out_axes == 1:
            merged[param] = torch.stack(mapped).sum(dim=0)
        elif heads == "separate" and param in spec.head_params:
            merged[param] = torch.cat(mapped, dim=0)
        else:
            merged[param] = torch.stack(mapped).mean(dim=0)
    for name in spec.excluded if params is None else ():
        if name in states[0]:
            merged[name] = states[0][name].clone()
    return merged
