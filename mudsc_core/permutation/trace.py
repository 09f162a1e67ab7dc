"""Permutation specs derived from a model's own computation, and the check that makes them trustworthy.

:func:`trace_spec` captures the forward pass with torch.fx (or, when fx cannot, with torch.export:
``trace_export``), runs it once on example inputs to
learn every tensor's shape, walks the graph joining the axes that must be permuted together
(``trace_rules``/``trace_modules`` over the union-find of ``trace_algebra``) and assembles the
free classes into a :class:`PermSpec` (``trace_build``). :func:`self_check` accepts a spec only
when random permutations by it leave the model's outputs unchanged (TRACING.md).

Everything that stops a derivation or a check is an :class:`UnsupportedArchitecture` naming
what stopped it, so a worker can fail the job with a clear error instead of merging wrongly.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from mudsc_core.errors import ComputeOverflow, MergeError, UnsupportedArchitecture
from mudsc_core.permutation.permute import axis_index, block_permutation, permute_state_dict, random_permutations
from mudsc_core.permutation.spec import PermSpec
from mudsc_core.permutation.trace_build import GroupSummary, SpecAssembler
from mudsc_core.permutation.trace_export import export_capture
from mudsc_core.permutation.trace_modules import apply_rule
from mudsc_core.permutation.trace_walk import RecordingInterpreter, Walker

log = logging.getLogger(__name__)

Inputs = Mapping[str, Tensor] | tuple[Tensor, ...]

_OUTPUT_NOTE = (
    "every axis of the model's outputs is pinned (treated as labels/logits): the merged model keeps "
    "the output order of each input model"
)


@dataclass(frozen=True)
class TraceResult:
    """A derived spec and what the derivation found (for the job report)."""

    spec: PermSpec
    groups: tuple[GroupSummary, ...]
    pinned_by: dict[str, int] = field(default_factory=dict)  # op/reason -> units it pinned
    seconds: float = 0.0
    output_note: str = _OUTPUT_NOTE
    source: str = "traced"  # "given" when a caller supplied the spec
    capture: str = "fx"  # "fx" (torch.fx.symbolic_trace) or "export" (torch.export, ATen ops)
    capture_seconds: float = 0.0  # the part of ``seconds`` spent capturing the graph (torch.export dominates)

    @property
    def free_groups(self) -> tuple[GroupSummary, ...]:
        return tuple(g for g in self.groups if g.free)

    @property
    def pinned_groups(self) -> tuple[GroupSummary, ...]:
        return tuple(g for g in self.groups if not g.free)


# --------------------------------------------------------------------------- capture
def _capture(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, AttributeError, ... for what it cannot follow
        raise UnsupportedArchitecture(
            f"cannot capture the forward pass of {type(model).__name__} with torch.fx: {type(exc).__name__}: {exc}",
            stage="trace",
        ) from exc


def _capture_any(model: nn.Module, example_inputs: Inputs) -> tuple[fx.GraphModule, list[Any], str]:
    """torch.fx first (the built-ins' specs are fx's); torch.export when fx cannot capture the model."""
    try:
        gm = _capture(model)
    except UnsupportedArchitecture as fx_error:
        if not isinstance(example_inputs, (Mapping, tuple)):
            raise
        try:
            exported, args = export_capture(model, example_inputs)
        except Exception as exc:  # export raises many kinds of errors for what it cannot follow
            raise UnsupportedArchitecture(
                f"{fx_error.message}; nor with torch.export: {type(exc).__name__}: {_first_line(exc)}", stage="trace"
            ) from exc
        log.info("torch.fx cannot capture %s; captured with torch.export", type(model).__name__)
        return exported, args, "export"
    return gm, _positional(gm, example_inputs), "fx"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _positional(gm: fx.GraphModule, example_inputs: Inputs) -> list[Any]:
    """Example inputs in placeholder order (a dict is matched by argument name, defaults fill gaps)."""
    if isinstance(example_inputs, tuple):
        return list(example_inputs)
    if not isinstance(example_inputs, Mapping):
        raise UnsupportedArchitecture("example inputs must be a dict of tensors or a tuple of tensors", stage="trace")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    unknown = sorted(set(example_inputs) - {str(n.target) for n in placeholders})
    if unknown:
        raise UnsupportedArchitecture(f"the model's forward has no argument {unknown[0]!r}", stage="trace")
    args: list[Any] = []
    for node in placeholders:
        name = str(node.target)
        if name in example_inputs:
            args.append(example_inputs[name])
        elif node.args:
            args.append(node.args[0])
        else:
            raise UnsupportedArchitecture(f"no example input for argument {name!r}", stage="trace")
    return args


def _record(gm: fx.GraphModule, args: list[Any], *, set_eval: bool = True) -> dict[fx.Node, object]:
    """Run the graph once in eval mode (an exported graph was captured in eval mode and has no modes)."""
    interpreter = RecordingInterpreter(gm)
    training = [(m, m.training) for m in gm.modules()] if set_eval else []
    try:
        if set_eval:
            gm.eval()
        with torch.no_grad():
            interpreter.run(*args)
    except Exception as exc:  # any failure of the user's forward on the example inputs
        raise UnsupportedArchitecture(
            f"the captured graph does not run on the example inputs: {type(exc).__name__}: {exc}", stage="trace"
        ) from exc
    finally:
        for module, mode in training:
            module.train(mode)
    return interpreter.values


def _join_aliases(walker: Walker, model: nn.Module) -> None:
    """State-dict entries that share storage (tied embedding and head) must move as one tensor."""
    first: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in first:
            first[key] = name
            continue
        a, b = walker.param(first[key]), walker.param(name)
        for x, y in zip(a.axes, b.axes):
            walker.join(x, y, f"tied parameters {first[key]} and {name}")


_FREE_OUTPUT_NOTE = (
    "the model's outputs are features: their groups are free, so an align merge returns them in model 0's "
    "unit order (the merged model is a drop-in replacement for model 0)"
)


def trace_spec(model: nn.Module, example_inputs: Inputs, *, free_outputs: bool = False) -> TraceResult:
    """Derive the permutation spec of ``model`` from its computation on ``example_inputs``.

    ``free_outputs`` leaves the outputs' axes free (a features encoder merged by align, in model 0's order):
    the spec's ``outputs`` say how a permutation moves them, and the self-check permutes the expected
    outputs alike. By default every output axis is pinned (logits, labels).
    """
    start = time.perf_counter()
    gm, args, capture = _capture_any(model, example_inputs)
    captured = time.perf_counter() - start
    values = _record(gm, args, set_eval=capture == "fx")
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    walker = Walker(gm, values, shapes, free_outputs=free_outputs)
    try:
        for index, node in enumerate(gm.graph.nodes):
            walker.index = index
            walker.env[node] = apply_rule(walker, node)
        _join_aliases(walker, model)
        spec, groups = SpecAssembler(walker).build()
    except UnsupportedArchitecture:
        raise
    except Exception as exc:  # a tracer bug must still fail the job cleanly, never merge wrongly
        log.exception("tracer failed")
        raise UnsupportedArchitecture(
            f"cannot derive a permutation spec: {type(exc).__name__}: {exc}", stage="trace"
        ) from exc
    pinned_by: Counter[str] = Counter()
    for event in walker.algebra.events:
        pinned_by[event.reason] += sum(walker.algebra.sizes[a] for a in event.atoms)
    seconds = time.perf_counter() - start
    log.info(
        "traced %s (%s): %d free groups in %.1f ms", type(model).__name__, capture, len(spec.groups), 1000 * seconds
    )
    note = _FREE_OUTPUT_NOTE if spec.outputs else _OUTPUT_NOTE
    return TraceResult(
        spec, tuple(groups), dict(pinned_by), seconds, output_note=note, capture=capture, capture_seconds=captured
    )


# --------------------------------------------------------------------------- self-check
def _as_float(inputs: Inputs) -> Inputs:
    def cast(t: Tensor) -> Tensor:
        return t.float() if torch.is_floating_point(t) else t

    if isinstance(inputs, Mapping):
        return {k: cast(v) for k, v in inputs.items()}
    return tuple(cast(t) for t in inputs)


def _run(model: nn.Module, inputs: Inputs) -> list[Tensor]:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)
    return [t for t in _flatten(out)]


def _flatten(value: object) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value.float()]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _flatten(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    return []


def _relative_error(expected: list[Tensor], actual: list[Tensor]) -> float:
    worst = 0.0
    for a, b in zip(expected, actual):
        scale = max(float(a.abs().max()) if a.numel() else 0.0, 1e-12)
        worst = max(worst, float((a - b).abs().max()) / scale if a.numel() else 0.0)
    return worst


@dataclass
class _Checker:
    model: nn.Module
    spec: PermSpec
    inputs: Inputs
    state: dict[str, Tensor]
    expected: list[Tensor]

    def error(self, perms: Mapping[str, Tensor]) -> float:
        self.model.load_state_dict(permute_state_dict(self.spec, self.state, perms))
        return _relative_error(permute_outputs(self.spec, self.expected, perms), _run(self.model, self.inputs))

    def culprits(self, generator: torch.Generator, rtol: float) -> list[tuple[str, float]]:
        """Groups that break the outputs on their own (re-checked one by one).

        A group tied to others (a head's qk and v) is re-checked with its own permutation while the
        groups of its tie move their blocks along, units in place: heads must move together.
        """
        found = []
        for name in self.spec.group_order():
            perms = random_permutations(self.spec, generator)
            alone = {name: perms[name], **self._blocks_along(name, perms[name])}
            err = self.error(alone)
            if err > rtol:
                found.append((name, err))
        return found

    def _blocks_along(self, name: str, perm: Tensor) -> dict[str, Tensor]:
        group = self.spec.groups[name]
        root = self.spec.block_tie_root(name)
        block_order = perm.view(group.num_blocks, group.block_size)[:, 0] // group.block_size
        along = {}
        for other, g in self.spec.groups.items():
            if other != name and g.num_blocks == group.num_blocks and self.spec.block_tie_root(other) == root:
                within = torch.arange(g.block_size).repeat(g.num_blocks, 1)
                along[other] = block_permutation(block_order, within)
        return along


def permute_outputs(spec: PermSpec, outputs: list[Tensor], perms: Mapping[str, Tensor]) -> list[Tensor]:
    """The outputs a model permuted by ``perms`` returns: free output axes (``spec.outputs``) moved alike."""
    if not spec.outputs:
        return outputs
    moved = []
    for index, tensor in enumerate(outputs):
        axes = spec.outputs[index] if index < len(spec.outputs) else ()
        for axis, segments in enumerate(axes):
            pseudo = PermSpec(groups=spec.groups, axes={"t": (None,) * axis + (segments,)})
            gather = axis_index(pseudo, "t", axis, perms) if segments is not None else None
            if gather is not None:
                tensor = tensor.index_select(axis, gather.to(tensor.device))
        moved.append(tensor)
    return moved


def _params_of(spec: PermSpec, group: str) -> list[str]:
    return sorted({param for param, *_ in spec.entries(group)})


def self_check(
    model: nn.Module, spec: PermSpec, example_inputs: Inputs, *, rtol: float = 1e-4, seed: int = 0, trials: int = 2
) -> float:
    """Max relative output error under random permutations by ``spec`` (float32, eval mode).

    Raises :class:`UnsupportedArchitecture` naming the offending groups and their parameters when
    the error exceeds ``rtol``: such a spec would silently corrupt a merge.
    """
    reference = copy.deepcopy(model).float().eval()
    inputs = _as_float(example_inputs)
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    expected = _run(reference, inputs)
    if not all(bool(torch.isfinite(t).all()) for t in expected):
        raise ComputeOverflow(
            "the model's outputs are not finite on the check batch (weights or inputs too large for float32): "
            "permutation invariance cannot be verified"
        )
    try:
        checker = _Checker(copy.deepcopy(reference), spec, inputs, state, expected)
        generator = torch.Generator().manual_seed(seed)
        worst = max((checker.error(random_permutations(spec, generator)) for _ in range(trials)), default=0.0)
    except MergeError:
        raise  # e.g. ArchitectureMismatch: the spec names entries the model does not have
    except Exception as exc:  # a spec that does not even apply to the model
        raise UnsupportedArchitecture(
            f"the permutation spec does not apply to the model: {type(exc).__name__}: {exc}", stage="self_check"
        ) from exc
    if worst <= rtol:
        return worst
    culprits = checker.culprits(torch.Generator().manual_seed(seed + 1), rtol)
    if not culprits:
        raise UnsupportedArchitecture(
            f"permuting all groups together changes the outputs (relative error "
            f"{worst:.2e} > {rtol:g}), though no single group does",
            stage="self_check",
        )
    details = "; ".join(
        f"group {name!r} (parameters {', '.join(_params_of(spec, name))}) changes the outputs by {err:.2e}"
        for name, err in culprits[:3]
    )
    more = f" (and {len(culprits) - 3} more groups)" if len(culprits) > 3 else ""
    raise UnsupportedArchitecture(f"permutation spec is wrong: {details}{more}; tolerance {rtol:g}", stage="self_check")
