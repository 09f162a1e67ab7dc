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
_ROW_BLOCK = 1024  # rows per block of the in-place (U, U) passes
# A weight similarity's features are multiplied in float64 slices of at most this many elements.
GRAM_CHUNK_ELEMENTS = 1 << 23
# Activations are shifted and multiplied (float32) in slices of at most this many values per unit block.
SAMPLE_CHUNK_ELEMENTS = 1 << 20
# ... and multiplied by float32 GEMMs over runs of this many samples, their results summed in float64.
SAMPLE_RUN = 256


class CorrelationAccumulator:
    """Streaming Pearson correlation of U units over samples: float32 products, float64 sums, with a shift.

    The shift (the first batch's mean) keeps the one-pass second-moment formula stable:
    cov = E[(x-c)(x-c)^T] - (E[x]-c)(E[x]-c)^T loses no precision when c is near the mean. The
    shifted values are float32, a slice of at most ``SAMPLE_CHUNK_ELEMENTS`` values per block at a
    time, multiplied by float32 GEMMs over runs of ``SAMPLE_RUN`` samples whose results (and the
    sums) are added in float64: float32 rounding never accumulates over more than one run, and the
    correlation stays within ~5e-7 of a float64 computation.

    Units may come in blocks (one per model, :meth:`update_blocks`): only the blocks' upper triangle
    of products is computed (the rest is its transpose), and each block is shifted straight from the
    tensor it was captured in (no stacked or float64 copy of a batch's activations).
    """

    def __init__(self) -> None:
        self.count = 0
        self.shift: Tensor | None = None  # (U,) float64
        self.sum: Tensor | None = None  # (U,) float64, of the shifted values
        self.outer: Tensor | None = None  # (U, U) float64; of the off-diagonal blocks only the upper is kept
        self.sizes: tuple[int, ...] = ()  # units per block

    def update(self, features: Tensor) -> None:
        """features: (U, S) — U units, S samples."""
        self.update_blocks([features])

    def update_blocks(self, blocks: Sequence[Tensor]) -> list[int]:
        """Add samples of units in blocks: each (n_i, A, ...) — its units first, then sample axes (any strides).

        Every block has the same sample axes' sizes; the units are the blocks' units in order. Returns the
        blocks that hold a non-finite value (they make the correlation meaningless; the caller decides).
        """
        sizes = tuple(int(b.shape[0]) for b in blocks)
        samples = blocks[0][0].numel() if blocks[0].shape[0] else 0
        if self.shift is None:
            self._start(blocks, sizes)
        elif sizes != self.sizes:
            raise ValueError(f"unit blocks {sizes} differ from the first update's {self.sizes}")
        assert self.shift is not None and self.sum is not None and self.outer is not None
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        shifts = [self.shift[o : o + n] for o, n in zip(offsets, sizes, strict=True)]
        bad: set[int] = set()
        axis = blocks[0].shape[1] if blocks[0].ndim > 1 else 1
        per_step = max(1, samples // max(axis, 1))  # samples per position of the chunked (second) axis
        step = max(1, SAMPLE_CHUNK_ELEMENTS // max(max(sizes) * per_step, 1))
        for start in range(0, axis, step):
            shifted = [_shifted(block, shift, start, start + step) for block, shift in zip(blocks, shifts, strict=True)]
            for i, y in enumerate(shifted):
                part = y.sum(dim=1, dtype=torch.float64)
                if not bool(torch.isfinite(part).all()):
                    bad.add(i)
                self.sum[offsets[i] : offsets[i] + sizes[i]] += part
            for i, yi in enumerate(shifted):
                for j in range(i, len(shifted)):
                    product = _product(yi, shifted[j], exact_fallback=i not in bad and j not in bad)
                    self.outer[offsets[i] : offsets[i] + sizes[i], offsets[j] : offsets[j] + sizes[j]] += product
        self.count += samples
        return sorted(bad)

    def _start(self, blocks: Sequence[Tensor], sizes: tuple[int, ...]) -> None:
        shifts = []
        for block in blocks:  # the first batch's mean, summed in the block's own layout (no copy)
            dims = tuple(range(1, block.ndim))
            total = block.sum(dim=dims, dtype=torch.float64) if dims else block.to(torch.float64)
            shifts.append(total / max(block[0].numel() if block.shape[0] else 0, 1))
        self.sizes = sizes
        self.shift = torch.cat(shifts)
        self.sum = torch.zeros_like(self.shift)
        units = self.shift.shape[0]
        self.outer = torch.zeros(units, units, dtype=torch.float64, device=self.shift.device)

    def correlation(self) -> Tensor:
        """The (U, U) correlation so far; the accumulator can go on."""
        if self.outer is None:
            raise ValueError("no samples accumulated")
        return self._to_correlation(self.outer.clone())

    def finalize(self) -> Tensor:
        """The (U, U) correlation, computed in the accumulator's own buffer (no second (U, U) matrix)."""
        if self.outer is None:
            raise ValueError("no samples accumulated")
        outer, self.outer = self.outer, None
        return self._to_correlation(outer)

    def _to_correlation(self, outer: Tensor) -> Tensor:
        if self.count == 0 or self.sum is None:
            raise ValueError("no samples accumulated")
        offset = 0
        for size in self.sizes[:-1]:  # the lower off-diagonal blocks: the transposes of the upper ones
            stop = offset + size
            outer[stop:, offset:stop] = outer[offset:stop, stop:].T
            offset = stop
        mean = self.sum / self.count
        cov = outer.div_(self.count)
        for start in range(0, cov.shape[0], _ROW_BLOCK):  # cov -= outer(mean, mean), a block of rows at a time
            cov[start : start + _ROW_BLOCK] -= torch.outer(mean[start : start + _ROW_BLOCK], mean)
        return covariance_to_correlation(cov)


def _shifted(block: Tensor, shift: Tensor, start: int, stop: int) -> Tensor:
    """Positions ``start:stop`` of a block's second axis minus the shift: float32 (units, samples), contiguous,
    its samples padded with zeros to a multiple of ``SAMPLE_RUN``."""
    piece = block[:, start:stop] if block.ndim > 1 else block[:, None]
    units = piece.shape[0]
    samples = piece[0].numel() if units else 0
    padded = -(-samples // SAMPLE_RUN) * SAMPLE_RUN
    out = torch.empty(units, padded, dtype=torch.float32, device=piece.device)
    out[:, samples:] = 0.0
    shift = shift.to(torch.float64 if piece.dtype == torch.float64 else torch.float32)
    # a float64 block is shifted in float64, then rounded
    torch.sub(piece, shift.view(-1, *([1] * (piece.ndim - 1))), out=out[:, :samples].view(piece.shape))
    return out


def _product(a: Tensor, b: Tensor, exact_fallback: bool = True) -> Tensor:
    """a @ b.T of float32 (units, samples) slices as float64: float32 GEMMs over runs of ``SAMPLE_RUN`` samples,
    their results summed in float64 (a float32 dot product over thousands of samples drifts by ~1e-6).

    A product beyond the float32 range of finite values is computed in float64 (``exact_fallback``).
    """
    runs = a.shape[1] // SAMPLE_RUN
    if runs <= 1:
        product = (a @ b.T).to(torch.float64)
    else:  # (runs, units, SAMPLE_RUN) strided views: one batched GEMM, no copy
        product = torch.bmm(
            a.view(a.shape[0], runs, SAMPLE_RUN).transpose(0, 1), b.view(b.shape[0], runs, SAMPLE_RUN).permute(1, 2, 0)
        ).sum(dim=0, dtype=torch.float64)
    if exact_fallback and not bool(torch.isfinite(product).all()):
        product = a.double() @ b.double().T
    return product


def covariance_to_correlation(cov: Tensor) -> Tensor:
    """Correlation from a covariance, in place: ``cov`` (a fresh matrix the caller gives up) is returned."""
    variance = torch.diagonal(cov).clamp_min(0)
    std = variance.sqrt()
    dead = std <= _DEAD_STD * max(float(std.max()) if std.numel() else 0.0, 1.0)
    safe = torch.where(dead, torch.ones_like(std), std)
    corr = cov
    for start in range(0, corr.shape[0], _ROW_BLOCK):  # / outer(safe, safe), never built whole
        corr[start : start + _ROW_BLOCK] /= torch.outer(safe[start : start + _ROW_BLOCK], safe)
    corr[dead, :] = 0.0
    corr[:, dead] = 0.0
    corr.clamp_(-1.0, 1.0)
    torch.diagonal(corr)[:] = (~dead).to(corr.dtype)
    return corr


def row_correlation(features: Tensor, chunk_elements: int | None = None) -> Tensor:
    """Pearson correlation between rows of (U, F) features, in float64; constant rows correlate 0.

    Features wider than ``chunk_elements / U`` columns are centred and multiplied a slice of
    columns at a time, so only a (U, slice) float64 copy exists next to the float32 features
    (a wide residual stream has F in the hundreds of thousands); narrower ones in one go.
    """
    rows, cols = features.shape
    step = max(1, (chunk_elements or GRAM_CHUNK_ELEMENTS) // max(rows, 1))
    if cols <= step:
        x = features.to(torch.float64, copy=True)
        x -= x.mean(dim=1, keepdim=True)
        cov = x @ x.T
    else:
        mean = torch.zeros(rows, dtype=torch.float64, device=features.device)
        for start in range(0, cols, step):
            mean += features[:, start : start + step].to(torch.float64).sum(dim=1)
        mean /= cols
        cov = torch.zeros(rows, rows, dtype=torch.float64, device=features.device)
        for start in range(0, cols, step):
            x = features[:, start : start + step].to(torch.float64) - mean[:, None]
            cov.addmm_(x, x.T)
    cov /= max(cols, 1)
    return covariance_to_correlation(cov)


# --------------------------------------------------------------------------- activations
def _site_features(site: ActivationSite | None, tensor: Tensor, mask: Tensor | None = None) -> Tensor:
    """Tensor at a site -> (units, samples): unit axis first, every other position a sample.

    ``mask`` (the batch's ``attention_mask``, (batch, tokens)) drops padded positions of a token tensor
    (batch, tokens, ..., units) before they count as samples.
    """
    units_first = _site_units_first(site, tensor, mask)
    return units_first.reshape(units_first.shape[0], -1)


def _site_units_first(site: ActivationSite | None, tensor: Tensor, mask: Tensor | None = None) -> Tensor:
    """:func:`_site_features` before flattening: (units, *sample axes), a view of ``tensor`` where it can be."""
    assert site is not None  # callers keep only groups with a site
    unit_dim = site.unit_dim % tensor.ndim
    if mask is not None and tensor.ndim >= 3 and unit_dim >= 2 and tuple(tensor.shape[:2]) == tuple(mask.shape):
        tensor = tensor[mask.to(torch.bool)]  # (kept positions, ..., units)
        unit_dim -= 1
    units_first = tensor.movedim(unit_dim, 0)
    if site.segments:
        units_first = torch.cat([units_first[start:stop] for start, stop in site.segments], dim=1)
    return units_first if units_first.ndim > 1 else units_first[:, None]


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


Batch = Tensor | Mapping[str, Tensor]  # positional inputs, or forward keywords (transformers models)


def batch_samples(batch: Batch) -> int:
    """The number of samples of a batch (the first axis of its tensors)."""
    return int(next(iter(batch.values())).shape[0]) if isinstance(batch, Mapping) else int(batch.shape[0])


def batch_slice(batch: Batch, start: int, stop: int | None) -> Batch:
    """Samples ``start:stop`` of a batch (every keyword tensor alike)."""
    if isinstance(batch, Mapping):
        return {name: t[start:stop] for name, t in batch.items()}
    return batch[start:stop]


class HookTaps:
    """The tensors at each group's site, captured by forward hooks on the model's modules.

    For models whose forward torch.fx cannot capture (their spec was derived on a torch.export graph,
    whose sites name the module each op belongs to): the model runs as it is, with keywords.
    """

    def __init__(self, model: nn.Module, spec: PermSpec, groups: Sequence[str]) -> None:
        self.model = model
        self.sites = {g: site for g in groups if (site := spec.groups[g].activation) is not None}
        self.captured: dict[tuple[str, str], Tensor] = {}
        self.handles: list[Any] = []
        for module_name, io in sorted({(site.module, site.io) for site in self.sites.values()}):
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                raise SpecError(f"activation site {module_name!r} is not a module of {type(model).__name__}") from None
            key = (module_name, io)
            if io == "input":
                self.handles.append(module.register_forward_pre_hook(self._keep_input(key), with_kwargs=True))
            else:
                self.handles.append(module.register_forward_hook(self._keep_output(key)))

    def _keep_input(self, key: tuple[str, str]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            first = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(first, Tensor):
                self.captured[key] = first

        return hook

    def _keep_output(self, key: tuple[str, str]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            tensor = output if isinstance(output, Tensor) else output[0] if isinstance(output, tuple) else None
            if isinstance(tensor, Tensor):
                self.captured[key] = tensor

        return hook

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        self.captured.clear()
        if isinstance(batch, Mapping):
            self.model(**batch)
        else:
            self.model(batch)
        missing = [g for g, site in self.sites.items() if (site.module, site.io) not in self.captured]
        if missing:
            site = self.sites[missing[0]]
            raise SpecError(f"group {missing[0]}: activation site {site.module!r} ({site.io}) was not called")
        return {g: self.captured[(site.module, site.io)] for g, site in self.sites.items()}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _taps(model: nn.Module, spec: PermSpec, groups: Sequence[str]) -> Callable[[Batch], dict[str, Tensor]]:
    """The captured graph's taps where torch.fx can capture the model, else forward hooks."""
    try:
        graph = activation_taps(model, spec, groups)
    except UnsupportedArchitecture:
        return HookTaps(model, spec, groups)
    return lambda batch: graph(**batch) if isinstance(batch, Mapping) else graph(batch)


def site_samples(model: nn.Module, spec: PermSpec, batch: Batch, batch_size: int) -> dict[str, int]:
    """Per group with a site: the samples (positions) a calibration batch of ``batch_size`` gives there.

    Measured on ``batch`` (a few samples: one forward with hooks); padding behind an attention mask
    does not count, as in :func:`activation_correlations`. Empty when a site cannot be hooked.
    """
    groups = [g for g in spec.group_order() if spec.groups[g].activation is not None]
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    count = int(next(iter(batch.values())).shape[0]) if isinstance(batch, Mapping) else int(batch.shape[0])
    try:
        taps = HookTaps(model, spec, groups)
    except SpecError:
        return {}
    try:
        with torch.no_grad():
            captured = taps(batch)
    except SpecError:
        return {}
    finally:
        taps.close()
    return {
        g: -(-_site_features(spec.groups[g].activation, t, mask).shape[1] * batch_size // max(count, 1))
        for g, t in captured.items()
    }


def activation_correlations(
    models: Sequence[nn.Module],
    spec: PermSpec,
    batches: Iterable[Batch],
    progress: Callable[[float], None] | None = None,
    num_batches: int | None = None,
) -> dict[str, Tensor]:
    """Pearson correlation of every group's stacked units over the calibration inputs."""
    groups = [g for g in spec.group_order() if spec.groups[g].activation is not None]
    sites = {g: spec.groups[g].activation for g in groups}
    taps = [_taps(model, spec, groups) for model in models]
    accumulators = {g: CorrelationAccumulator() for g in groups}
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                captured = [tap(batch) for tap in taps]  # one forward per model feeds every group
                overflow: list[tuple[int, int]] = []  # (model, group position) with a non-finite activation
                for position, g in enumerate(groups):
                    # Each model's (units, samples...) view straight from its forward: shifted and multiplied
                    # a slice at a time, never stacked or copied whole.
                    blocks = [_site_units_first(sites[g], per_model[g], mask) for per_model in captured]
                    overflow += [(model, position) for model in accumulators[g].update_blocks(blocks)]
                if overflow:  # the inputs are checked finite: the weights did it
                    model_index, position = min(overflow)
                    raise ComputeOverflow(
                        f"model {model_index}: activations of group {groups[position]} overflow float32 on the "
                        "calibration inputs (weights too large for the model's forward pass)"
                    )
                del captured
                if progress is not None and num_batches:
                    progress((index + 1) / num_batches)
    finally:
        for tap in taps:
            if isinstance(tap, HookTaps):
                tap.close()
    return {g: accumulators.pop(g).finalize() for g in groups}  # each in its own buffer


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
            per_model[i].append(rows.reshape(own.size, -1))
    # (N*n, F) in the weights' dtype (float32): row_correlation computes in float64 a slice at a time.
    features = torch.cat([torch.cat(per_model.pop(0), dim=1) for _ in range(len(states))], dim=0)
    return row_correlation(features)


def dual_similarity(weight: Tensor | None, activation: Tensor | None, beta: float) -> Tensor:
    """S = beta * S_weight + (1 - beta) * S_act (a missing space counts only when its share is 0)."""
    if weight is None or beta == 0.0:
        if activation is None:
            raise ValueError("no similarity available")
        return activation
    if activation is None or beta == 1.0:
        return weight
    mixed = beta * weight
    mixed += (1.0 - beta) * activation  # in place: one (N*n, N*n) temporary fewer
    return mixed
