"""Rules for leaf modules (Linear, Conv, norms, pools, Embedding) and the dispatcher over every fx node.

A leaf module's parameters are the state-dict entries ``{module}.{name}``; its rule joins their
axes with the activations' axes. Unknown leaf modules and unknown functions pin every axis
they touch (inputs, outputs, parameters) and name themselves in the pin reason.
"""

from __future__ import annotations

import logging

from torch import fx, nn

from mudsc_core.permutation.trace_algebra import Conflict
from mudsc_core.permutation.trace_export import aten_rule, is_aten
from mudsc_core.permutation.trace_rules import (
    _POOLS,
    _UNARY_MODULES,
    FUNCTION_RULES,
    METHOD_RULES,
    conv_into,
    linear_into,
    unary,
)
from mudsc_core.permutation.trace_shapes import reshape_to
from mudsc_core.permutation.trace_walk import AbsTensor, AbsValue, Call, TensorInfo, Walker, iter_tensors

log = logging.getLogger(__name__)


def _linear(call: Call, module: nn.Module, prefix: str) -> AbsValue:
    bias = f"{prefix}.bias" if getattr(module, "bias", None) is not None else None
    return linear_into(call, call.tensor(0), f"{prefix}.weight", bias)


def _conv(call: Call, module: nn.Module, prefix: str) -> AbsValue:
    """Channels join the weight's columns ("in") and rows; grouped convs factor channels by group."""
    assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    bias = f"{prefix}.bias" if module.bias is not None else None
    return conv_into(call, call.tensor(0), f"{prefix}.weight", bias, int(module.groups))


def _batchnorm(call: Call, module: nn.Module, prefix: str) -> AbsValue:
    w = call.walker
    x = call.tensor(0)
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        name = f"{prefix}.{leaf}"
        if w.has_param(name):
            w.join(w.param(name).axes[0], x.axes[1], "batchnorm")
    return x


def _layernorm(call: Call, module: nn.Module, prefix: str) -> AbsValue:
    """LayerNorm/RMSNorm modules are equivariant over the normalised axes; their affine joins them."""
    w = call.walker
    x = call.tensor(0)
    shape = getattr(module, "normalized_shape", None)
    k = len(shape) if shape is not None else 1
    for leaf in ("weight", "bias"):
        name = f"{prefix}.{leaf}"
        if w.has_param(name):
            param = w.param(name)
            for i in range(k):
                w.join(param.axes[i], x.axes[x.ndim - k + i], "layernorm")
    return x


def _groupnorm(call: Call, module: nn.Module, prefix: str) -> AbsValue:
    """GroupNorm: channels factor into (groups, channels per group); groups become blocks."""
    assert isinstance(module, nn.GroupNorm)
    w = call.walker
    x = call.tensor(0)
    norm = w.algebra.normalize(x.axes[1])
    if norm is None or len(norm) != 1:
        raise Conflict("groupnorm over cut channels")
    if 1 < module.num_groups < module.num_channels:
        w.algebra.split_seg(norm[0], (module.num_groups, module.num_channels // module.num_groups))
    for leaf in ("weight", "bias"):
        name = f"{prefix}.{leaf}"
        if w.has_param(name):
            w.join(w.param(name).axes[0], x.axes[1], "groupnorm")
    return x


def _pool(call: Call, module: nn.Module, prefix: str) -> AbsValue:
    """Pooling keeps batch and channels and mixes positions: spatial axes are pinned."""
    name = type(module).__name__
    spatial = int(name[-2]) if name[-2].isdigit() else 2
    x = call.tensor(0)
    keep = x.ndim - spatial
    for k in range(keep, x.ndim):
        call.walker.algebra.pin_layout(x.axes[k], f"{name} spatial")
    return AbsTensor(x.axes[:keep] + call.walker.fresh(call.out_shape[keep:], f"{name} spatial").axes)


def _flatten(call: Call, module: nn.Module, prefix: str) -> AbsValue:
    return reshape_to(call, call.tensor(0), call.out_shape)


def _embedding(call: Call, module: nn.Module, prefix: str) -> AbsValue:
    """The table's feature axis is the output's; the vocabulary axis is indexed by the input."""
    w = call.walker
    table = w.param(f"{prefix}.weight")
    w.algebra.pin_layout(table.axes[0], "embedding vocabulary")
    return AbsTensor(call.tensor(0).axes + (table.axes[1],))


_MODULE_RULES = (
    ((nn.Linear,), _linear),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), _batchnorm),
    ((nn.LayerNorm,), _layernorm),
    ((nn.GroupNorm,), _groupnorm),
    (_POOLS, _pool),
    ((nn.Flatten,), _flatten),
    ((nn.Embedding,), _embedding),
)


def _module_rule(call: Call) -> AbsValue:
    target = str(call.node.target)
    module = call.walker.modules[target]
    if isinstance(module, _UNARY_MODULES):
        return unary(call)
    for types, rule in _MODULE_RULES:
        if isinstance(module, types):
            return rule(call, module, target)
    raise Conflict(f"no rule for module {type(module).__name__}")


def _get_attr(walker: Walker, node: fx.Node) -> AbsValue:
    name = str(node.target)
    if walker.has_param(name):
        return walker.param(name)
    info = walker.values[node]
    if isinstance(info, TensorInfo):
        return walker.fresh(info.shape, f"constant tensor {name}")
    return None


def _describe(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_function":
        return getattr(target, "__name__", str(target))
    return f"{node.op} {target}"


def _pin_unknown(walker: Walker, node: fx.Node, why: str) -> AbsValue:
    """Pin everything an op we cannot follow touches: its tensor inputs, its outputs, its parameters."""
    reason = f"{_describe(node)}: {why}"
    call = Call(walker, node)
    for arg, _ in call.tensor_args():
        walker.pin(walker.env.get(arg), reason)
    if node.op == "call_module":
        prefix = f"{node.target}."
        for name in walker.state_shapes:
            if name.startswith(prefix) and name.count(".") == prefix.count("."):
                walker.pin(walker.param(name), reason)
    return _fresh_like(walker, walker.values[node], reason)


def _fresh_like(walker: Walker, info: object, reason: str) -> AbsValue:
    if isinstance(info, TensorInfo):
        return walker.fresh(info.shape, reason)
    if isinstance(info, (tuple, list)):
        return tuple(_fresh_like(walker, item, reason) for item in info)
    return None


def _contains_tensor(info: object) -> bool:
    if isinstance(info, TensorInfo):
        return True
    if isinstance(info, (tuple, list)):
        return any(_contains_tensor(i) for i in info)
    return False


def _leaves(value: object) -> list[object]:
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    return [value]


def _output_tensor(walker: Walker, leaf: object) -> AbsTensor | None:
    """A flattened output's layouts (None for a non-tensor output or one no rule followed: it stays pinned)."""
    if not isinstance(leaf, fx.Node):
        return None
    value = walker.env.get(leaf)
    if value is None or not isinstance(walker.values.get(leaf), TensorInfo):
        return None
    return walker.plain(value)


def apply_rule(walker: Walker, node: fx.Node) -> AbsValue:
    """The abstract value of one node (pinning what no rule covers)."""
    if node.op == "placeholder":
        value = _fresh_like(walker, walker.values.get(node), "model input")
        for tensor in iter_tensors(value):
            walker.input_atoms.extend(a for layout in tensor.axes for a in walker.algebra.leaves(layout))
        return value
    if node.op == "get_attr":
        return _get_attr(walker, node)
    if node.op == "output":
        if walker.free_outputs:  # one entry per flattened output, in the order the model returns them
            walker.outputs = [_output_tensor(walker, leaf) for leaf in _leaves(node.args[0])]
        for tensor in iter_tensors(fx.node.map_arg(node.args[0], lambda n: walker.env.get(n))):
            if not walker.free_outputs:
                walker.pin(tensor, "model output")
            walker.output_atoms.extend(a for layout in tensor.axes for a in walker.algebra.leaves(layout))
        return None
    call = Call(walker, node)
    if node.op == "call_module":
        rule = _module_rule
    elif node.op == "call_function" and is_aten(node.target):
        rule = aten_rule(node.target)  # type: ignore[assignment]
    elif node.op == "call_function":
        rule = FUNCTION_RULES.get(node.target)  # type: ignore[assignment]
    else:
        rule = METHOD_RULES.get(str(node.target))  # type: ignore[assignment]
    if rule is None:
        if not _contains_tensor(walker.values[node]) and not call.tensor_args():
            return None  # arithmetic on sizes
        if node.op == "call_method" and str(node.target) in ("size", "dim", "numel"):
            return None
        return _pin_unknown(walker, node, "no rule")
    try:
        return rule(call)
    except Conflict as exc:
        log.debug("pinning %s: %s", node, exc)
        return _pin_unknown(walker, node, str(exc))
    except (IndexError, KeyError, TypeError, ValueError, AssertionError) as exc:
        # An op used in a way its rule does not expect: pinning stays correct, the report says where.
        log.warning("no rule applies to %s (%s: %s); pinning its axes", node.format_node(), type(exc).__name__, exc)
        return _pin_unknown(walker, node, f"unexpected use ({type(exc).__name__})")
