"""Turn the classes of a finished walk into a :class:`PermSpec`: groups, segments, sites, summary.

A parameter axis segment is described by its *signature*: the classes of its leaf atoms, major
first. ``(C,)`` is a plain group; ``(H, d)`` is a group of H blocks (attention heads, GroupNorm
groups) whose units inside a block may be permuted per block; groups that share their head class
``H`` are tied (``block_tie``). Everything the spec cannot express safely is pinned:

- a signature of three or more factors, or with a pinned factor (rotary dims inside heads);
- a within-block class used anywhere else (a (d,) parameter broadcast over heads would need the
  same permutation in every head, which ``num_blocks`` does not express);
- an axis whose segments are not all free (a spec segment always names a group).

Two attention patterns are expressed instead of pinned:

- rotary embeddings: a within-block class fixed only by elementwise products with tables no
  parameter flows into (cos/sin; "soft" pins of ``trace_algebra``) under a free head class gives a
  group with ``whole_blocks``: heads move as wholes, the dims inside a head keep their order;
- grouped-query attention: a signature ``(G, c, d)`` whose middle class ``c`` was made by repeating a
  tensor (``expand`` + ``reshape``, ``repeat_interleave``: the r q heads of one kv head) is the group
  ``(G, d)`` carried ``expand = |c|`` times per block (the q projection's rows, the output projection's
  columns).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from typing import Literal

from torch import fx, nn

from mudsc_core.permutation.spec import ActivationSite, AxisSpec, PermSpec, Segment, UnitGroup
from mudsc_core.permutation.trace_algebra import Layout
from mudsc_core.permutation.trace_walk import AbsTensor, TensorInfo, Walker

log = logging.getLogger(__name__)

Sig = tuple[int, ...]
ROTARY_REASON = "dims inside a head pinned by rotary tables: heads move only as wholes"
# The same tables with no head axis to move (one kv head: multi-query attention): nothing can move.
TABLE_FIXED_REASON = "dims pinned by rotary tables, with no heads to move as wholes"
_NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)
_CONSUMERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Names of free outputs among the spec's axis sources (never a state-dict entry: those hold no spaces).
OUTPUT_PREFIX = " output "

# The same in an exported graph, by ATen op name (``aten.linear.default`` -> ``linear``).
_ATEN_CONSUMERS = frozenset({"linear", "conv1d", "conv2d", "conv3d", "convolution", "addmm"})
_ATEN_NORMS = frozenset(
    {"layer_norm", "group_norm", "batch_norm", "_native_batch_norm_legit_no_training", "native_layer_norm"}
)
# Where an op's weight is among its arguments (every other module op takes it second).
_WEIGHT_ARG = {"embedding": 0, "layer_norm": 2, "group_norm": 2, "batch_norm": 1, "addmm": 2}
# Where an op's data input is (every other module op takes it first): GPT-2's Conv1D is addmm(bias, x, weight).
_INPUT_ARG = {"addmm": 1}


_ADDS = frozenset({"add", "add_", "sub", "sub_"})


def _is_layer_norm(type_name: str) -> bool:
    """A per-position norm over the unit axis: LayerNorm, RMSNorm and the classes named like them
    (transformers' ``LlamaRMSNorm``, ``T5LayerNorm``, ``ConvNextLayerNorm``)."""
    return type_name.rsplit(".", 1)[-1].endswith(("LayerNorm", "RMSNorm"))


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target) in _ADDS
    name = _op_name(node) or getattr(node.target, "__name__", "")
    return node.op == "call_function" and name in _ADDS


@dataclass(frozen=True)
class _NormCall:
    """One call of a LayerNorm-like module: its graph nodes, the tensor it reads and the one it returns."""

    module: str
    nodes: frozenset[fx.Node]
    input: fx.Node
    output: fx.Node

    @property
    def bypassed(self) -> bool:
        """The tensor it normalises also flows on around it (a pre-norm block's residual)."""
        inside = self.nodes | {self.output}
        read = [self.input, *(n for n in self.nodes if n is not self.output)]
        return any(user not in inside for node in read for user in node.users)


def _data_input(node: fx.Node) -> object:
    index = _INPUT_ARG.get(_op_name(node), 0)
    return node.args[index] if len(node.args) > index else None


def _op_name(node: fx.Node) -> str:
    target = node.target
    return str(getattr(target, "_opname", "")) if node.op == "call_function" else ""


def _op_module(node: fx.Node) -> str | None:
    """The module whose call an ATen op is: the owner of the ``<module>.weight`` it takes (``linear`` of
    ``model.layers.0.mlp.down_proj.weight`` -> ``model.layers.0.mlp.down_proj``), else None."""
    name = _op_name(node)
    if not name:
        return None
    index = _WEIGHT_ARG.get(name, 1)
    weight = node.args[index] if len(node.args) > index else node.kwargs.get("weight")
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    target = str(weight.target)
    return target[: -len(".weight")] if target.endswith(".weight") else None


@dataclass(frozen=True)
class GroupSummary:
    """One unit space of the model: a free group of the spec, or a pinned space and why."""

    name: str
    size: int
    num_blocks: int
    free: bool
    reasons: tuple[str, ...] = ()
    params: tuple[str, ...] = ()


@dataclass
class _Occurrence:
    param: str
    axis: int
    segment: int
    length: int
    expand: int = 1


class SpecAssembler:
    """Builds the spec from a walker; one instance per derivation."""

    def __init__(self, walker: Walker) -> None:
        self.w = walker
        self.alg = walker.algebra
        self.alg.close_pins()
        self.axis_sigs: dict[tuple[str, int], list[Sig] | None] = {}
        self.occurrences: dict[Sig, list[_Occurrence]] = defaultdict(list)
        self.axis_expand: dict[tuple[str, int], list[int]] = {}
        self.bad: set[int] = set()
        self.bad_reasons: dict[int, set[str]] = defaultdict(set)
        self.copy_roots = {self.alg.find(a) for a in self.alg.copies}
        self.whole: set[int] = set()  # classes fixed only by non-parameter tables (rotary dims)
        self._unify_sealed()

    def _unify_sealed(self) -> None:
        """Table-fixed refined atoms with the same leaves are one space (q's and k's rotary dims).

        A join lines up leaves, not the atoms they were cut from: q's and k's head dims, both cut
        in halves by ``rotate_half``, share their halves' classes but not their own. Fixed dims that
        are opaque in the spec must be one class for q and k to land in one group.
        """
        by_leaves: dict[tuple[int, ...], int] = {}
        for atom in range(len(self.alg.sizes)):
            if atom not in self.alg.children or not self.alg.soft_only(atom):
                continue
            key = tuple(self.alg.find(leaf) for leaf in self._ordered_leaves(atom))
            first = by_leaves.setdefault(key, atom)
            if self.alg.sizes[first] == self.alg.sizes[atom]:
                self.alg.merge_classes(first, atom)

    def _ordered_leaves(self, atom: int) -> list[int]:
        kids = self.alg.children.get(atom)
        if kids is None:
            return [atom]
        return [leaf for kid in kids for leaf in self._ordered_leaves(kid)]

    # -- signatures -----------------------------------------------------------------------------
    def normalize(self, layout: Layout) -> Layout | None:
        """The algebra's normalisation, a class fixed only by tables standing for itself (its cuts do not matter)."""
        return self.alg.normalize(layout, self._sealed)

    def _sealed(self, atom: int) -> bool:
        return atom in self.alg.children and self.alg.soft_only(atom)

    def _base(self, sig: Sig) -> tuple[Sig, int]:
        """A signature with a copy class second to last (GQA's q heads per kv head) as (group signature, expand)."""
        copies = [k for k, r in enumerate(sig) if r in self.copy_roots]
        if len(copies) == 1 and len(sig) in (2, 3) and copies[0] == len(sig) - 2:
            k = copies[0]
            return sig[:k] + sig[k + 1 :], self.alg.sizes[self.alg.members[sig[k]][0]]
        return sig, 1

    def _sources(self) -> dict[str, AbsTensor]:
        """The tensors whose axes the spec describes: the parameters, and free outputs (``OUTPUT_PREFIX`` i)."""
        sources = dict(self.w.params)
        last = max(self.w.first_use.values(), default=0) + 1
        for index, tensor in enumerate(self.w.outputs):
            if tensor is not None:
                sources[f"{OUTPUT_PREFIX}{index}"] = tensor
                self.w.first_use.setdefault(f"{OUTPUT_PREFIX}{index}", last)
        return sources

    def _collect(self) -> None:
        for name, tensor in self._sources().items():
            for axis, layout in enumerate(tensor.axes):
                norm = self.normalize(layout)
                if norm is None:
                    self._mark(self.alg.leaves(layout), "non-contiguous factorisation")
                    self.axis_sigs[(name, axis)] = None
                    continue
                based = [self._base(tuple(self.alg.find(a) for a in seg)) for seg in norm]
                sigs = [sig for sig, _ in based]
                self.axis_sigs[(name, axis)] = sigs
                self.axis_expand[(name, axis)] = [e for _, e in based]
                for k, ((sig, e), seg) in enumerate(zip(based, norm)):
                    self.occurrences[sig].append(_Occurrence(name, axis, k, self.alg.seg_size(seg), e))
        roots = {r for sig in self.occurrences for r in sig}
        self.whole = {r for r in roots if self.alg.soft_only(r) and r not in self.copy_roots}

    def _mark(self, atoms: list[int] | tuple[int, ...], reason: str) -> bool:
        changed = False
        for a in atoms:
            root = self.alg.find(a)
            if root not in self.bad:
                self.bad.add(root)
                self.bad_reasons[root].add(reason)
                changed = True
        return changed

    def _positions(self) -> dict[int, set[tuple[str, Sig]]]:
        seen: dict[int, set[tuple[str, Sig]]] = defaultdict(set)
        for sig in self.occurrences:
            if len(sig) == 1:
                seen[sig[0]].add(("alone", sig))
            elif len(sig) == 2:
                seen[sig[0]].add(("major", sig))
                seen[sig[1]].add(("minor", sig))
        return seen

    def _whole_shape(self, sig: Sig) -> bool:
        """No table-fixed class, or exactly a (free heads, table-fixed dims) pair."""
        fixed = [r in self.whole for r in sig]
        return not any(fixed) or (len(sig) == 2 and fixed == [False, True])

    def _sig_free(self, sig: Sig) -> bool:
        return bool(sig) and all(r not in self.bad for r in sig) and self._whole_shape(sig)

    def _sweep(self, tensor_roots: list[set[int]]) -> bool:
        changed = False
        for root in list(self.alg.pinned):
            changed |= self._mark([root], "pinned")
        for sig in self.occurrences:
            if len(sig) == 0 or len(sig) > 2:
                changed |= self._mark(sig, f"{len(sig)} factors")
            elif any(r in self.bad for r in sig):
                changed |= self._mark(sig, "shares a pinned factor")
            elif not self._whole_shape(sig):
                changed |= self._mark([r for r in sig if r not in self.whole], "shares a factor fixed by a table")
            elif any(r in self.copy_roots for r in sig):
                changed |= self._mark(sig, "copies of a repeated tensor")
        for root, uses in self._positions().items():
            if root in self.whole:
                continue  # fixed dims: used anywhere, they stay in place everywhere
            kinds = {kind for kind, _ in uses}
            if "minor" in kinds and (len(uses) > 1):
                changed |= self._mark([root], "within-block units used outside their blocks")
            elif "major" in kinds and "alone" in kinds:
                changed |= self._mark([root], "block axis also used alone")
        for (name, axis), sigs in self.axis_sigs.items():
            if sigs is not None and self._partly_pinned(sigs):
                changed |= self._mark([r for s in sigs for r in s], f"axis {axis} of {name} is partly pinned")
        for sig in self.occurrences:
            loose = len(sig) == 2 and any(sig[1] in roots and sig[0] not in roots for roots in tensor_roots)
            if loose and sig[1] not in self.bad and sig[1] not in self.whole:
                changed |= self._mark(sig, "within-block units seen without their blocks")
        return changed

    def _partly_pinned(self, sigs: list[Sig]) -> bool:
        """Some segments of the axis are free and others not (a spec segment always names a group)."""
        pinned = [not self._sig_free(s) for s in sigs]
        return any(pinned) and not all(pinned)

    def _tensor_roots(self) -> list[set[int]]:
        roots = []
        for value in self.w.env.values():
            if isinstance(value, AbsTensor):
                roots.append({self.alg.find(a) for layout in value.axes for a in self.alg.leaves(layout)})
        return roots

    # -- result ---------------------------------------------------------------------------------
    def build(self) -> tuple[PermSpec, list[GroupSummary]]:
        self._collect()
        tensor_roots = self._tensor_roots()
        while self._sweep(tensor_roots):
            pass
        free = [s for s in self.occurrences if self._sig_free(s)]
        free.sort(key=self._first_seen)
        names = self._names(free)
        groups = self._groups(free, names)
        axes = self._axes(names)
        outputs = tuple(
            ()
            if tensor is None
            else tuple(self._axis_spec(f"{OUTPUT_PREFIX}{i}", axis, names) for axis in range(tensor.ndim))
            for i, tensor in enumerate(self.w.outputs)
        )
        spec = PermSpec(
            groups=groups,
            axes=axes,
            excluded=frozenset(n for n in self.w.state_shapes if n.endswith("num_batches_tracked")),
            head_params=self._head_params(),
            order=tuple(names[s] for s in free),
            outputs=outputs if any(a is not None for axes_ in outputs for a in axes_) else (),
        )
        spec.check()
        return spec, self._summaries(free, names)

    def _first_seen(self, sig: Sig) -> tuple[int, int, int]:
        occ = self.occurrences[sig]
        return min((self.w.first_use[o.param], o.axis, o.segment) for o in occ)

    def _names(self, free: list[Sig]) -> dict[Sig, str]:
        names: dict[Sig, str] = {}
        used: Counter[str] = Counter()
        for sig in free:
            occ = self.occurrences[sig]
            outs = [o for o in occ if self.w.roles.get((o.param, o.axis), "out") == "out"]
            first = min(outs or occ, key=lambda o: (self.w.first_use[o.param], o.axis, o.segment))
            base = first.param.rsplit(".", 1)[0] if "." in first.param else first.param
            used[base] += 1
            names[sig] = base if used[base] == 1 else f"{base}.{used[base] - 1}"
        return names

    def _groups(self, free: list[Sig], names: dict[Sig, str]) -> dict[str, UnitGroup]:
        groups: dict[str, UnitGroup] = {}
        tie_root: dict[int, str] = {}
        sites = SiteFinder(self.w, self.normalize)
        for sig in free:
            size = prod(self.alg.sizes[self.alg.members[r][0]] for r in sig)
            blocks = self.alg.sizes[self.alg.members[sig[0]][0]] if len(sig) == 2 else 1
            tie = None
            if len(sig) == 2:
                tie = tie_root.get(sig[0])
                tie_root.setdefault(sig[0], names[sig])
            whole = len(sig) == 2 and sig[1] in self.whole
            groups[names[sig]] = UnitGroup(
                names[sig], size, sites.site(sig), blocks, tie, whole, extra_sites=sites.read_sites(sig)
            )
        return groups

    def _axes(self, names: dict[Sig, str]) -> dict[str, tuple[AxisSpec, ...]]:
        axes: dict[str, tuple[AxisSpec, ...]] = {}
        for name, shape in self.w.state_shapes.items():
            if name.endswith("num_batches_tracked"):
                continue
            axes[name] = tuple(self._axis_spec(name, axis, names) for axis in range(len(shape)))
        return axes

    def _axis_spec(self, name: str, axis: int, names: dict[Sig, str]) -> AxisSpec:
        sigs = self.axis_sigs.get((name, axis))
        if not sigs or any(s not in names for s in sigs):
            return None
        role = self.w.roles.get((name, axis), "out")
        lengths = [prod(self.alg.sizes[self.alg.members[r][0]] for r in s) for s in sigs]
        expands = self.axis_expand[(name, axis)]
        return tuple(Segment(names[s], n * e, role, e) for s, n, e in zip(sigs, lengths, expands))

    def _head_params(self) -> tuple[str, ...]:
        # The label axis: an output axis that parameters produce and that no input axis reaches
        # (batch and token axes of the output come from the inputs).
        out_roots = {self.alg.find(a) for a in self.w.output_atoms} - {self.alg.find(a) for a in self.w.input_atoms}
        heads = []
        for name, tensor in self.w.params.items():
            if any(self.alg.find(a) in out_roots for layout in tensor.axes for a in self.alg.leaves(layout)):
                heads.append(name)
        return tuple(heads)

    def _summaries(self, free: list[Sig], names: dict[Sig, str]) -> list[GroupSummary]:
        out = []
        for sig in free:
            occ = self.occurrences[sig]
            size = prod(self.alg.sizes[self.alg.members[r][0]] for r in sig)
            blocks = self.alg.sizes[self.alg.members[sig[0]][0]] if len(sig) == 2 else 1
            why: tuple[str, ...] = (ROTARY_REASON,) if len(sig) == 2 and sig[1] in self.whole else ()
            params = tuple(sorted({o.param for o in occ if not o.param.startswith(OUTPUT_PREFIX)}))
            out.append(GroupSummary(names[sig], size, blocks, True, why, params))
        event_roots: dict[int, set[str]] = defaultdict(set)
        for event in self.alg.events:
            for atom in event.atoms:
                for leaf in self.alg.leaves(((atom,),)):
                    event_roots[self.alg.find(leaf)].add(event.reason)
        for sig, occ in self.occurrences.items():
            if sig in names or not sig:
                continue
            reasons = set().union(*(self.bad_reasons.get(r, set()) | event_roots.get(r, set()) for r in sig))
            reasons.discard("pinned")
            if not reasons and any(r in self.whole for r in sig):
                reasons.add(TABLE_FIXED_REASON)
            size = prod(self.alg.sizes[self.alg.members[r][0]] for r in sig)
            label = f"{occ[0].param}[{occ[0].axis}]"
            params = tuple(sorted({o.param for o in occ if not o.param.startswith(OUTPUT_PREFIX)}))
            out.append(GroupSummary(label, size, 1, False, tuple(sorted(reasons)), params))
        return out


class SiteFinder:
    """Choose each group's activation site as the hand-written specs do.

    The site is the latest, largest tensor that carries the whole group on one axis and is not a
    norm's output (MuDSC measures after the non-linearity, before normalisation), observed as the
    input of a Linear/Conv that consumes it, else as the output of the module that made it, else
    as the input of any module (hooks need a module called once). A group seen only as segments
    of a fused axis (q and k of qkv) is observed there with ``segments``.
    """

    def __init__(self, walker: Walker, normalize: Callable[[Layout], Layout | None] | None = None) -> None:
        self.w = walker
        self.alg = walker.algebra
        self.normalize = normalize or self.alg.normalize
        self.modules = walker.modules
        nodes = walker.gm.graph.nodes
        # An exported (ATen) graph has no module calls: a module's call is its op on its weight (``_op_module``).
        self.aten = not any(n.op == "call_module" for n in nodes)
        self.calls = Counter(
            str(n.target) if n.op == "call_module" else _op_module(n) for n in nodes if n.op != "get_attr"
        )
        self.calls.pop(None, None)
        self.best: dict[Sig, tuple[int, int, ActivationSite]] = {}
        self.partial: dict[Sig, ActivationSite] = {}
        self._index()
        self.norms = self._norm_calls()

    def _once(self, target: object) -> bool:
        return self.calls[str(target)] == 1

    def _module_call(self, node: fx.Node) -> tuple[str, bool] | None:
        """(module, is a Linear/Conv) when ``node`` is the one call of a module taking its input as args[0]."""
        if node.op == "call_module":
            if not self._once(node.target):
                return None
            return str(node.target), isinstance(self.modules[str(node.target)], _CONSUMERS)
        module = _op_module(node) if self.aten else None
        if module is None or not self._once(module) or _op_name(node) == "embedding":
            return None
        return module, _op_name(node) in _ATEN_CONSUMERS

    def _capture(self, node: fx.Node) -> tuple[str, Literal["input", "output"]] | None:
        consumers: list[str] = []
        others: list[str] = []
        for user in node.users:
            call = self._module_call(user) if _data_input(user) is node else None
            if call is not None:
                (consumers if call[1] else others).append(call[0])
        if consumers:
            return consumers[0], "input"
        if node.op == "call_module" and self._once(node.target):
            return str(node.target), "output"
        if self.aten and _op_name(node) in _ATEN_CONSUMERS and (module := _op_module(node)) and self._once(module):
            return module, "output"
        if others:
            return others[0], "input"
        return None

    def _is_norm_output(self, node: fx.Node) -> bool:
        if self.aten:
            return _op_name(node) in _ATEN_NORMS
        return node.op == "call_module" and isinstance(self.modules[str(node.target)], _NORMS)

    def _index(self) -> None:
        """One pass over the graph: per signature, the best whole-axis site and the first fused one."""
        for position, node in enumerate(self.w.gm.graph.nodes):
            value, info = self.w.env.get(node), self.w.values.get(node)
            if not isinstance(value, AbsTensor) or not isinstance(info, TensorInfo) or self._is_norm_output(node):
                continue
            capture = self._capture(node)
            if capture is None:
                continue
            numel = prod(info.shape)
            for axis, layout in enumerate(value.axes):
                norm = self.normalize(layout)
                if norm is None:
                    continue
                unit_dim = -1 if axis == value.ndim - 1 else axis
                sigs = {tuple(self.alg.find(a) for a in seg) for seg in norm}
                for sig in sigs:
                    if len(norm) == 1:
                        best = self.best.get(sig)
                        if best is None or (numel, position) >= best[:2]:
                            site = ActivationSite(capture[0], capture[1], unit_dim)
                            self.best[sig] = (numel, position, site)
                    elif sig not in self.partial:
                        self.partial[sig] = ActivationSite(
                            capture[0],
                            capture[1],
                            unit_dim,
                            self._ranges(norm, sig),
                        )

    def site(self, sig: Sig) -> ActivationSite | None:
        best = self.best.get(sig)
        return best[2] if best is not None else self.partial.get(sig)

    # -- where a pre-norm stream is read ------------------------------------------------------
    def read_sites(self, sig: Sig) -> tuple[ActivationSite, ...]:
        """A pre-norm stream's read points: the outputs of the norms its sublayers and head read it through.

        A stream is pre-norm when the residual goes around one of its norms (the norm's input also flows
        on past it: GPT-2, ViT, Llama). Its read points are those of its norms whose output does not flow
        back into the stream (never added to a tensor of the stream before a Linear/Conv takes it). A
        post-norm stream (BERT: every norm's output is the stream itself) has none and keeps its one site.
        """
        best = self.best.get(sig)
        if best is None:
            return ()
        norms = [(call, dim) for call in self.norms if (dim := self._unit_dim(call.output, sig)) is not None]
        if not any(call.bypassed for call, _ in norms):
            return ()
        seen = self._node_at(best[1])
        return tuple(
            ActivationSite(call.module, "output", dim)
            for call, dim in norms
            if call.output is not seen and not self._flows_back(call.output, sig)
        )

    def _node_at(self, position: int) -> fx.Node:
        node: fx.Node = list(self.w.gm.graph.nodes)[position]
        return node

    def _unit_dim(self, node: fx.Node, sig: Sig) -> int | None:
        """The axis of ``node``'s tensor that carries the whole group ``sig`` (-1 for the last), else None."""
        value = self.w.env.get(node)
        if not isinstance(value, AbsTensor):
            return None
        for axis, layout in enumerate(value.axes):
            norm = self.normalize(layout)
            if norm is not None and len(norm) == 1 and tuple(self.alg.find(a) for a in norm[0]) == sig:
                return -1 if axis == value.ndim - 1 else axis
        return None

    def _flows_back(self, start: fx.Node, sig: Sig) -> bool:
        """Whether ``start`` reaches an add of two tensors of the group while it still carries the group."""
        todo, seen = [start], {start}
        while todo:
            node = todo.pop()
            for user in node.users:
                if user in seen or self._unit_dim(user, sig) is None:
                    continue
                args = [a for a in user.args if isinstance(a, fx.Node) and self._unit_dim(a, sig) is not None]
                if _is_add(user) and len(args) >= 2:
                    return True
                seen.add(user)
                todo.append(user)
        return False

    def _norm_calls(self) -> list[_NormCall]:
        """Every LayerNorm-like module called once: a ``call_module`` node, or the ATen ops an export
        records in that module (``nn_module_stack``)."""
        scopes: dict[str, list[fx.Node]] = defaultdict(list)
        for node in self.w.gm.graph.nodes:
            if node.op == "call_module":
                module = self.modules.get(str(node.target))
                if module is not None and _is_layer_norm(type(module).__qualname__):
                    scopes[str(node.target)].append(node)
            elif node.op == "call_function" and (stack := node.meta.get("nn_module_stack")):
                path, kind = list(stack.values())[-1]
                kind = kind if isinstance(kind, str) else getattr(kind, "__qualname__", str(kind))
                if _is_layer_norm(kind) and path in self.modules:
                    scopes[path].append(node)
        calls = []
        for path, nodes in scopes.items():
            inside = set(nodes)
            outs = [n for n in nodes if any(u not in inside for u in n.users)]
            inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
            # One call, reading one tensor (a module called twice has two inputs): else no read point.
            if outs and len(inputs) == 1:
                calls.append(_NormCall(path, frozenset(inside), inputs.pop(), outs[-1]))
        return calls

    def _ranges(self, norm: tuple[tuple[int, ...], ...], sig: Sig) -> tuple[tuple[int, int], ...]:
        ranges, offset = [], 0
        for seg in norm:
            size = self.alg.seg_size(seg)
            if tuple(self.alg.find(a) for a in seg) == sig:
                ranges.append((offset, offset + size))
            offset += size
        return tuple(ranges)
