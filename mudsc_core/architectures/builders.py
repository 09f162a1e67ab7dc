"""Small helpers that write permutation specs, in the spirit of Git Re-Basin's ``permutation_spec`` helpers.

An architecture module declares its unit groups on a :class:`SpecBuilder` and then lists its
layers with one call each (``linear``, ``conv``, ``norm``, ``batchnorm``, ``residual_block``).
A group argument of ``None`` means "this axis carries no units" (input pixels, class logits).
"""

from __future__ import annotations

from mudsc_core.permutation.spec import ActivationSite, AxisSpec, PermSpec, Role, Segment, UnitGroup

GroupRef = str | None


class SpecBuilder:
    """Accumulates groups and per-parameter axes; :meth:`build` returns a checked :class:`PermSpec`."""

    def __init__(self) -> None:
        self._groups: dict[str, UnitGroup] = {}
        self._axes: dict[str, tuple[AxisSpec, ...]] = {}
        self._excluded: set[str] = set()
        self._head_params: list[str] = []

    # -- groups ------------------------------------------------------------------------------
    def group(
        self,
        name: str,
        size: int,
        activation: ActivationSite | None = None,
        *,
        num_blocks: int = 1,
        block_tie: str | None = None,
        extra_sites: tuple[ActivationSite, ...] = (),
    ) -> str:
        """Declare a unit group (declaration order = forward order); returns its name."""
        if name in self._groups:
            raise ValueError(f"unit group {name!r} declared twice")
        self._groups[name] = UnitGroup(name, size, activation, num_blocks, block_tie, extra_sites=extra_sites)
        return name

    def size(self, group: str) -> int:
        return self._groups[group].size

    # -- axes --------------------------------------------------------------------------------
    def axis(self, group: GroupRef, role: Role) -> AxisSpec:
        """One unit axis wholly indexed by ``group`` (or ``None``)."""
        if group is None:
            return None
        return (Segment(group, self.size(group), role),)

    def segments(self, groups: list[str], role: Role) -> AxisSpec:
        """An axis cut into consecutive segments, one per group (a fused qkv weight's rows)."""
        return tuple(Segment(g, self.size(g), role) for g in groups)

    def param(self, name: str, *axes: AxisSpec) -> None:
        if name in self._axes or name in self._excluded:
            raise ValueError(f"parameter {name!r} listed twice")
        self._axes[name] = tuple(axes)

    def exclude(self, name: str) -> None:
        self._excluded.add(name)

    def head(self, *params: str) -> None:
        self._head_params.extend(params)

    # -- layers ------------------------------------------------------------------------------
    def linear(self, prefix: str, out: GroupRef, inp: GroupRef, *, bias: bool = True) -> None:
        # weight (out, in), bias (out,)
        self.param(f"{prefix}.weight", self.axis(out, "out"), self.axis(inp, "in"))
        if bias:
            self.param(f"{prefix}.bias", self.axis(out, "out"))

    def conv(self, prefix: str, out: GroupRef, inp: GroupRef, *, bias: bool = True) -> None:
        # weight (out, in, kh, kw), bias (out,)
        self.param(f"{prefix}.weight", self.axis(out, "out"), self.axis(inp, "in"), None, None)
        if bias:
            self.param(f"{prefix}.bias", self.axis(out, "out"))

    def norm(self, prefix: str, group: str) -> None:
        """LayerNorm / GroupNorm: per-unit scale and shift, (C,) each."""
        for leaf in ("weight", "bias"):
            self.param(f"{prefix}.{leaf}", self.axis(group, "out"))

    def batchnorm(self, prefix: str, group: str) -> None:
        """BatchNorm: scale, shift and running statistics are "out" entries; the step counter is excluded."""
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            self.param(f"{prefix}.{leaf}", self.axis(group, "out"))
        self.exclude(f"{prefix}.num_batches_tracked")

    def any_norm(self, prefix: str, group: str, kind: str) -> None:
        if kind == "batch":
            self.batchnorm(prefix, group)
        else:
            self.norm(prefix, group)

    def residual_block(
        self,
        prefix: str,
        *,
        stream_in: str,
        stream_out: str,
        inner: str,
        norm: str,
        shortcut: bool,
    ) -> None:
        """A CIFAR BasicBlock: conv1/bn1 (stream_in -> inner), conv2/bn2 (inner -> stream_out),
        optional projection shortcut.0 (1x1 conv) / shortcut.1 (norm) from stream_in to stream_out.
        Without a projection the identity shortcut requires stream_in == stream_out."""
        if not shortcut and stream_in != stream_out:
            raise ValueError(f"{prefix}: identity shortcut between different streams")
        self.conv(f"{prefix}.conv1", inner, stream_in, bias=False)
        self.any_norm(f"{prefix}.bn1", inner, norm)
        self.conv(f"{prefix}.conv2", stream_out, inner, bias=False)
        self.any_norm(f"{prefix}.bn2", stream_out, norm)
        if shortcut:
            self.conv(f"{prefix}.shortcut.0", stream_out, stream_in, bias=False)
            self.any_norm(f"{prefix}.shortcut.1", stream_out, norm)

    # -- result ------------------------------------------------------------------------------
    def build(self) -> PermSpec:
        spec = PermSpec(
            groups=dict(self._groups),
            axes=dict(self._axes),
            excluded=frozenset(self._excluded),
            head_params=tuple(self._head_params),
            order=tuple(self._groups),
        )
        spec.check()
        return spec
