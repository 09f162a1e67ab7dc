"""Unit similarities: activation correlation, weight correlation, and their dual-space mix.

Every similarity is an (N*n, N*n) matrix over the stacked units of N models (rows
[i*n:(i+1)*n] are model i's units). Correlations are Pearson; a unit with no variance
correlates 0 with everything (never NaN).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from mudsc_core.errors import ComputeOverflow, SpecError, UnsupportedArchitecture
from mudsc_core.permutation.permute import expand_matrix
from mudsc_core.permutation.spec import ActivationSite, PermSpec

_DEAD_STD = 1e-12
_ROW_BLOCK = 1024  # rows per block of the in-place (U, U) passes
# A weight similarity's features are centred in float64 slices of at most this many elements (then multiplied
# as float32, their products summed in float64) ...
GRAM_CHUNK_ELEMENTS = 1 << 23
# ... a block of rows against the rows below it at a time: between these many rows (the product's own
# (block, U) temporaries stay within the slice's bound).
_GRAM_MIN_BLOCK, _GRAM_ROW_BLOCK = 64, 512
# Another group's axis is mapped into merged units by one gather per constituent, up to this many.
_MAX_GATHERS = 8
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

    One run's (units, units) float32 product exists at a time, added to the float64 result as it comes (faster
    than one batched GEMM summed afterwards, and no (runs, units, units) temporary).
    A product beyond the float32 range of finite values is computed in float64 (``exact_fallback``).
    """
    product = (a[:, :SAMPLE_RUN] @ b[:, :SAMPLE_RUN].T).to(torch.float64)
    for start in range(SAMPLE_RUN, a.shape[1], SAMPLE_RUN):
        product += a[:, start : start + SAMPLE_RUN] @ b[:, start : start + SAMPLE_RUN].T
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
    """Pearson correlation between rows of (U, F) features, within ~1e-6 of float64; constant rows correlate 0.

    Two passes over slices of columns: the float64 row means, then each slice centred in float64, rounded to
    float32 and multiplied by :func:`_product` (float32 GEMMs over runs of ``SAMPLE_RUN`` columns, summed in
    float64, as for activations). Only the upper triangle of row blocks is multiplied; the lower is its
    transpose. A slice is at most ``chunk_elements / U`` columns (a multiple of ``SAMPLE_RUN``, at least one
    run), so only a (U, slice) float64 copy and its float32 rounding exist next to the float32 features (a
    wide residual stream has F in the hundreds of thousands), then the rounding and (block, U) products.
    """
    rows, cols = features.shape
    chunk = chunk_elements or GRAM_CHUNK_ELEMENTS
    step = max(1, chunk // max(rows, 1))
    if cols > step:  # slices start on run boundaries: the runs (and the sums) do not depend on the slicing
        step = max(SAMPLE_RUN, step - step % SAMPLE_RUN)
    block = min(max(chunk // max(rows, 1), _GRAM_MIN_BLOCK), _GRAM_ROW_BLOCK)
    mean = torch.zeros(rows, dtype=torch.float64, device=features.device)
    for start in range(0, cols, step):
        mean += features[:, start : start + step].sum(dim=1, dtype=torch.float64)
    mean /= max(cols, 1)
    cov = torch.zeros(rows, rows, dtype=torch.float64, device=features.device)  # upper row blocks filled
    for start in range(0, cols, step):
        piece = features[:, start : start + step].to(torch.float64, copy=True)
        piece -= mean[:, None]  # in place: no second float64 copy (never the caller's features)
        width = piece.shape[1]
        shifted = torch.zeros(rows, -(-width // SAMPLE_RUN) * SAMPLE_RUN, dtype=torch.float32, device=piece.device)
        shifted[:, :width] = piece  # (U, slice padded to runs): centred in float64, then rounded
        if not bool(torch.isfinite(shifted).all()):  # beyond float32 once centred (or non-finite): float64
            shifted = piece
        del piece
        for top in range(0, rows, block):
            bottom = min(top + block, rows)
            cov[top:bottom, top:] += _product(shifted[top:bottom], shifted[top:])
    for top in range(0, rows, block):  # the lower triangle of blocks: the transposes of the upper ones
        bottom = min(top + block, rows)
        cov[bottom:, top:bottom] = cov[top:bottom, bottom:].T
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


def observations(spec: PermSpec, groups: Sequence[str]) -> dict[str, tuple[str, ActivationSite | None]]:
    """Every site of ``groups``, keyed by what the taps return: the group's name for its ``activation``,
    ``<group>#<i>`` for its i-th extra site (from 1); value: (group, site), None for a group without one."""
    out: dict[str, tuple[str, ActivationSite | None]] = {}
    for name in groups:
        group = spec.groups[name]
        out[name] = (name, group.activation)
        for index, site in enumerate(group.sites[1:], start=1):
            out[f"{name}#{index}"] = (name, site)
    return out


def activation_taps(model: nn.Module, spec: PermSpec, groups: Sequence[str]) -> fx.GraphModule:
    """The model's captured graph, returning the tensor at each group's activation site instead of its outputs.

    Keys as :func:`observations`: a group with extra sites has one tap per site.

    One mechanism for every architecture: a site names a module call of the graph (its input or output).
    Nodes that no site needs (the head after the last site, say) are dropped, so a calibration pass
    computes only what the statistics use.
    """
    observed = observations(spec, groups)
    tracer = _SiteTracer({site.module for _, site in observed.values() if site is not None})
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, ... for what it cannot follow
        raise UnsupportedArchitecture(f"cannot capture the forward pass of {type(model).__name__}: {exc}") from exc
    taps: dict[str, fx.Node] = {}
    for key, (name, site) in observed.items():
        boundary = tracer.boundaries.get(site.module) if site is not None else None
        if site is None or boundary is None:
            raise SpecError(
                f"group {name}: activation site {getattr(site, 'module', None)!r} is not a module call "
                f"of {type(model).__name__}'s forward"
            )
        taps[key] = boundary[1] if site.io == "output" else boundary[0]
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
        # Keys as :func:`observations`: a group with extra sites has one tap per site.
        self.sites = {key: site for key, (_, site) in observations(spec, groups).items() if site is not None}
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
    observed = observations(spec, groups)
    samples: dict[str, int] = {}
    for key, tensor in captured.items():  # a group's extra sites add their positions to its samples
        group, site = observed[key]
        positions = _site_features(site, tensor, mask).shape[1]
        samples[group] = samples.get(group, 0) + -(-positions * batch_size // max(count, 1))
    return samples


def activation_correlations(
    models: Sequence[nn.Module],
    spec: PermSpec,
    batches: Iterable[Batch],
    progress: Callable[[float], None] | None = None,
    num_batches: int | None = None,
) -> dict[str, Tensor]:
    """Pearson correlation of every group's stacked units over the calibration inputs.

    A group with extra sites pools them: every position at every site is one sample of its correlation.
    """
    groups = [g for g in spec.group_order() if spec.groups[g].activation is not None]
    observed = observations(spec, groups)
    taps = [_taps(model, spec, groups) for model in models]
    accumulators = {g: CorrelationAccumulator() for g in groups}
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                captured = [tap(batch) for tap in taps]  # one forward per model feeds every group
                overflow: list[tuple[int, int]] = []  # (model, group position) with a non-finite activation
                for key, (g, site) in observed.items():
                    # Each model's (units, samples...) view straight from its forward: shifted and multiplied
                    # a slice at a time, never stacked or copied whole.
                    blocks = [_site_units_first(site, per_model[key], mask) for per_model in captured]
                    overflow += [(model, groups.index(g)) for model in accumulators[g].update_blocks(blocks)]
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
class UnitMap:
    """An (n, m) matrix with at most one non-zero per row, by index: unit k feeds merged unit ``target[k]``
    with ``weight[k]`` (what a correspondence's :meth:`Correspondence.to_merged` is: a permutation for align,
    a mean of a few units for zip). Contracting an axis with it gathers, never multiplies by the dense matrix.

    Merged unit j sums ``weights[d, j] * x[sources[d, j]]`` over its ``depth`` constituents at most, one gather
    per d (a permutation: one gather, exactly the dense product); a merged unit of more than
    ``_MAX_GATHERS`` units makes it an ``index_add_`` (on CUDA its atomic adds sum in no fixed order).
    """

    target: Tensor  # (n,) long: the merged unit of every unit (any, where its weight is 0)
    weight: Tensor  # (n,) the matrix's non-zero of every row (0 in an empty row)
    width: int  # m
    sources: Tensor  # (depth, m) long: the d-th unit of every merged unit (0 where it has fewer)
    weights: Tensor  # (depth, m): its weight (0 where none)
    gather_only: bool  # every merged unit is one unit of weight 1 (a permutation)

    @staticmethod
    def of(target: Tensor, weight: Tensor, width: int) -> UnitMap:
        """The map sending unit k to merged unit ``target[k]`` with ``weight[k]``."""
        kept = torch.nonzero(weight).squeeze(1)  # units that feed a merged unit
        merged = target[kept]
        counts = torch.bincount(merged, minlength=width)
        depth = int(counts.max()) if kept.numel() else 0
        order = torch.argsort(merged, stable=True)  # kept units, grouped by merged unit
        ranks = torch.arange(order.numel(), device=target.device) - (counts.cumsum(0) - counts)[merged[order]]
        sources = torch.zeros(depth, width, dtype=torch.long, device=target.device)
        weights = torch.zeros(depth, width, dtype=weight.dtype, device=weight.device)
        sources[ranks, merged[order]] = kept[order]
        weights[ranks, merged[order]] = weight[kept[order]]
        gather_only = depth == 1 and bool((counts == 1).all()) and bool((weights == 1).all())
        return UnitMap(target, weight, width, sources, weights, gather_only)

    @staticmethod
    def from_matrix(matrix: Tensor) -> UnitMap | None:
        """The map of an (n, m) matrix; None when some row has more than one non-zero (kept dense)."""
        nonzero = matrix != 0
        if matrix.shape[1] == 0 or bool((nonzero.sum(dim=1) > 1).any()):
            return None
        target = nonzero.to(torch.uint8).argmax(dim=1)  # (n,): the non-zero's column (0 in an empty row)
        return UnitMap.of(target, matrix.gather(1, target[:, None]).squeeze(1), int(matrix.shape[1]))

    def expanded(self, num_blocks: int, merged_blocks: int, expand: int) -> UnitMap:
        """The map of a segment carrying the group ``expand`` times per block (:func:`expand_matrix` by index).

        Unit (block j, copy c, unit t) feeds copy c of the merged unit its group unit j*b + t feeds.
        """
        if expand == 1:
            return self
        n, m = self.target.shape[0], self.width
        if n % num_blocks or m % merged_blocks:
            raise ValueError(f"map ({n}, {m}) does not split into {num_blocks} x {merged_blocks} blocks")
        size, merged_size = n // num_blocks, m // merged_blocks
        target = self.target.view(num_blocks, 1, size)  # (G, 1, b)
        copies = torch.arange(expand, device=target.device).view(1, expand, 1) * merged_size  # (1, r, 1)
        target = ((target // merged_size) * (expand * merged_size) + copies + target % merged_size).reshape(-1)
        weight = self.weight.view(num_blocks, 1, size).expand(num_blocks, expand, size).reshape(-1)
        return UnitMap.of(target, weight, m * expand)

    def apply(self, tensor: Tensor, axis: int) -> Tensor:
        """``tensor`` with ``axis`` (n entries) contracted with the matrix: m entries."""
        shape = [1] * tensor.ndim
        shape[axis] = -1
        depth = self.sources.shape[0]
        if depth > _MAX_GATHERS or depth == 0:
            out_shape = list(tensor.shape)
            out_shape[axis] = self.width
            weighted = tensor * self.weight.to(tensor).view(shape)
            return tensor.new_zeros(out_shape).index_add_(axis, self.target.to(tensor.device), weighted)
        sources, weights = self.sources.to(tensor.device), self.weights.to(tensor)
        out = tensor.index_select(axis, sources[0])
        if not self.gather_only:
            out *= weights[0].view(shape)
        for d in range(1, depth):
            out += tensor.index_select(axis, sources[d]) * weights[d].view(shape)
        return out


@dataclass(frozen=True)
class Correspondence:
    """One group's current correspondence: per model, unmerge U_i (n, m) and merge M_i (n, m)."""

    merge: list[Tensor]
    unmerge: list[Tensor]
    index: list[Tensor] | None = None  # align: per model (m,) unit of model i feeding merged unit j
    blocks: int = 1  # blocks of the merged group (an expanded segment repeats each merged block)
    # per model, :meth:`to_merged` by index (derived on first use; the matrices never change)
    _maps: dict[int, UnitMap | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def width(self) -> int:
        return int(self.unmerge[0].shape[1])

    def to_merged(self, model: int) -> Tensor:
        """(n, m): maps model ``model``'s units into merged coordinates (mean of its constituents)."""
        unmerge = self.unmerge[model]
        return unmerge / unmerge.sum(dim=0, keepdim=True).clamp_min(1.0)

    def merged_map(self, model: int) -> UnitMap | None:
        """:meth:`to_merged` as a :class:`UnitMap`; None when a unit feeds more than one merged unit."""
        if model not in self._maps:
            self._maps[model] = UnitMap.from_matrix(self.to_merged(model))
        return self._maps[model]


AxisMap = Tensor | UnitMap  # a dense (n, m) matrix, or one by index


def _map_axis(tensor: Tensor, axis: int, segments: Sequence[tuple[int, int, AxisMap | None]]) -> Tensor:
    """Contract ``axis`` segment by segment with (n, m) maps (by index where a map is a :class:`UnitMap`).

    A segment whose group has no correspondence yet (None) is sorted along the axis: the
    sorted values do not depend on how that group's units are ordered, so the first sweep
    compares units on what is already comparable instead of on an arbitrary identity map
    (which traps coordinate ascent in poor local optima).
    """
    pieces = []
    for start, stop, mapping in segments:
        piece = tensor.narrow(axis, start, stop - start)
        if mapping is None:
            piece = piece.sort(dim=axis).values
        elif isinstance(mapping, UnitMap):
            piece = mapping.apply(piece, axis)
        else:
            piece = torch.tensordot(piece.movedim(axis, -1), mapping.to(piece.dtype), dims=1).movedim(-1, axis)
        pieces.append(piece)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=axis)


def _merged_map(correspondence: Correspondence, model: int, spec: PermSpec, group: str, expand: int) -> AxisMap:
    """Model ``model``'s map of ``group`` into merged coordinates on a segment carrying it ``expand`` times."""
    num_blocks = spec.groups[group].num_blocks
    unit_map = correspondence.merged_map(model)
    if unit_map is not None:
        return unit_map.expanded(num_blocks, correspondence.blocks, expand)
    return expand_matrix(correspondence.to_merged(model), num_blocks, correspondence.blocks, expand)


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
                    mapping = None if corr is None else _merged_map(corr, i, spec, seg.group, seg.expand)
                    segments.append((offset, offset + seg.length, mapping))
                    offset += seg.length
                tensor = _map_axis(tensor, other_axis, segments)
            rows = tensor.narrow(axis, start, own_seg.length).movedim(axis, 0)
            if own_seg.expand > 1:  # (G*r*b, ...) -> (G, b, r, ...): copies of a unit side by side
                rows = rows.reshape(own.num_blocks, own_seg.expand, own.block_size, -1).transpose(1, 2)
            per_model[i].append(rows.reshape(own.size, -1))
    # (N*n, F) in the weights' dtype (float32): row_correlation centres in float64 a slice at a time.
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
