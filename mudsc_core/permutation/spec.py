"""Permutation specs as data: which parameter axes are indexed by which unit group.

A spec is Git Re-Basin's ``axes_to_perm`` made explicit and typed. For every entry of a
state dict, ``axes[param]`` lists one :class:`AxisSpec` per tensor axis:

- ``None``: the axis is not a unit axis (input pixels, class logits, kernel positions);
- a tuple of :class:`Segment` s: the axis is cut into consecutive segments, each indexed by one
  unit group (a fused qkv weight's rows are three segments: q and k in the head's qk group,
  v in its v group). A plain unit axis is one segment covering the whole axis.

``role`` says how an axis moves into the merged space: ``"out"`` axes (rows of a producer,
biases, norm scales, BN statistics, embeddings) go through the merge matrices, ``"in"`` axes
(columns of a consumer) through the unmerge matrices.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from mudsc_core.errors import ArchitectureMismatch, SpecError

Role = Literal["out", "in"]


@dataclass(frozen=True)
class Segment:
    """Entries of one axis indexed by one group.

    ``expand = r > 1`` (grouped-query attention: the q projection's rows, the output projection's
    columns) says that the segment carries the group r times per block: block j of the group
    appears r times in a row, every copy with the block's permutation of units, the copies in
    their order. ``length`` is the number of entries covered: ``group.size * expand``.
    """

    group: str
    length: int  # number of entries of the axis covered by this segment (group size * expand)
    role: Role = "out"
    expand: int = 1


AxisSpec = tuple[Segment, ...] | None


@dataclass(frozen=True)
class ActivationSite:
    """Where a group's activation is observed: the input or output of the call of ``module`` in the graph.

    ``io`` picks the module's input or output; ``unit_dim`` is the unit axis of that tensor
    (1 for NCHW convs, -1 for linear/token tensors); ``segments`` picks slices of the unit
    axis whose values are stacked as extra samples (q and k of a fused qkv output).
    """

    module: str
    io: Literal["input", "output"] = "input"
    unit_dim: int = -1
    segments: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class UnitGroup:
    name: str
    size: int
    activation: ActivationSite | None = None
    # Structure inside the group: G equal contiguous blocks (attention heads, GroupNorm groups).
    num_blocks: int = 1
    # Another group whose block pairing this group must share (a head's v/proj group names
    # its qk group): the heads are paired once, the units inside each head per group.
    block_tie: str | None = None
    # Blocks move only as wholes: units inside a block keep their order (the dims inside a
    # rotary q/k head are fixed by the cos/sin tables, the heads are free).
    whole_blocks: bool = False
    # Further points where the group is observed: every site's positions are samples of the one
    # correlation (a pre-norm residual stream, also observed where its norms hand it to the sublayers).
    extra_sites: tuple[ActivationSite, ...] = ()

    @property
    def block_size(self) -> int:
        return self.size // self.num_blocks

    @property
    def sites(self) -> tuple[ActivationSite, ...]:
        """Every point where the group is observed: ``activation`` first, then ``extra_sites``."""
        return () if self.activation is None else (self.activation, *self.extra_sites)


@dataclass(frozen=True)
class PermSpec:
    groups: dict[str, UnitGroup]
    axes: dict[str, tuple[AxisSpec, ...]]
    # State-dict entries deliberately not merged by matching (e.g. BN num_batches_tracked).
    excluded: frozenset[str] = frozenset()
    # Parameters of the output head whose "out" axis is the label space (for heads='separate').
    head_params: tuple[str, ...] = ()
    # Groups in the order a forward pass meets them (coordinate ascent shuffles this order).
    order: tuple[str, ...] = field(default=())
    # Per flattened model output, its axes where groups reach it freely (a features encoder traced with
    # free outputs); empty: every output axis is pinned. The self-check permutes expected outputs by it.
    outputs: tuple[tuple[AxisSpec, ...], ...] = ()

    def group_order(self) -> tuple[str, ...]:
        return self.order or tuple(self.groups)

    def entries(self, group: str) -> Iterator[tuple[str, int, int, int, Role]]:
        """Every (param, axis, start, stop, role) indexed by ``group``."""
        for param, axes in self.axes.items():
            for axis, spec in enumerate(axes):
                if spec is None:
                    continue
                start = 0
                for seg in spec:
                    if seg.group == group:
                        yield param, axis, start, start + seg.length, seg.role
                    start += seg.length

    def segments_of(self, group: str) -> Iterator[tuple[str, int, int, Segment]]:
        """Every (param, axis, start, segment) indexed by ``group`` (the segment gives role and expand)."""
        for param, axes in self.axes.items():
            for axis, spec in enumerate(axes):
                if spec is None:
                    continue
                start = 0
                for seg in spec:
                    if seg.group == group:
                        yield param, axis, start, seg
                    start += seg.length

    def block_tie_root(self, group: str) -> str:
        """The group whose block pairing ``group`` shares (itself when untied); follows chains of ties."""
        seen = [group]
        while (tie := self.groups[seen[-1]].block_tie) is not None:
            if tie in seen:
                raise SpecError(f"block_tie cycle: {' -> '.join(seen + [tie])}")
            seen.append(tie)
        return seen[-1]

    def check(self) -> None:
        """Internal consistency: segments name known groups with the group's size."""
        for name, group in self.groups.items():
            if group.name != name:
                raise SpecError(f"group registered as {name!r} is named {group.name!r}")
            if group.size < 1 or group.num_blocks < 1:
                raise SpecError(f"group {name}: size and num_blocks must be positive")
            if group.size % group.num_blocks:
                raise SpecError(f"group {name}: size {group.size} not divisible by {group.num_blocks} blocks")
            if group.block_tie is not None:
                tie = self.groups.get(group.block_tie)
                if tie is None or tie.num_blocks != group.num_blocks:
                    raise SpecError(f"group {name}: block_tie {group.block_tie!r} unknown or of another block count")
                self.block_tie_root(name)
        if self.order and sorted(self.order) != sorted(self.groups):
            raise SpecError("order must list every group exactly once")
        for param in self.head_params:
            if param not in self.axes:
                raise SpecError(f"head parameter {param!r} has no axes entry")
        overlap = sorted(set(self.excluded) & set(self.axes))
        if overlap:
            raise SpecError(f"{overlap[0]!r} is both excluded and listed in axes")
        for param, axes in self.axes.items():
            for spec in axes:
                for seg in spec or ():
                    if seg.group not in self.groups:
                        raise SpecError(f"{param}: unknown unit group {seg.group!r}")
                    if seg.expand < 1:
                        raise SpecError(f"{param}: segment of {seg.group!r} has expand {seg.expand} < 1")
                    if seg.length != self.groups[seg.group].size * seg.expand:
                        raise SpecError(
                            f"{param}: segment of {seg.group!r} has length {seg.length}, "
                            f"group size {self.groups[seg.group].size}"
                            + (f" x expand {seg.expand}" if seg.expand != 1 else "")
                        )


def validate_state_dict(spec: PermSpec, state: Mapping[str, object]) -> None:
    """Every entry covered (or excluded), nothing extra, shapes consistent; else ArchitectureMismatch."""
    spec.check()
    keys = set(state)
    covered = set(spec.axes) | set(spec.excluded)
    missing = sorted(covered - keys - set(spec.excluded))
    if missing:
        raise ArchitectureMismatch(
            f"checkpoint is missing parameter {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    extra = sorted(keys - covered)
    if extra:
        raise ArchitectureMismatch(
            f"checkpoint has parameter {extra[0]!r} that the architecture does not define"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    for param, axes in spec.axes.items():
        shape = tuple(getattr(state[param], "shape", ()))
        if len(shape) != len(axes):
            raise ArchitectureMismatch(f"{param}: expected {len(axes)} dims, checkpoint has shape {list(shape)}")
        for axis, axis_spec in enumerate(axes):
            if axis_spec is None:
                continue
            expected = sum(seg.length for seg in axis_spec)
            if shape[axis] != expected:
                raise ArchitectureMismatch(
                    f"{param}: axis {axis} has {shape[axis]} entries, the architecture "
                    f"expects {expected} (shape {list(shape)})"
                )
