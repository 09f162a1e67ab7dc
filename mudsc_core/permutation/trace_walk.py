"""Walk a captured torch.fx graph and join tensor axes by the op rules of TRACING.md.

Every node gets an abstract value: an :class:`AbsTensor` (one :data:`Layout` per axis), a
:class:`Stacked` tensor (a view whose leading factor is only ever indexed, like the 3 of a fused
qkv reshaped to (B, T, 3, H, d): its q, k and v are separate spaces, not one shared one), a tuple
of those (split, unbind) or ``None`` (ints, sizes). Concrete shapes and values come from running
the graph once on the example inputs (:class:`TensorInfo` stands for a tensor there).
Op rules themselves live in :mod:`mudsc_core.permutation.trace_rules`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from mudsc_core.permutation.spec import Role
from mudsc_core.permutation.trace_algebra import AxisAlgebra, Conflict, Layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorInfo:
    """What the example run recorded for a tensor-valued node."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class AbsTensor:
    axes: tuple[Layout, ...]

    @property
    def ndim(self) -> int:
        return len(self.axes)


@dataclass
class Stacked:
    """A tensor whose axis ``axis`` indexes separate spaces: ``parts[i]`` is the tensor at index i."""

    axis: int
    parts: list[AbsTensor]


AbsValue = Any  # AbsTensor | Stacked | tuple[AbsValue, ...] | None


def summarize(value: object) -> object:
    """Replace tensors by :class:`TensorInfo` (keeps the recorded run small)."""
    if isinstance(value, Tensor):
        return TensorInfo(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(summarize(v) for v in value)
    return value


class RecordingInterpreter(fx.Interpreter):
    """Runs the graph once and keeps every node's concrete value (tensors as :class:`TensorInfo`)."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.values[n] = summarize(result)
        return result


@dataclass
class Walker:
    """State of one derivation: the algebra, the parameters' layouts and every node's abstract value."""

    gm: fx.GraphModule
    values: Mapping[fx.Node, object]
    state_shapes: Mapping[str, tuple[int, ...]]
    algebra: AxisAlgebra = field(default_factory=AxisAlgebra)
    env: dict[fx.Node, AbsValue] = field(default_factory=dict)
    params: dict[str, AbsTensor] = field(default_factory=dict)
    roles: dict[tuple[str, int], Role] = field(default_factory=dict)
    first_use: dict[str, int] = field(default_factory=dict)
    output_atoms: list[int] = field(default_factory=list)
    input_atoms: list[int] = field(default_factory=list)
    index: int = 0
    # Leave the outputs' axes free (a features output, merged in model 0's order) instead of pinning them;
    # ``outputs`` then holds each flattened output's layouts for the spec.
    free_outputs: bool = False
    outputs: list[AbsTensor | None] = field(default_factory=list)
    modules: dict[str, nn.Module] = field(init=False)
    _param_free: dict[fx.Node, bool] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.modules = dict(self.gm.named_modules())

    def param_free(self, node: fx.Node) -> bool:
        """True when no parameter or state-dict buffer flows into ``node`` (inputs, non-persistent tables).

        Sizes carry no parameter values: a table sliced to ``x.shape[1]`` tokens is still parameter-free.
        """
        if self._param_free is None:
            free: dict[fx.Node, bool] = {}
            for n in self.gm.graph.nodes:  # topological order: a node's inputs come first
                if n.op == "get_attr":
                    free[n] = not self.has_param(str(n.target))
                    continue
                inputs = all(free.get(i, False) or not _holds_tensor(self.values.get(i)) for i in n.all_input_nodes)
                if n.op == "call_module":
                    inputs = inputs and not any(True for _ in self.modules[str(n.target)].state_dict())
                free[n] = inputs
            self._param_free = free
        return self._param_free.get(node, False)

    # -- parameters -----------------------------------------------------------------------------
    def param(self, name: str) -> AbsTensor:
        """The layouts of a state-dict entry (created on first use, shared by every later use)."""
        if name not in self.params:
            shape = self.state_shapes[name]
            self.params[name] = AbsTensor(tuple(self.algebra.plain(n) for n in shape))
            self.first_use[name] = self.index
        return self.params[name]

    def has_param(self, name: str) -> bool:
        return name in self.state_shapes

    def set_role(self, name: str, axis: int, role: Role) -> None:
        self.roles[(name, axis)] = role

    # -- helpers for rules ----------------------------------------------------------------------
    def fresh(self, shape: tuple[int, ...], reason: str | None = None) -> AbsTensor:
        """New axes; pinned with ``reason`` when given."""
        tensor = AbsTensor(tuple(self.algebra.plain(n) for n in shape))
        if reason is not None:
            self.pin(tensor, reason)
        return tensor

    def pin(self, value: AbsValue, reason: str) -> None:
        for tensor in iter_tensors(value):
            for layout in tensor.axes:
                self.algebra.pin(self.algebra.leaves(layout), reason)

    def join(self, a: Layout, b: Layout, reason: str) -> None:
        """Join two layouts; when the algebra cannot, pin both instead (safe)."""
        try:
            self.algebra.join(a, b)
        except Conflict as exc:
            log.debug("pinning at %s: %s", reason, exc)
            self.algebra.pin(self.algebra.leaves(a) + self.algebra.leaves(b), f"{reason} ({exc})")

    def plain(self, value: AbsValue) -> AbsTensor:
        """An :class:`AbsTensor` view of a value; a :class:`Stacked` one is collapsed (its parts joined)."""
        if isinstance(value, AbsTensor):
            return value
        if isinstance(value, Stacked):
            first = value.parts[0]
            for part in value.parts[1:]:
                for a, b in zip(first.axes, part.axes):
                    self.join(a, b, "stacked view used whole")
            stack = self.algebra.plain(len(value.parts))
            self.algebra.pin_layout(stack, "stacked view used whole")
            axes = list(first.axes)
            axes.insert(value.axis, stack)
            return AbsTensor(tuple(axes))
        raise Conflict(f"expected a tensor, got {type(value).__name__}")


def _holds_tensor(info: object) -> bool:
    if isinstance(info, TensorInfo):
        return True
    if isinstance(info, (tuple, list)):
        return any(_holds_tensor(i) for i in info)
    return False


def iter_tensors(value: AbsValue) -> Iterator[AbsTensor]:
    if isinstance(value, AbsTensor):
        yield value
    elif isinstance(value, Stacked):
        yield from value.parts
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from iter_tensors(item)


@dataclass
class Call:
    """One node as op rules see it: concrete args (tensors as TensorInfo) and abstract tensor args."""

    walker: Walker
    node: fx.Node

    @property
    def out(self) -> object:
        return self.walker.values[self.node]

    @property
    def out_shape(self) -> tuple[int, ...]:
        out = self.out
        if not isinstance(out, TensorInfo):
            raise Conflict("op output is not a tensor")
        return out.shape

    def concrete(self, value: Any) -> Any:
        """``value`` with every node replaced by what the example run recorded for it."""
        return fx.node.map_arg(value, lambda n: self.walker.values[n])  # type: ignore[arg-type,return-value]

    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """A concrete positional-or-keyword argument."""
        if index < len(self.node.args):
            return self.concrete(self.node.args[index])
        if name is not None and name in self.node.kwargs:
            return self.concrete(self.node.kwargs[name])
        return default

    def abs(self, index: int, name: str | None = None) -> AbsValue:
        raw = self.node.args[index] if index < len(self.node.args) else self.node.kwargs.get(name or "")
        return self.walker.env.get(raw) if isinstance(raw, fx.Node) else None

    def tensor(self, index: int, name: str | None = None) -> AbsTensor:
        value = self.abs(index, name)
        if value is None:
            raise Conflict(f"argument {index} is not a traced tensor")
        return self.walker.plain(value)

    def tensor_args(self) -> list[tuple[fx.Node, TensorInfo]]:
        """Every tensor-valued node among args and kwargs, in order."""
        found: list[tuple[fx.Node, TensorInfo]] = []

        def visit(n: fx.Node) -> fx.Node:
            info = self.walker.values.get(n)
            if isinstance(info, TensorInfo) and n not in [f for f, _ in found]:
                found.append((n, info))
            return n

        fx.node.map_arg((self.node.args, self.node.kwargs), visit)
        return found


Rule = Callable[[Call], AbsValue]
