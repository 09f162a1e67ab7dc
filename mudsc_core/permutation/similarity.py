"""Unit similarities: activation correlation, weight correlation, and their dual-space mix.

Every similarity is an (N*n, N*n) matrix over the stacked units of N models (rows
[i*n:(i+1)*n] are model i's units). Correlations are Pearson; a unit with no variance
correlates 0 with everything (never NaN).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from mudsc_core.errors import ComputeOverflow, SpecError, UnsupportedArchitecture
from mudsc_core.permutation.permute import expand_matrix
from mudsc_core.permutation.spec import ActivationSite, PermSpec

_DEAD_STD = 1e-12


class CorrelationAccumulator:
    """Streaming Pearson correlation of U units over samples, in float64 with a shift.

    The shift (the first batch's mean) keeps the one-pass second-moment formula stable:
    cov = E[(x-c)(x-c)^T] - (E[x]-c)(E[x]-c)^T loses no precision when c is near the mean.
    """

    def __init__(self) -> None:
        self.count = 0
        self.shift: Tensor | None = None
        self.sum: Tensor | None = None  # (U,)
        self.outer: Tensor | None = None  # (U, U)

    def update(self, features: Tensor) -> None:
        """features: (U, S) — U units, S samples."""
        x = features.detach().to(torch.float64)
        if self.shift is None:
            self.shift = x.mean(dim=1)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
        assert self.sum is not None and self.outer is not None  # set together with ``shift``
        x = x - self.shift[:, None]
        self.sum += x.sum(dim=1)
        self.outer += x @ x.T
        self.count += x.shape[1]

    def correlation(self) -> Tensor:
        if self.count == 0 or self.outer is None or self.sum is None:
            raise ValueError("no samples accumulated")
        mean = self.sum / self.count
        cov = self.outer / self.count - torch.outer(mean, mean)
        return covariance_to_correlation(cov)


def covariance_to_correlation(cov: Tensor) -> Tensor:
    variance = torch.diagonal(cov).clamp_min(0)
    std = variance.sqrt()
    dead = std <= _DEAD_STD * max(float(std.max()) if std.numel() else 0.0, 1.0)
    safe = torch.where(dead, torch.ones_like(std), std)
    corr = cov / torch.outer(safe, safe)
    corr[dead, :] = 0.0
    corr[:, dead] = 0.0
    corr = corr.clamp(-1.0, 1.0)
    torch.diagonal(corr)[:] = (~dead).to(corr.dtype)
    return corr


def row_correlation(features: Tensor) -> Tensor:
    """Pearson correlation between rows of (U, F) features; constant rows correlate 0."""
    x = features.to(torch.float64)
    x = x - x.mean(dim=1, keepdim=True)
    cov = x @ x.T / max(x.shape[1], 1)
    return covariance_to_correlation(cov)


# --------------------------------------------------------------------------- activations
def _site_features(site: ActivationSite | None, tensor: Tensor) -> Tensor:
    """Tensor at a site -> (units, samples): unit axis first, every other position a sample."""
    assert site is not None  # callers keep only groups with a site
    units_first = tensor.movedim(site.unit_dim, 0)
    if site.segments:
        units_first = torch.cat([units_first[start:stop] for start, stop in site.segments], dim=1)
    return units_first.reshape(units_first.shape[0], -1)


class _SiteTracer(fx.Tracer):
    """torch.fx's tracer, remembering the graph nodes of each named module call's input and output.

    A leaf module (``nn.Linear``) is one ``call_module`` node; a composite one (a residual block) is
    traced through, and its input and output are the nodes its forward received and returned. A
    module called more than once keeps its last call.
    """

    def __init__(self, site_modules: set[str]) -> None:
        super().__init__()
        self.site_modules = site_modules
        self.boundaries: dict[str, tuple[fx.Node, fx.Node]] = {}

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        result = super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        if name in self.site_modules and args and isinstance(args[0], fx.Proxy) and isinstance(result, fx.Proxy):
            self.boundaries[name] = (args[0].node, result.node)
        return result


def activation_taps(model: nn.Module, spec: PermSpec, groups: Sequence[str]) -> fx.GraphModule:
    """The model's captured graph, returning the tensor at each group's activation site instead of its outputs.

    One mechanism for every architecture: a site names a module call of the graph (its input or output).
    Nodes that no site needs (the head after the last site, say) are dropped, so a calibration pass
    computes only what the statistics use.
    """
    tracer = _SiteTracer({site.module for g in groups if (site := spec.groups[g].activation) is not None})
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, ... for what it cannot follow
        raise UnsupportedArchitecture(f"cannot capture the forward pass of {type(model).__name__}: {exc}") from exc
    taps: dict[str, fx.Node] = {}
    for name in groups:
        site = spec.groups[name].activation
        boundary = tracer.boundaries.get(site.module) if site is not None else None
        if site is None or boundary is None:
            raise SpecError(
                f"group {name}: activation site {getattr(site, 'module', None)!r} is not a module call "
                f"of {type(model).__name__}'s forward"
            )
        taps[name] = boundary[1] if site.io == "output" else boundary[0]
    output = next(node for node in graph.nodes if node.op == "output")
    output.args = (taps,)
    graph_module = fx.GraphModule(model, graph)
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
    return graph_module


def activation_correlations(
    models: Sequence[nn.Module],
    spec: PermSpec,
    batches: Iterable[Tensor],
    progress: Callable[[float], None] | None = None,
    num_batches: int | None = None,
) -> dict[str, Tensor]:
    """Pearson correlation of every group's stacked units over the calibration inputs."""
    groups = [g for g in spec.group_order() if spec.groups[g].activation is not None]
    sites = {g: spec.groups[g].activation for g in groups}
    taps = [activation_taps(model, spec, groups) for model in models]
    accumulators = {g: CorrelationAccumulator() for g in groups}
    with torch.no_grad():
        for index, batch in enumerate(batches):
            per_model = [{g: _site_features(sites[g], t) for g, t in tap(batch).items()} for tap in taps]
            for model_index, features in enumerate(per_model):
                for g, values in features.items():
                    if not bool(torch.isfinite(values).all()):  # the inputs are checked finite: the weights did it
                        raise ComputeOverflow(
                            f"model {model_index}: activations of group {g} overflow float32 on the calibration "
                            "inputs (weights too large for the model's forward pass)"
                        )
            for g in groups:
                accumulators[g].update(torch.cat([features[g] for features in per_model], dim=0))
            if progress is not None and num_batches:
                progress((index + 1) / num_batches)
    return {g: acc.correlation() for g, acc in accumulators.items()}


# --------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class Correspondence:
    """One group's current correspondence: per model, unmerge U_i (n, m) and merge M_i (n, m)."""

    merge: list[Tensor]
    unmerge: list[Tensor]
    index: list[Tensor] | None = None  # align: per model (m,) unit of model i feeding merged unit j
    blocks: int = 1  # blocks of the merged group (an expanded segment repeats each merged block)

    @property
    def width(self) -> int:
        return int(self.unmerge[0].shape[1])

    def to_merged(self, model: int) -> Tensor:
        """(n, m): maps model ``model``'s units into merged coordinates (mean of its constituents)."""
        unmerge = self.unmerge[model]
        return unmerge / unmerge.sum(dim=0, keepdim=True).clamp_min(1.0)


def _map_axis(tensor: Tensor, axis: int, segments: Sequence[tuple[int, int, Tensor | None]]) -> Tensor:
    """Contract ``axis`` segment by segment with (n, m) matrices.

    A segment whose group has no correspondence yet (None) is sorted along the axis: the
    sorted values do not depend on how that group's units are ordered, so the first sweep
    compares units on what is already comparable instead of on an arbitrary identity map
    (which traps coordinate ascent in poor local optima).
    """
    pieces = []
    for start, stop, matrix in segments:
        piece = tensor.narrow(axis, start, stop - start)
        if matrix is None:
            piece = piece.sort(dim=axis).values
        else:
            piece = torch.tensordot(piece.movedim(axis, -1), matrix.to(piece.dtype), dims=1).movedim(-1, axis)
        pieces.append(piece)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=axis)


def weight_similarity(
    states: Sequence[Mapping[str, Tensor]],
    spec: PermSpec,
    group: str,
    correspondences: Mapping[str, Correspondence],
) -> Tensor:
    """Row-wise Pearson correlation of every unit's weights, (N*n, N*n).

    A unit's vector concatenates everything the spec lists for it (its producer rows, bias
    and norm entries, its consumer columns), after mapping every other unit axis of those
    tensors into the merged space through the other groups' current correspondences
    (sorted, i.e. made order-free, where a group has none yet). A segment that carries the
    group ``expand = r`` times per block (grouped-query attention) gives each unit its r
    copies as extra features; another group's expanded segment is mapped copy by copy.
    """
    per_model: list[list[Tensor]] = [[] for _ in states]
    own = spec.groups[group]
    for param, axis, start, own_seg in spec.segments_of(group):
        axes = spec.axes[param]
        for i, state in enumerate(states):
            tensor = state[param]
            for other_axis, axis_spec in enumerate(axes):
                if other_axis == axis or axis_spec is None:
                    continue
                segments = []
                offset = 0
                for seg in axis_spec:
                    corr = correspondences.get(seg.group)
                    matrix = None
                    if corr is not None:
                        matrix = expand_matrix(
                            corr.to_merged(i), spec.groups[seg.group].num_blocks, corr.blocks, seg.expand
                        )
                    segments.append((offset, offset + seg.length, matrix))
                    offset += seg.length
                tensor = _map_axis(tensor, other_axis, segments)
            rows = tensor.narrow(axis, start, own_seg.length).movedim(axis, 0)
            if own_seg.expand > 1:  # (G*r*b, ...) -> (G, b, r, ...): copies of a unit side by side
                rows = rows.reshape(own.num_blocks, own_seg.expand, own.block_size, -1).transpose(1, 2)
            per_model[i].append(rows.reshape(own.size, -1).to(torch.float64))
    features = torch.cat([torch.cat(parts, dim=1) for parts in per_model], dim=0)
    return row_correlation(features)


def dual_similarity(weight: Tensor | None, activation: Tensor | None, beta: float) -> Tensor:
    """S = beta * S_weight + (1 - beta) * S_act (a missing space counts only when its share is 0)."""
    if weight is None or beta == 0.0:
        if activation is None:
            raise ValueError("no similarity available")
        return activation
    if activation is None or beta == 1.0:
        return weight
    return beta * weight + (1.0 - beta) * activation
