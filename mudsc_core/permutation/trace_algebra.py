"""The axis algebra of the tracer: union-find over *atoms* that can be refined into sums or products.

Every axis of every tensor the tracer sees is described by a :data:`Layout`: consecutive segments
(a ``cat`` of several spaces), each the product of atoms, major first (a ``view`` of H*d as (H, d)).
An atom is one space of interchangeable units; joining two atoms (union-find) says that one
permutation must act on both. An atom is *refined* when some op needs it cut (slice, chunk: a
``sum`` refinement) or factorised (view/reshape: a ``prod`` refinement); a refinement applies to
the atom's whole class, so every tensor that shares the space sees the same cut. Atoms that must
not move are *pinned*; pinning is always safe (it costs merge quality, never correctness), so any
construction this algebra cannot express pins instead of guessing.

Two weaker marks serve attention: a class is *soft*-pinned when its units are fixed only by an
elementwise combination with a tensor that does not come from parameters (rotary cos/sin tables
fix the dims inside a q/k head; the heads stay free, so the spec can move them as whole blocks);
a *copy* atom is an axis that an ``expand``/``repeat_interleave`` made by repeating a tensor (the r
q heads that share one kv head in grouped-query attention).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod

Seg = tuple[int, ...]  # atom ids, major first; the segment's length is the product of their sizes
Layout = tuple[Seg, ...]  # consecutive segments along one tensor axis


class Conflict(Exception):
    """Two spaces that cannot be identified (incompatible factorisations); callers pin both."""


@dataclass(frozen=True)
class PinEvent:
    reason: str
    atoms: tuple[int, ...]


@dataclass
class AxisAlgebra:
    """Union-find over atoms with per-class refinements and pins (see module docstring)."""

    sizes: list[int] = field(default_factory=list)
    _parent: list[int] = field(default_factory=list)
    origin: list[int | None] = field(default_factory=list)  # the atom this one was refined from
    members: dict[int, list[int]] = field(default_factory=dict)
    refinement: dict[int, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    children: dict[int, tuple[int, ...]] = field(default_factory=dict)
    pinned: set[int] = field(default_factory=set)
    soft: set[int] = field(default_factory=set)  # roots fixed only by non-parameter tables
    copies: set[int] = field(default_factory=set)  # atoms made by repeating a tensor (expand)
    events: list[PinEvent] = field(default_factory=list)

    # -- atoms and classes --------------------------------------------------------------------
    def atom(self, size: int, origin: int | None = None) -> int:
        """A fresh atom of ``size`` units, alone in its class."""
        index = len(self.sizes)
        self.sizes.append(size)
        self._parent.append(index)
        self.origin.append(origin)
        self.members[index] = [index]
        return index

    def find(self, atom: int) -> int:
        root = atom
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[atom] != root:
            self._parent[atom], atom = root, self._parent[atom]
        return root

    def refine(self, atom: int, kind: str, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """Cut (``sum``) or factorise (``prod``) the class of ``atom``; returns ``atom``'s children.

        Raises :class:`Conflict` when the class already carries another refinement.
        """
        root = self.find(atom)
        existing = self.refinement.get(root)
        if existing is not None:
            if existing != (kind, sizes):
                raise Conflict(f"atom refined as {existing}, asked for {(kind, sizes)}")
            return self.children[atom]
        total = sum(sizes) if kind == "sum" else prod(sizes)
        if total != self.sizes[atom]:
            raise Conflict(f"refinement {kind}{sizes} does not cover {self.sizes[atom]} units")
        first: tuple[int, ...] | None = None
        for member in self.members[root]:
            kids = tuple(self.atom(size, origin=member) for size in sizes)
            self.children[member] = kids
            if first is None:
                first = kids
            else:
                for a, b in zip(first, kids):
                    self._merge(self.find(a), self.find(b))
        self.refinement[root] = (kind, sizes)
        return self.children[atom]

    def _merge(self, ra: int, rb: int) -> int:
        if len(self.members[ra]) < len(self.members[rb]):
            ra, rb = rb, ra
        self._parent[rb] = ra
        self.members[ra].extend(self.members.pop(rb))
        if rb in self.pinned:
            self.pinned.discard(rb)
            self.pinned.add(ra)
        if rb in self.soft:
            self.soft.discard(rb)
            self.soft.add(ra)
        ref = self.refinement.pop(rb, None)
        if ref is not None:
            self.refinement[ra] = ref
        return ra

    def merge_classes(self, a: int, b: int) -> None:
        """Make the classes of ``a`` and ``b`` one, as they are (no refinement carried across)."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._merge(ra, rb)

    def union(self, a: int, b: int) -> None:
        """One permutation must act on ``a`` and ``b``; refinements are carried across the classes."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.sizes[a] != self.sizes[b]:
            raise Conflict(f"cannot identify spaces of {self.sizes[a]} and {self.sizes[b]} units")
        if self.sizes[a] == 1:
            return  # an axis of size 1 constrains nothing
        fa, fb = self.refinement.get(ra), self.refinement.get(rb)
        if fa is None and fb is not None:
            self.refine(a, *fb)
            fa = fb
        elif fb is None and fa is not None:
            self.refine(b, *fa)
            fb = fa
        if fa != fb:
            raise Conflict(f"incompatible refinements {fa} and {fb}")
        self._merge(ra, rb)
        if fa is not None:
            for ca, cb in zip(self.children[a], self.children[b]):
                self.union(ca, cb)

    # -- pins ---------------------------------------------------------------------------------
    def pin(self, atoms: list[int] | tuple[int, ...], reason: str) -> None:
        """Fix these atoms (and everything refined from them) in place, recording why."""
        atoms = tuple(a for a in atoms if self.sizes[a] > 1)
        if not atoms:
            return
        for a in atoms:
            self.pinned.add(self.find(a))
        self.events.append(PinEvent(reason, atoms))

    def pin_layout(self, layout: Layout, reason: str) -> None:
        self.pin([a for seg in layout for a in seg], reason)

    def pin_soft(self, atoms: list[int] | tuple[int, ...], reason: str) -> None:
        """Fix these atoms because a non-parameter table varies along them (see module docstring)."""
        atoms = tuple(a for a in atoms if self.sizes[a] > 1)
        if not atoms:
            return
        for a in atoms:
            self.soft.add(self.find(a))
        self.events.append(PinEvent(reason, atoms))

    def copy_layout(self, size: int) -> Layout:
        """A layout of one fresh copy atom (an axis made by repeating a tensor)."""
        layout = self.plain(size)
        self.copies.update(a for seg in layout for a in seg)
        return layout

    def close_pins(self) -> None:
        """Propagate pins down refinements: a class is pinned when any member descends from a pin."""
        for marks in (self.pinned, self.soft):
            changed = True
            while changed:
                changed = False
                for atom in range(len(self.sizes)):
                    origin = self.origin[atom]
                    if origin is not None and self.find(origin) in marks and self.find(atom) not in marks:
                        marks.add(self.find(atom))
                        changed = True

    def soft_only(self, atom: int) -> bool:
        """Every leaf under ``atom`` is soft-pinned and none is pinned (nor ``atom``'s class itself)."""
        if self.find(atom) in self.pinned:
            return False
        leaves = self.leaves(((atom,),))
        return all(self.find(leaf) in self.soft and self.find(leaf) not in self.pinned for leaf in leaves)

    def is_pinned(self, atom: int) -> bool:
        return self.find(atom) in self.pinned

    # -- layouts ------------------------------------------------------------------------------
    def plain(self, size: int) -> Layout:
        """A layout of one fresh atom."""
        return ((self.atom(size),),) if size > 1 else ((),)

    def expand_atom(self, atom: int, opaque: Callable[[int], bool] | None = None) -> list[Seg] | None:
        """The leaf atoms of ``atom`` as a sum of products (None: not expressible contiguously).

        An atom for which ``opaque`` is true stands for itself (its refinements are not expanded).
        """
        if self.sizes[atom] == 1:
            return [()]
        kids = self.children.get(atom)
        if kids is None or (opaque is not None and opaque(atom)):
            return [(atom,)]
        kind, _ = self.refinement[self.find(atom)]
        if kind == "prod":
            return self.expand_seg(kids, opaque)
        out: list[Seg] = []
        for kid in kids:
            parts = self.expand_atom(kid, opaque)
            if parts is None:
                return None
            out.extend(parts)
        return out

    def expand_seg(self, seg: Seg, opaque: Callable[[int], bool] | None = None) -> list[Seg] | None:
        """A product of atoms as a sum of products of leaves; a cut in a minor factor interleaves -> None."""
        result: list[Seg] = [()]
        for atom in seg:
            parts = self.expand_atom(atom, opaque)
            if parts is None:
                return None
            if len(parts) > 1 and any(self.seg_size(r) > 1 for r in result):
                return None
            result = [r + p for r in result for p in parts]
        return result

    def normalize(self, layout: Layout, opaque: Callable[[int], bool] | None = None) -> Layout | None:
        """Replace refined atoms by their leaves (None when the layout is no longer contiguous)."""
        out: list[Seg] = []
        for seg in layout:
            parts = self.expand_seg(seg, opaque)
            if parts is None:
                return None
            out.extend(parts)
        return tuple(out) if out else ((),)

    def seg_size(self, seg: Seg) -> int:
        return prod(self.sizes[a] for a in seg)

    def layout_size(self, layout: Layout) -> int:
        return sum(self.seg_size(s) for s in layout)

    def leaves(self, layout: Layout) -> list[int]:
        """Every leaf atom under a layout, expressible or not (for pinning)."""
        out: list[int] = []
        stack = [a for seg in layout for a in seg]
        while stack:
            atom = stack.pop()
            kids = self.children.get(atom)
            if kids is None:
                out.append(atom)
            else:
                stack.extend(kids)
        return out

    def split_seg(self, seg: Seg, sizes: tuple[int, ...]) -> list[Seg]:
        """Factorise a product of leaf atoms into consecutive factors of ``sizes`` (refining atoms)."""
        atoms = [a for a in seg if self.sizes[a] > 1]
        out: list[Seg] = []
        for want in sizes:
            taken: list[int] = []
            while want > 1:
                if not atoms:
                    raise Conflict("reshape sizes do not match the layout")
                atom = atoms.pop(0)
                size = self.sizes[atom]
                if size <= want and want % size == 0:
                    taken.append(atom)
                    want //= size
                elif size > want and size % want == 0:
                    major, minor = self.refine(atom, "prod", (want, size // want))
                    taken.append(major)
                    atoms.insert(0, minor)
                    want = 1
                else:
                    raise Conflict(f"cannot factor {size} units into {want}")
            out.append(tuple(taken))
        return out

    def slice_layout(self, layout: Layout, start: int, stop: int) -> Layout:
        """Entries [start, stop) of an axis, cutting (sum-refining) the major atom of a segment as needed."""
        norm = self.normalize(layout)
        if norm is None:
            raise Conflict("slice of a non-contiguous layout")
        out: list[Seg] = []
        offset = 0
        for seg in norm:
            size = self.seg_size(seg)
            lo, hi = max(start, offset) - offset, min(stop, offset + size) - offset
            offset += size
            if lo >= hi:
                continue
            if lo == 0 and hi == size:
                out.append(seg)
                continue
            out.append(self._cut(seg, lo, hi))
        return tuple(out) if out else ((),)

    def _cut(self, seg: Seg, lo: int, hi: int) -> Seg:
        if not seg:
            raise Conflict("slice of an empty segment")
        rest = self.seg_size(seg[1:])
        if lo % rest or hi % rest:
            raise Conflict("slice not aligned with the major factor")
        major = seg[0]
        pieces = tuple(n for n in (lo // rest, (hi - lo) // rest, self.sizes[major] - hi // rest) if n > 0)
        kids = self.refine(major, "sum", pieces)
        return (kids[0 if lo == 0 else 1],) + seg[1:]

    def join(self, a: Layout, b: Layout) -> None:
        """One permutation for both layouts (same length); cuts and factorises atoms to line them up."""
        for _ in range(64):
            na, nb = self.normalize(a), self.normalize(b)
            if na is None or nb is None:
                raise Conflict("join of a non-contiguous layout")
            cuts_a, cuts_b = self._cuts(na), self._cuts(nb)
            if cuts_a[-1] != cuts_b[-1]:
                raise Conflict(f"cannot join axes of {cuts_a[-1]} and {cuts_b[-1]} entries")
            if cuts_a == cuts_b:
                for sa, sb in zip(na, nb):
                    self._join_seg(sa, sb)
                return
            a = self._recut(na, cuts_b)
            b = self._recut(nb, cuts_a)
        raise Conflict("join did not converge")

    def _cuts(self, layout: Layout) -> list[int]:
        cuts, offset = [], 0
        for seg in layout:
            offset += self.seg_size(seg)
            cuts.append(offset)
        return cuts

    def _recut(self, layout: Layout, cuts: list[int]) -> Layout:
        bounds = sorted(set([0] + self._cuts(layout) + cuts))
        out: list[Seg] = []
        for lo, hi in itertools.pairwise(bounds):
            out.extend(self.slice_layout(layout, lo, hi))
        return tuple(out)

    def _join_seg(self, a: Seg, b: Seg) -> None:
        sa = [x for x in a if self.sizes[x] > 1]
        sb = [x for x in b if self.sizes[x] > 1]
        while sa and sb:
            x, y = sa.pop(0), sb.pop(0)
            nx, ny = self.sizes[x], self.sizes[y]
            if nx == ny:
                self.union(x, y)
            elif nx > ny and nx % ny == 0:
                major, minor = self.refine(x, "prod", (ny, nx // ny))
                self.union(major, y)
                sa.insert(0, minor)
            elif ny > nx and ny % nx == 0:
                major, minor = self.refine(y, "prod", (nx, ny // nx))
                self.union(x, major)
                sb.insert(0, minor)
            else:
                raise Conflict(f"cannot line up factors of {nx} and {ny} units")
        if sa or sb:
            raise Conflict("segments of different factorisations")
