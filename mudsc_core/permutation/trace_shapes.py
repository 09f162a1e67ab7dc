"""Shape rules of the tracer: view/reshape/flatten factorise axes, transpose/permute reorder them,
cat/split/chunk/slice cut them into segments, integer indexing pins them (TRACING.md).

A reshape whose leading factor is only ever indexed (the 3 of a fused qkv viewed as (B, T, 3, H, d)
and unpacked into q, k, v) gives a :class:`Stacked` value: q, k and v are separate spaces, so they
can form separate groups (qk and v) instead of one shared one.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from mudsc_core.permutation.trace_algebra import Conflict, Layout, Seg
from mudsc_core.permutation.trace_walk import AbsTensor, AbsValue, Call, Stacked, TensorInfo


def norm_dim(dim: object, ndim: int) -> int:
    if not isinstance(dim, int):
        raise Conflict(f"dimension {dim!r} is not an int")
    return dim % ndim if ndim else 0


def _reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of source and destination dims with equal products (size-1 dims stand alone)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1:
            groups.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1:
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(src) or j >= len(dst):
            raise Conflict("reshape of different numbers of elements")
        ins, outs = [i], [j]
        pi, pj = src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                if i >= len(src):
                    raise Conflict("reshape sizes do not line up")
                pi *= src[i]
                ins.append(i)
                i += 1
            else:
                if j >= len(dst):
                    raise Conflict("reshape sizes do not line up")
                pj *= dst[j]
                outs.append(j)
                j += 1
        groups.append((ins, outs))
    return groups


def reshape_to(call: Call, x: AbsTensor, dst: tuple[int, ...]) -> AbsValue:
    """view/reshape/flatten: split or merge axes into factors (see module docstring of trace_algebra)."""
    w = call.walker
    src = tuple(w.algebra.layout_size(a) for a in x.axes)
    axes: list[Layout | None] = [None] * len(dst)
    stacked: tuple[list[int], list[list[Layout]]] | None = None
    for ins, outs in _reshape_groups(src, dst):
        if not outs:
            continue
        if not ins:
            axes[outs[0]] = ((),)
        elif len(ins) == 1 and len(outs) == 1:
            axes[outs[0]] = x.axes[ins[0]]
        elif len(ins) == 1:
            split = _split(call, x.axes[ins[0]], tuple(dst[o] for o in outs), outs[0])
            if isinstance(split, list) and stacked is None:
                stacked = (outs, split)
                for o in outs:
                    axes[o] = ((),)
                continue
            if isinstance(split, list):
                split = _collapse(call, split, dst[outs[0]])
            for o, layout in zip(outs, split):
                axes[o] = layout
        elif len(outs) == 1:
            try:
                axes[outs[0]] = _merge(call, [x.axes[i] for i in ins])
            except Conflict as exc:
                # Only these axes cannot be followed (batch and tokens flattened for a matmul, with the
                # tokens cut by a mask): pin them here and keep following the other axes.
                reason = f"reshape {getattr(call.node.target, '__name__', call.node.target)}: {exc}"
                for i in ins:
                    w.algebra.pin_layout(x.axes[i], reason)
                axes[outs[0]] = w.fresh((dst[outs[0]],), reason).axes[0]
        else:
            raise Conflict("reshape mixes several axes into several axes")
    filled = tuple(a if a is not None else w.algebra.plain(n) for a, n in zip(axes, dst))
    if stacked is None:
        return AbsTensor(filled)
    outs, part_layouts = stacked
    parts = []
    for layouts in part_layouts:
        full = list(filled)
        for o, layout in zip(outs[1:], layouts):
            full[o] = layout
        del full[outs[0]]
        parts.append(AbsTensor(tuple(full)))
    return Stacked(outs[0], parts)


def _split(
    call: Call, layout: Layout, sizes: tuple[int, ...], first_axis: int
) -> tuple[Layout, ...] | list[list[Layout]]:
    """Factor one axis into ``sizes``; a leading factor that is only ever indexed gives parts (a list)."""
    alg = call.walker.algebra
    norm = alg.normalize(layout)
    if norm is None:
        raise Conflict("reshape of a non-contiguous layout")
    lead, rest = sizes[0], sizes[1:]
    wants_stack = bool(rest) and _only_indexed(call.node, first_axis)
    if len(norm) == 1 and not wants_stack:
        return tuple((seg,) for seg in alg.split_seg(norm[0], sizes))
    part_size = alg.layout_size(norm) // lead
    pieces = [alg.normalize(alg.slice_layout(norm, k * part_size, (k + 1) * part_size)) for k in range(lead)]
    if any(p is None or len(p) != 1 for p in pieces):
        raise Conflict("reshape of a cut axis into factors")
    parts: list[list[Layout]] = [[(seg,) for seg in alg.split_seg(p[0], rest)] for p in pieces if p is not None]
    return parts


def _collapse(call: Call, parts: list[list[Layout]], lead: int) -> tuple[Layout, ...]:
    """Parts that are not kept separate: join them and give the leading factor a pinned atom."""
    for part in parts[1:]:
        for a, b in zip(parts[0], part):
            call.walker.join(a, b, "reshape into a used factor")
    stack = call.walker.algebra.plain(lead)
    call.walker.algebra.pin_layout(stack, "reshape of cut axis")
    return (stack,) + tuple(parts[0])


def _only_indexed(node: fx.Node, axis: int, depth: int = 0) -> bool:
    """True when every use of ``node`` ends in an integer index / unbind of ``axis`` (through permutes)."""
    if depth > 8 or not node.users:
        return False
    for user in node.users:
        target = user.target
        if target in ("permute", torch.permute) and user.args[0] is node:
            raw = user.args[1:] if len(user.args) > 2 or isinstance(user.args[1], int) else user.args[1]
            dims = [d for d in raw if isinstance(d, int)] if isinstance(raw, (tuple, list)) else []
            if len(dims) != len(raw) or axis not in [d % len(dims) for d in dims]:  # type: ignore[arg-type]
                return False
            mapped = [d % len(dims) for d in dims].index(axis)
            if not _only_indexed(user, mapped, depth + 1):
                return False
        elif target in ("contiguous",):
            if not _only_indexed(user, axis, depth + 1):
                return False
        elif target is operator.getitem and user.args[0] is node:
            if not (axis == 0 and isinstance(user.args[1], int)):
                index = user.args[1]
                if not (
                    isinstance(index, tuple)
                    and len(index) > axis
                    and isinstance(index[axis], int)
                    and all(isinstance(i, slice) and i == slice(None) for i in index[:axis])
                ):
                    return False
        elif target in ("unbind", torch.unbind):
            dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
            if dim != axis:
                return False
        else:
            return False
    return True


def _merge(call: Call, layouts: list[Layout]) -> Layout:
    """Merge axes (major first) into one: each major segment times the single-segment minors."""
    alg = call.walker.algebra
    norms = [alg.normalize(a) for a in layouts]
    if any(n is None for n in norms):
        raise Conflict("merge of a non-contiguous layout")
    major, minors = norms[0], norms[1:]
    assert major is not None
    tail: tuple[int, ...] = ()
    for minor in minors:
        assert minor is not None
        if len(minor) != 1:
            raise Conflict("merge of a cut minor axis")
        tail += minor[0]
    return tuple(seg + tail for seg in major)


def reshape(call: Call) -> AbsValue:
    return reshape_to(call, call.tensor(0), call.out_shape)


def permute(call: Call) -> AbsValue:
    ndim = len(call.out_shape)
    target = call.node.target
    if target in ("transpose", torch.transpose, "swapaxes"):
        a, b = norm_dim(call.arg(1, "dim0"), ndim), norm_dim(call.arg(2, "dim1"), ndim)
        dims = list(range(ndim))
        dims[a], dims[b] = dims[b], dims[a]
    elif target == "t":
        dims = list(reversed(range(ndim)))
    else:
        raw = call.node.args[1:] if len(call.node.args) > 2 else call.arg(1, "dims")
        dims = [norm_dim(d, ndim) for d in (raw if isinstance(raw, (tuple, list)) else (raw,))]
    return permute_by(call, dims)


def permute_by(call: Call, dims: list[int]) -> AbsValue:
    """The first argument with its axes reordered: output axis i is input axis ``dims[i]``."""
    value = call.abs(0)
    if isinstance(value, Stacked):
        new_axis = dims.index(value.axis)
        rest = [d - (d > value.axis) for d in dims if d != value.axis]
        return Stacked(new_axis, [AbsTensor(tuple(p.axes[d] for d in rest)) for p in value.parts])
    x = call.walker.plain(value)
    return AbsTensor(tuple(x.axes[d] for d in dims))


def getitem(call: Call) -> AbsValue:
    """Indexing: tuples pick an element; on tensors ints pin and drop an axis, slices cut it."""
    value = call.abs(0)
    index = call.arg(1)
    if isinstance(value, (tuple, list)):
        return value[index]
    if not isinstance(call.out, TensorInfo):
        return None
    items = list(index) if isinstance(index, tuple) else [index]
    if isinstance(value, Stacked):
        position = _stack_position(items, value.axis)
        if position is not None and isinstance(items[position], int):
            part = value.parts[items[position]]
            return _index(call, part, items[:position] + items[position + 1 :])
    return _index(call, call.walker.plain(value), items)


def _stack_position(items: list[object], axis: int) -> int | None:
    if any(i is None or i is Ellipsis for i in items[: axis + 1]):
        return None
    return axis if axis < len(items) else None


def _index(call: Call, x: AbsTensor, items: list[object]) -> AbsTensor:
    w = call.walker
    if any(isinstance(i, (TensorInfo, list)) for i in items):
        raise Conflict("advanced indexing")
    if Ellipsis in items:
        k = items.index(Ellipsis)
        fill = x.ndim - sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:k] + [slice(None)] * fill + items[k + 1 :]
    axes: list[Layout] = []
    dim = 0
    for item in items:
        if item is None:
            axes.append(((),))
            continue
        layout = x.axes[dim]
        size = w.algebra.layout_size(layout)
        if isinstance(item, int):
            w.algebra.pin_layout(layout, "integer index")
        elif isinstance(item, slice):
            start, stop, step = item.indices(size)
            if step != 1:
                w.algebra.pin_layout(layout, "strided slice")
                axes.append(w.algebra.plain(len(range(start, stop, step))))
            elif (start, stop) == (0, size):
                axes.append(layout)
            else:
                axes.append(w.algebra.slice_layout(layout, start, stop))
        else:
            raise Conflict(f"index {item!r}")
        dim += 1
    axes.extend(x.axes[dim:])
    return AbsTensor(tuple(axes))


def cat(call: Call) -> AbsValue:
    """cat: the cat axis is the sequence of the inputs' segments; every other axis joins."""
    raw = call.node.args[0] if call.node.args else call.node.kwargs.get("tensors")
    if not isinstance(raw, (tuple, list)) or not all(isinstance(n, fx.Node) for n in raw):
        raise Conflict("cat of a non-list")
    dim = norm_dim(call.arg(1, "dim", 0), len(call.out_shape))
    parts = [call.walker.plain(call.walker.env.get(n)) for n in raw]
    first = parts[0]
    for part in parts[1:]:
        for i, (a, b) in enumerate(zip(first.axes, part.axes)):
            if i != dim:
                call.walker.join(a, b, "cat")
    along: list[Seg] = []
    for part in parts:
        norm = call.walker.algebra.normalize(part.axes[dim])
        if norm is None:
            raise Conflict("cat of a non-contiguous layout")
        along.extend(norm)
    return AbsTensor(first.axes[:dim] + (tuple(along),) + first.axes[dim + 1 :])


def split(call: Call) -> AbsValue:
    """split/chunk: consecutive slices of one axis (sizes read from the recorded outputs)."""
    x = call.tensor(0)
    outs = call.out
    assert isinstance(outs, (tuple, list))
    dim = norm_dim(call.arg(2, "dim", 0), x.ndim)
    pieces: list[AbsTensor] = []
    start = 0
    for info in outs:
        assert isinstance(info, TensorInfo)
        stop = start + info.shape[dim]
        layout = call.walker.algebra.slice_layout(x.axes[dim], start, stop)
        pieces.append(AbsTensor(x.axes[:dim] + (layout,) + x.axes[dim + 1 :]))
        start = stop
    return tuple(pieces)


def unbind(call: Call) -> AbsValue:
    value = call.abs(0)
    dim = call.arg(1, "dim", 0)
    if isinstance(value, Stacked) and dim == value.axis:
        return tuple(value.parts)
    x = call.walker.plain(value)
    d = norm_dim(dim, x.ndim)
    call.walker.algebra.pin_layout(x.axes[d], "unbind")
    rest = x.axes[:d] + x.axes[d + 1 :]
    return tuple(AbsTensor(rest) for _ in range(x.ndim and call.walker.algebra.layout_size(x.axes[d])))


def expand(call: Call) -> AbsValue:
    """expand/broadcast_to: size-1 axes grow into new, unconstrained axes (copy atoms: the tensor repeats along them)."""
    x = call.tensor(0)
    alg = call.walker.algebra
    out = call.out_shape
    offset = len(out) - x.ndim
    axes = [alg.copy_layout(n) for n in out[:offset]]
    for j, layout in enumerate(x.axes):
        size = alg.layout_size(layout)
        axes.append(layout if size == out[offset + j] else alg.copy_layout(out[offset + j]))
    return AbsTensor(tuple(axes))


def repeat_interleave(call: Call) -> AbsValue:
    """x.repeat_interleave(r, dim): every entry of ``dim`` repeated r times in a row, a copy factor minor to it."""
    x = call.tensor(0)
    repeats = call.arg(1, "repeats")
    dim = call.arg(2, "dim")
    if not isinstance(repeats, int) or dim is None:
        raise Conflict("repeat_interleave without an int repeat count and a dim")
    d = norm_dim(dim, x.ndim)
    alg = call.walker.algebra
    norm = alg.normalize(x.axes[d])
    if norm is None or len(norm) != 1 or call.out_shape[d] != alg.layout_size(norm) * repeats:
        raise Conflict("repeat_interleave of a cut axis")
    copies = alg.copy_layout(repeats)
    layout: Layout = (norm[0] + copies[0],)
    return AbsTensor(x.axes[:d] + (layout,) + x.axes[d + 1 :])


def flatten(call: Call) -> AbsValue:
    return reshape_to(call, call.tensor(0), call.out_shape)


def getattr_rule(call: Call) -> AbsValue:
    if not isinstance(call.out, TensorInfo):
        return None
    x = call.tensor(0)
    attr = call.node.args[1]
    if attr == "T":
        return AbsTensor(tuple(reversed(x.axes)))
    if attr == "mT":
        return AbsTensor(x.axes[:-2] + (x.axes[-1], x.axes[-2]))
    raise Conflict(f"attribute {attr!r}")
