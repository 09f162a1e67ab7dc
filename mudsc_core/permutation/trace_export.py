"""The tracer's second front end: an ATen-level capture by ``torch.export`` and rules for its ops.

``torch.fx.symbolic_trace`` cannot follow Hugging Face transformers 5 models (item assignment on
proxies, ``co_varnames`` of their decorated forwards). ``torch.export.export`` (non-strict) can: it
runs the forward with fake tensors and records ATen ops. :func:`export_capture` turns the exported
program into a graph the walker already understands: the unlifted module (``ep.module()``), whose
parameters and buffers are ``get_attr`` nodes named by their state-dict entries, each moved right
before its first use (forward order of the groups), with the export's guard and assertion nodes
removed. :data:`ATEN_RULES` maps the ATen ops these models use onto the tracer's existing rules
(``trace_rules``/``trace_shapes``), keyed by op packet (``aten.linear``) so every overload shares a rule.

An op without a rule pins what it touches, as for fx graphs; an op that no parameter flows into
(masks, positions, arange/ge/gather) gets pinned outputs without touching anything else.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn

from mudsc_core.permutation.trace_algebra import Conflict
from mudsc_core.permutation.trace_rules import (
    _param_name,
    conv_into,
    elementwise,
    functional_layer_norm,
    functional_linear,
    matmul,
    reduction,
    sdpa,
    unary,
)
from mudsc_core.permutation.trace_shapes import _index, cat, expand, norm_dim, permute_by, reshape, split, unbind
from mudsc_core.permutation.trace_walk import AbsTensor, AbsValue, Call, Rule, TensorInfo

aten = torch.ops.aten

# Ops that only check metadata at run time (no value): nothing to join, nothing to pin.
_ASSERTS = ("_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range_for_size")


# --------------------------------------------------------------------------- capture
def export_capture(
    model: nn.Module, inputs: Mapping[str, Tensor] | tuple[Tensor, ...]
) -> tuple[fx.GraphModule, list[Any]]:
    """``torch.export`` (non-strict, eval mode, no grad, ``use_cache=False`` where the forward takes it).

    Returns the adapted graph module and its flat inputs in placeholder order.
    """
    args: tuple[Any, ...] = tuple(inputs) if isinstance(inputs, tuple) else ()
    kwargs: dict[str, Any] = dict(inputs) if isinstance(inputs, Mapping) else {}
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        parameters = {}  # type: ignore[assignment]
    if "use_cache" in parameters and "use_cache" not in kwargs:
        kwargs["use_cache"] = False  # a DynamicCache output is not a pytree
    training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            program = torch.export.export(model, args, kwargs, strict=False)
    finally:
        for module, mode in training:
            module.train(mode)
    gm = program.module()
    assert isinstance(gm, fx.GraphModule)
    _adapt(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    positional = iter(args)
    flat: list[Any] = []
    for node in placeholders:
        name = str(node.target)
        if name in kwargs:
            flat.append(kwargs[name])
        else:
            flat.append(next(positional))
    return gm, flat


def _adapt(gm: fx.GraphModule) -> None:
    """Drop guards and assertions; move every ``get_attr`` right before its first user."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.users:
            continue
        if (node.op == "call_module" and str(node.target).startswith("_guards")) or (
            node.op == "call_function" and _op_name(node.target) in _ASSERTS
        ):
            graph.erase_node(node)
    position = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.users:
            first = min(node.users, key=lambda u: position[u])
            first.prepend(node)
    graph.lint()
    gm.recompile()


def _op_name(target: object) -> str:
    """``aten.linear.default`` -> ``linear``; anything else -> ``""``."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target._opname)
    return ""


# --------------------------------------------------------------------------- rules
def _identity(call: Call) -> AbsValue:
    """dropout (identity in eval), dtype/device casts, copies and aliases."""
    return unary(call)


def _no_value(call: Call) -> AbsValue:
    return None


def _embedding(call: Call) -> AbsValue:
    """aten.embedding(weight, indices): the table's feature axis is the output's; the vocabulary is indexed."""
    name = _param_name(call, 0, "weight")
    if name is None:
        raise Conflict("embedding of a computed table")
    w = call.walker
    table = w.param(name)
    w.algebra.pin_layout(table.axes[0], "embedding vocabulary")
    return AbsTensor(call.tensor(1).axes + (table.axes[1],))


def _transpose(call: Call) -> AbsValue:
    ndim = len(call.out_shape)
    a, b = norm_dim(call.arg(1, "dim0"), ndim), norm_dim(call.arg(2, "dim1"), ndim)
    dims = list(range(ndim))
    dims[a], dims[b] = dims[b], dims[a]
    return permute_by(call, dims)


def _permute(call: Call) -> AbsValue:
    dims = call.arg(1, "dims")
    if not isinstance(dims, (tuple, list)):
        raise Conflict("permute without a list of dims")
    return permute_by(call, [norm_dim(d, len(call.out_shape)) for d in dims])


def _t(call: Call) -> AbsValue:
    return permute_by(call, list(reversed(range(len(call.out_shape)))))


def _slice(call: Call) -> AbsValue:
    """aten.slice(x, dim, start, end, step) as the indexing x[:, ..., start:end:step]."""
    x = call.tensor(0)
    dim = norm_dim(call.arg(1, "dim", 0), x.ndim)
    start, end, step = call.arg(2, "start"), call.arg(3, "end"), call.arg(4, "step", 1)
    if any(v is not None and not isinstance(v, int) for v in (start, end, step)):
        raise Conflict("slice with symbolic bounds")
    items: list[object] = [slice(None)] * dim + [slice(start, end, step)]
    return _index(call, x, items)


def _select(call: Call) -> AbsValue:
    """aten.select(x, dim, index): an integer index pins and drops the axis."""
    x = call.tensor(0)
    dim = norm_dim(call.arg(1, "dim"), x.ndim)
    index = call.arg(2, "index")
    if not isinstance(index, int):
        raise Conflict("select with a symbolic index")
    items: list[object] = [slice(None)] * dim + [index]
    return _index(call, x, items)


def _matmul(call: Call) -> AbsValue:
    """matmul/bmm/mm; a parameter operand's contracted axis is its "in" axis."""
    out = matmul(call)
    for index, axis in ((0, -1), (1, -2)):
        name = _param_name(call, index, "self" if index == 0 else "other")
        if name is not None:
            call.walker.set_role(name, len(call.walker.state_shapes[name]) + axis, "in")
    return out


def _addmm(call: Call) -> AbsValue:
    """aten.addmm(bias, x, W) = bias + x @ W (GPT-2's Conv1D: W is (in, out))."""
    w = call.walker
    x, wt = call.tensor(1), call.tensor(2)
    w.join(x.axes[-1], wt.axes[0], "addmm")
    weight = _param_name(call, 2, "mat2")
    if weight is not None:
        w.set_role(weight, 0, "in")
    bias = call.abs(0, "self")
    if bias is not None:
        b = w.plain(bias)
        bias_shape = call.arg(0).shape
        if bias_shape and bias_shape[-1] == call.out_shape[-1]:
            w.join(b.axes[-1], wt.axes[1], "addmm bias")
        if len(bias_shape) == 2 and bias_shape[0] == call.out_shape[0]:
            w.join(b.axes[0], x.axes[0], "addmm bias")
    return AbsTensor((x.axes[0], wt.axes[1]))


def _sdpa(call: Call) -> AbsValue:
    if call.arg(7, "enable_gqa", False):
        raise Conflict("scaled_dot_product_attention with enable_gqa")
    return sdpa(call)


def _conv(call: Call) -> AbsValue:
    """aten.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups) on parameters."""
    weight, bias = _param_name(call, 1, "weight"), _param_name(call, 2, "bias")
    if weight is None or (bias is None and call.abs(2, "bias") is not None):
        raise Conflict("convolution with a computed weight")
    groups = call.arg(6, "groups", 1)
    if not isinstance(groups, int):
        raise Conflict("convolution with symbolic groups")
    return conv_into(call, call.tensor(0), weight, bias, groups)


def _batch_norm(call: Call) -> AbsValue:
    """Batch norm in inference: the channel axis (1) joins the affine and running statistics."""
    w = call.walker
    x = call.tensor(0)
    names = ("weight", "bias", "running_mean", "running_var")
    for index, name in enumerate(names, start=1):
        param = call.abs(index, name)
        if param is not None:
            w.join(w.plain(param).axes[0], x.axes[1], "batchnorm")
    out = call.out
    if isinstance(out, (tuple, list)):  # _native_batch_norm_legit_no_training: (out, mean, rstd)
        extra = [w.fresh(i.shape, "batchnorm statistics") if isinstance(i, TensorInfo) else None for i in out[1:]]
        return (x, *extra)
    return x


def _pool(call: Call) -> AbsValue:
    """Pooling keeps batch and channels and mixes positions: spatial axes are pinned."""
    name = _op_name(call.node.target)
    digits = [c for c in name if c.isdigit()]
    spatial = int(digits[-1]) if digits else 2
    x = call.tensor(0)
    keep = x.ndim - spatial
    for k in range(keep, x.ndim):
        call.walker.algebra.pin_layout(x.axes[k], f"{name} spatial")
    out = call.out
    shape = out.shape if isinstance(out, TensorInfo) else out[0].shape  # type: ignore[index]
    pooled = AbsTensor(x.axes[:keep] + call.walker.fresh(shape[keep:], f"{name} spatial").axes)
    if isinstance(out, (tuple, list)):  # max_pool2d_with_indices
        return (pooled, AbsTensor(pooled.axes))
    return pooled


_UNARY_OPS = (
    "relu",
    "gelu",
    "silu",
    "tanh",
    "sigmoid",
    "elu",
    "leaky_relu",
    "softplus",
    "hardswish",
    "hardtanh",
    "mish",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "abs",
    "neg",
    "erf",
    "cos",
    "sin",
    "square",
    "reciprocal",
    "softmax",
    "_softmax",
    "log_softmax",
    "_log_softmax",
    "relu_",
    "gelu_",
    "silu_",
)
_IDENTITY_OPS = (
    "dropout",
    "feature_dropout",
    "alpha_dropout",
    "to",
    "_to_copy",
    "type_as",
    "contiguous",
    "clone",
    "alias",
    "detach",
    "lift_fresh_copy",
)
_ELEMENTWISE_OPS = (
    "add",
    "sub",
    "rsub",
    "mul",
    "div",
    "pow",
    "maximum",
    "minimum",
    "where",
    "masked_fill",
    "clamp",
    "clamp_min",
    "clamp_max",
    "lerp",
    "add_",
    "mul_",
    "sub_",
    "div_",
)
_REDUCTIONS = ("sum", "mean", "amax", "amin", "var", "std", "logsumexp", "prod")
_RESHAPES = ("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as")
_POOL_OPS = tuple(
    f"{kind}_pool{n}d{suffix}"
    for kind in ("avg", "max", "adaptive_avg", "adaptive_max")
    for n in (1, 2, 3)
    for suffix in ("", "_with_indices")
)


def _packet(name: str) -> object | None:
    return getattr(aten, name, None)


def _table() -> dict[object, Rule]:
    named: dict[str, Rule] = {
        **{n: unary for n in _UNARY_OPS},
        **{n: _identity for n in _IDENTITY_OPS},
        **{n: elementwise for n in _ELEMENTWISE_OPS},
        **{n: reduction for n in _REDUCTIONS},
        **{n: reshape for n in _RESHAPES},
        **{n: _pool for n in _POOL_OPS},
        **{n: _no_value for n in _ASSERTS},
        "linear": functional_linear,
        "embedding": _embedding,
        "layer_norm": functional_layer_norm,
        "transpose": _transpose,
        "swapaxes": _transpose,
        "permute": _permute,
        "t": _t,
        "expand": expand,
        "broadcast_to": expand,
        "slice": _slice,
        "select": _select,
        "cat": cat,
        "concat": cat,
        "split": split,
        "split_with_sizes": split,
        "chunk": split,
        "unbind": unbind,
        "scaled_dot_product_attention": _sdpa,
        "matmul": _matmul,
        "bmm": _matmul,
        "mm": _matmul,
        "addmm": _addmm,
        "conv1d": _conv,
        "conv2d": _conv,
        "conv3d": _conv,
        "batch_norm": _batch_norm,
        "_native_batch_norm_legit_no_training": _batch_norm,
    }
    table: dict[object, Rule] = {}
    for name, rule in named.items():
        packet = _packet(name)
        if packet is not None:
            table[packet] = rule
    return table


ATEN_RULES: dict[object, Rule] = _table()


def aten_rule(target: object) -> Rule | None:
    """The rule of an ATen op overload (``aten.linear.default``), by its packet; ``None`` if unknown."""
    if isinstance(target, torch._ops.OpOverload):
        return ATEN_RULES.get(target.overloadpacket)
    return None


def is_aten(target: object) -> bool:
    return isinstance(target, torch._ops.OpOverload)
