"""Op rules of the tracer (TRACING.md): how each op joins, cuts, factorises or pins tensor axes.

A rule gets a :class:`Call` and returns the node's abstract value. Anything without a rule is
unknown: :func:`apply_rule` pins every axis it touches, which is always safe.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from mudsc_core.permutation.trace_algebra import Conflict, Layout
from mudsc_core.permutation.trace_shapes import (
    cat,
    expand,
    flatten,
    getattr_rule,
    getitem,
    norm_dim,
    permute,
    repeat_interleave,
    reshape,
    split,
    unbind,
)
from mudsc_core.permutation.trace_walk import AbsTensor, AbsValue, Call, Rule, TensorInfo

_UNARY_FUNCS = {
    F.relu,
    F.gelu,
    F.silu,
    F.elu,
    F.leaky_relu,
    F.softplus,
    F.hardswish,
    F.mish,
    F.dropout,
    F.softmax,
    F.log_softmax,
    F.sigmoid,
    F.tanh,
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    torch.exp,
    torch.log,
    torch.sqrt,
    torch.rsqrt,
    torch.abs,
    torch.erf,
    torch.softmax,
    torch.log_softmax,
    torch.neg,
    operator.neg,
    operator.pos,
    torch.nn.functional.relu6,
    torch.clone,
    torch.square,
    torch.cos,
    torch.sin,
}
_UNARY_METHODS = {
    "relu",
    "gelu",
    "sigmoid",
    "tanh",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "abs",
    "neg",
    "erf",
    "softmax",
    "log_softmax",
    "contiguous",
    "clone",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type_as",
    "detach",
    "square",
    "relu_",
    "sigmoid_",
    "tanh_",
    "requires_grad_",
    "cos",
    "sin",
}
_ELEMENTWISE_FUNCS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.imul,
    operator.pow,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
    torch.where,
    torch.pow,
    torch.masked_fill,
    torch.clamp,
    torch.lerp,
}
_ELEMENTWISE_METHODS = {
    "add",
    "sub",
    "mul",
    "div",
    "add_",
    "sub_",
    "mul_",
    "div_",
    "pow",
    "masked_fill",
    "masked_fill_",
    "clamp",
    "clamp_min",
    "clamp_max",
    "maximum",
    "minimum",
    "where",
    "lerp",
}
_REDUCE = {"sum", "mean", "amax", "amin", "var", "std", "logsumexp", "prod", "norm"}
_UNARY_MODULES = (
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Dropout,
    nn.Identity,
    nn.LeakyReLU,
    nn.ELU,
    nn.Softplus,
    nn.Hardswish,
    nn.Mish,
    nn.ReLU6,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Dropout1d,
    nn.Dropout2d,
)
_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


# --------------------------------------------------------------------------- elementwise and friends
def unary(call: Call) -> AbsValue:
    value = call.abs(0)
    return value if isinstance(value, AbsTensor) else call.tensor(0)


def elementwise(call: Call) -> AbsValue:
    """Broadcasting: every operand axis of full size joins the output axis it lines up with.

    An operand that no parameter flows into (a rotary cos/sin table, a mask), combined with one
    that parameters do, is not joined: the axes it varies along are soft-pinned in the other
    operands (fixed, see ``trace_algebra``), so the heads of a rotary q/k stay free.
    """
    w = call.walker
    out_shape = call.out_shape
    axes: list[Layout | None] = [None] * len(out_shape)
    operands = call.tensor_args()
    tables = [w.param_free(node) for node, _ in operands]
    mixed = any(tables) and not all(tables)
    for (node, info), table in zip(operands, tables):
        if mixed and table:
            continue
        tensor = w.plain(w.env[node])
        offset = len(out_shape) - len(info.shape)
        for j, size in enumerate(info.shape):
            o = offset + j
            if size != out_shape[o] or size == 1:
                continue
            current = axes[o]
            if current is None:
                axes[o] = tensor.axes[j]
            else:
                w.join(current, tensor.axes[j], f"elementwise {call.node.target}")
    if mixed:
        reason = f"elementwise {getattr(call.node.target, '__name__', call.node.target)} with a non-parameter tensor"
        for (node, info), table in zip(operands, tables):
            if not table:
                continue
            tensor = w.plain(w.env[node])
            offset = len(out_shape) - len(info.shape)
            for j, size in enumerate(info.shape):
                o = offset + j
                if size != out_shape[o] or size == 1:
                    continue
                current = axes[o]
                if current is None:
                    w.algebra.pin_layout(tensor.axes[j], reason)
                    axes[o] = tensor.axes[j]
                else:
                    w.algebra.pin_soft(w.algebra.leaves(current), reason)
    return AbsTensor(tuple(a if a is not None else w.algebra.plain(n) for a, n in zip(axes, out_shape)))


def reduction(call: Call) -> AbsValue:
    """Reducing an axis removes it (a sum/mean does not depend on the axis' order)."""
    x = call.tensor(0)
    dims = call.arg(1, "dim")
    keep = bool(call.arg(2, "keepdim", call.node.kwargs.get("keepdim", False)))
    if call.node.target == "norm" or call.node.target is torch.norm:
        dims = call.arg(2, "dim")
        keep = bool(call.node.kwargs.get("keepdim", False))
    if dims is None:
        reduced = set(range(x.ndim))
    else:
        reduced = {norm_dim(d, x.ndim) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    axes = [((),) if i in reduced else layout for i, layout in enumerate(x.axes) if keep or i not in reduced]
    result = AbsTensor(tuple(axes))
    if len(result.axes) != len(call.out_shape):
        raise Conflict("reduction output rank mismatch")
    return result


def max_min(call: Call) -> AbsValue:
    """max/min: over everything -> a scalar; along a dim -> (values, indices), the indices pin the dim."""
    x = call.tensor(0)
    dim = call.arg(1, "dim")
    if isinstance(call.out, TensorInfo) and dim is None:
        return AbsTensor(())
    if isinstance(dim, int):
        d = norm_dim(dim, x.ndim)
        call.walker.algebra.pin_layout(x.axes[d], f"{call.node.target} indices")
        keep = bool(call.arg(2, "keepdim", False))
        axes = tuple(((),) if i == d else a for i, a in enumerate(x.axes) if keep or i != d)
        return (AbsTensor(axes), AbsTensor(axes))
    return elementwise(call)


# --------------------------------------------------------------------------- linear algebra
def matmul(call: Call) -> AbsValue:
    a, b = call.tensor(0), call.tensor(1)
    w = call.walker
    if a.ndim < 2 or b.ndim < 2:
        raise Conflict("matmul of vectors")
    w.join(a.axes[-1], b.axes[-2], "matmul")
    out_rank = len(call.out_shape)
    batch: list[Layout] = []
    a_info, b_info = call.arg(0), call.arg(1)
    assert isinstance(a_info, TensorInfo) and isinstance(b_info, TensorInfo)
    for o in range(out_rank - 2):
        picked: Layout | None = None
        for t, info in ((a, a_info), (b, b_info)):
            j = o - (out_rank - t.ndim)
            if j < 0 or info.shape[j] == 1:
                continue
            if picked is None:
                picked = t.axes[j]
            else:
                w.join(picked, t.axes[j], "matmul batch")
        batch.append(picked if picked is not None else w.algebra.plain(call.out_shape[o]))
    return AbsTensor(tuple(batch) + (a.axes[-2], b.axes[-1]))


def linear_into(call: Call, x: AbsTensor, weight: str, bias: str | None) -> AbsTensor:
    """y = x W^T + b: W's columns are the input's features ("in"), its rows the output's ("out")."""
    w = call.walker
    wt = w.param(weight)
    w.join(x.axes[-1], wt.axes[1], "linear")
    w.set_role(weight, 1, "in")
    if bias is not None:
        w.join(w.param(bias).axes[0], wt.axes[0], "linear bias")
    return AbsTensor(x.axes[:-1] + (wt.axes[0],))


def conv_into(call: Call, x: AbsTensor, weight: str, bias: str | None, groups: int) -> AbsTensor:
    """Convolution: channels join the weight's columns ("in") and rows; grouped convs factor channels by group."""
    w = call.walker
    wt = w.param(weight)
    spatial = wt.ndim - 2
    ch = x.ndim - spatial - 1
    w.set_role(weight, 1, "in")
    for k in range(2, 2 + spatial):
        w.algebra.pin_layout(wt.axes[k], "conv kernel")
    if groups == 1:
        w.join(x.axes[ch], wt.axes[1], "conv")
    else:
        alg = w.algebra
        x_norm, w_norm = alg.normalize(x.axes[ch]), alg.normalize(wt.axes[0])
        if x_norm is None or w_norm is None or len(x_norm) != 1 or len(w_norm) != 1:
            raise Conflict("grouped conv over cut channels")
        in_channels = alg.seg_size(x_norm[0])
        out_channels = alg.seg_size(w_norm[0])
        x_group, x_within = alg.split_seg(x_norm[0], (groups, in_channels // groups))
        w_group, _ = alg.split_seg(w_norm[0], (groups, out_channels // groups))
        w.join((x_group,), (w_group,), "grouped conv groups")
        w.join((x_within,), wt.axes[1], "grouped conv")
    if bias is not None:
        w.join(w.param(bias).axes[0], wt.axes[0], "conv bias")
    for k in range(ch + 1, x.ndim):
        w.algebra.pin_layout(x.axes[k], "conv spatial")
    out_spatial = call.out_shape[ch + 1 :]
    return AbsTensor(x.axes[:ch] + (wt.axes[0],) + w.fresh(out_spatial, "conv spatial").axes)


def _param_name(call: Call, index: int, name: str) -> str | None:
    raw = call.node.args[index] if index < len(call.node.args) else call.node.kwargs.get(name)
    if isinstance(raw, fx.Node) and raw.op == "get_attr" and call.walker.has_param(str(raw.target)):
        return str(raw.target)
    return None


def functional_linear(call: Call) -> AbsValue:
    """F.linear(x, W, b) on parameters reached by get_attr (functional models)."""
    weight, bias = _param_name(call, 1, "weight"), _param_name(call, 2, "bias")
    if weight is None or (bias is None and call.abs(2, "bias") is not None):
        raise Conflict("F.linear on a computed weight")
    return linear_into(call, call.tensor(0), weight, bias)


def functional_layer_norm(call: Call) -> AbsValue:
    """F.layer_norm(x, shape, weight, bias): equivariant over the normalised axes, affine joins them."""
    x = call.tensor(0)
    shape = call.arg(1, "normalized_shape")
    k = len(shape) if isinstance(shape, (tuple, list)) else 1
    for index, name in ((2, "weight"), (3, "bias")):
        param = call.abs(index, name)
        if param is not None:
            param = call.walker.plain(param)
            for i in range(k):
                call.walker.join(param.axes[i], x.axes[x.ndim - k + i], "layer_norm")
    return x


def functional_pool(call: Call) -> AbsValue:
    """F.*pool*d: batch and channels kept, spatial axes pinned."""
    name = getattr(call.node.target, "__name__", "pool")
    spatial = int(name[-2]) if name[-2].isdigit() else 2
    x = call.tensor(0)
    keep = x.ndim - spatial
    for k in range(keep, x.ndim):
        call.walker.algebra.pin_layout(x.axes[k], f"{name} spatial")
    return AbsTensor(x.axes[:keep] + call.walker.fresh(call.out_shape[keep:], f"{name} spatial").axes)


def sdpa(call: Call) -> AbsValue:
    """softmax(q k^T) v: q/k features join, k/v tokens join, batch/head axes of all three join."""
    q, k, v = call.tensor(0), call.tensor(1), call.tensor(2)
    w = call.walker
    w.join(q.axes[-1], k.axes[-1], "attention q.k")
    w.join(k.axes[-2], v.axes[-2], "attention k/v tokens")
    for i in range(q.ndim - 2):
        w.join(q.axes[i], k.axes[i], "attention batch")
        w.join(q.axes[i], v.axes[i], "attention batch")
    mask = call.abs(3, "attn_mask")
    if mask is not None:
        w.pin(mask, "attention mask")
        w.pin(AbsTensor(q.axes[-2:-1] + k.axes[-2:-1]), "attention mask")
    if call.arg(5, "is_causal", False):
        w.pin(AbsTensor(q.axes[-2:-1] + k.axes[-2:-1]), "causal attention")  # token order matters
    return AbsTensor(q.axes[:-1] + v.axes[-1:])


FUNCTION_RULES: dict[object, Rule] = {
    **{f: unary for f in _UNARY_FUNCS},
    **{f: elementwise for f in _ELEMENTWISE_FUNCS},
    torch.sum: reduction,
    torch.mean: reduction,
    torch.amax: reduction,
    torch.amin: reduction,
    torch.var: reduction,
    torch.std: reduction,
    torch.logsumexp: reduction,
    torch.norm: reduction,
    torch.max: max_min,
    torch.min: max_min,
    torch.matmul: matmul,
    operator.matmul: matmul,
    torch.bmm: matmul,
    torch.mm: matmul,
    F.scaled_dot_product_attention: sdpa,
    F.linear: functional_linear,
    F.layer_norm: functional_layer_norm,
    **{
        getattr(F, f"{kind}_pool{n}d"): functional_pool
        for kind in ("avg", "max", "adaptive_avg", "adaptive_max")
        for n in (1, 2, 3)
    },
    torch.reshape: reshape,
    torch.flatten: flatten,
    torch.squeeze: reshape,
    torch.unsqueeze: reshape,
    torch.transpose: permute,
    torch.permute: permute,
    torch.swapaxes: permute,
    operator.getitem: getitem,
    torch.cat: cat,
    torch.concat: cat,
    torch.split: split,
    torch.chunk: split,
    torch.unbind: unbind,
    getattr: getattr_rule,
    torch.broadcast_to: expand,
    torch.repeat_interleave: repeat_interleave,
}
METHOD_RULES: dict[str, Rule] = {
    **{m: unary for m in _UNARY_METHODS},
    **{m: elementwise for m in _ELEMENTWISE_METHODS},
    **{m: reduction for m in _REDUCE},
    "max": max_min,
    "min": max_min,
    "matmul": matmul,
    "bmm": matmul,
    "mm": matmul,
    "view": reshape,
    "reshape": reshape,
    "flatten": flatten,
    "unflatten": reshape,
    "view_as": reshape,
    "reshape_as": reshape,
    "squeeze": reshape,
    "unsqueeze": reshape,
    "transpose": permute,
    "permute": permute,
    "swapaxes": permute,
    "t": permute,
    "split": split,
    "chunk": split,
    "tensor_split": split,
    "unbind": unbind,
    "expand": expand,
    "expand_as": expand,
    "repeat_interleave": repeat_interleave,
}
