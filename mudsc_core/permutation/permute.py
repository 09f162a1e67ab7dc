"""Random permutations of a spec's unit groups and their application to a state dict.

A permutation ``perm`` of a group of n units is a (n,) long tensor: position i of the permuted
model holds unit ``perm[i]`` of the original (a gather). Gathering a producer's rows and every
consumer's columns with the same index leaves the function unchanged, so ``role`` plays no part.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mudsc_core.permutation.spec import PermSpec, validate_state_dict


def block_permutation(block_order: Tensor, within: Tensor) -> Tensor:
    """Compose a (G,) order of blocks with (G, b) orders inside each block into a (G*b,) permutation.

    Block j of the result is block ``block_order[j]`` of the original, its units in order ``within[j]``.
    """
    num_blocks, block_size = within.shape
    return (block_order[:, None] * block_size + within).reshape(num_blocks * block_size)


def random_permutations(spec: PermSpec, generator: torch.Generator) -> dict[str, Tensor]:
    """One random permutation per group that respects its blocks (heads, GroupNorm groups).

    Blocks move as wholes and units move inside blocks; a group with ``block_tie`` reuses the block
    order of the group it is tied to, with its own order of units inside each block. A group with
    ``whole_blocks`` keeps the order of units inside every block (identity within blocks).
    """
    spec.check()
    block_orders: dict[str, Tensor] = {}
    perms: dict[str, Tensor] = {}
    for name in spec.group_order():
        group = spec.groups[name]
        root = spec.block_tie_root(name)
        if root not in block_orders:
            block_orders[root] = torch.randperm(group.num_blocks, generator=generator)
        if group.whole_blocks:
            within = torch.arange(group.block_size).repeat(group.num_blocks, 1)  # (G, b)
        else:
            within = torch.stack(
                [torch.randperm(group.block_size, generator=generator) for _ in range(group.num_blocks)]
            )  # (G, b)
        perms[name] = block_permutation(block_orders[root], within)
    return perms


def identity_permutations(spec: PermSpec) -> dict[str, Tensor]:
    return {name: torch.arange(group.size) for name, group in spec.groups.items()}


def invert_permutation(perm: Tensor) -> Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


def _check_perms(spec: PermSpec, perms: Mapping[str, Tensor]) -> None:
    for name, perm in perms.items():
        group = spec.groups.get(name)
        if group is None:
            raise ValueError(f"permutation given for unknown unit group {name!r}")
        if perm.shape != (group.size,) or perm.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"permutation of {name!r} must be an integer tensor of shape ({group.size},), "
                f"got {perm.dtype} {list(perm.shape)}"
            )
        if not torch.equal(torch.sort(perm).values.cpu(), torch.arange(group.size, dtype=perm.dtype)):
            raise ValueError(f"permutation of {name!r} is not a permutation of 0..{group.size - 1}")


def expand_index(index: Tensor, block_size: int, expand: int) -> Tensor:
    """A group's (n,) gather index (block-respecting) as the index of a segment carrying it ``expand`` times per block.

    Entry (j, c, t) of the expanded segment (block j, copy c, unit t) is unit j*b + t of the group;
    position (j, c, t) of the result gathers copy c of source unit ``index[j*b + t]``.
    """
    if expand == 1:
        return index
    source = index.to(torch.int64).view(-1, 1, block_size)  # (G, 1, b)
    copies = torch.arange(expand, device=source.device).view(1, expand, 1)  # (1, r, 1)
    expanded = (source // block_size) * (expand * block_size) + copies * block_size + source % block_size
    return expanded.reshape(-1)  # (G * r * b,)


def expand_matrix(matrix: Tensor, num_blocks: int, merged_blocks: int, expand: int) -> Tensor:
    """An (n, m) merge/unmerge matrix as the (n*r, m*r) map of a segment carrying the group r times per block.

    Rows are (block, copy, unit) of the group's n = G*b units, columns (block, copy, unit) of the
    m = G'*b' merged units; copy c of a unit maps only to copy c of merged units (block-diagonal per copy).
    """
    if expand == 1:
        return matrix
    n, m = matrix.shape
    if n % num_blocks or m % merged_blocks:
        raise ValueError(f"matrix {tuple(matrix.shape)} does not split into {num_blocks} x {merged_blocks} blocks")
    b, b_merged = n // num_blocks, m // merged_blocks
    blocks = matrix.reshape(num_blocks, 1, b, merged_blocks, 1, b_merged)  # (G, 1, b, G', 1, b')
    eye = torch.eye(expand, dtype=matrix.dtype, device=matrix.device).view(1, expand, 1, 1, expand, 1)
    return (blocks * eye).reshape(n * expand, m * expand)


def axis_index(spec: PermSpec, param: str, axis: int, perms: Mapping[str, Tensor]) -> Tensor | None:
    """The (L,) gather index of one axis (segments offset and concatenated); None if nothing moves."""
    axis_spec = spec.axes[param][axis]
    if axis_spec is None or not any(seg.group in perms for seg in axis_spec):
        return None
    pieces, start = [], 0
    for seg in axis_spec:
        perm = perms.get(seg.group)
        if perm is None:
            local = torch.arange(seg.length)
        else:
            group = spec.groups[seg.group]
            local = expand_index(perm.to(torch.int64).cpu(), group.block_size, seg.expand)
        pieces.append(local + start)
        start += seg.length
    return torch.cat(pieces)


def permute_state_dict(spec: PermSpec, state: Mapping[str, Tensor], perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Apply each group's permutation on every (param, axis, segment) it indexes.

    Groups absent from ``perms`` stay in place. Returns new tensors (entries the spec does not move,
    such as excluded ones, are cloned); ``state`` is never mutated.
    """
    validate_state_dict(spec, state)
    _check_perms(spec, perms)
    out: dict[str, Tensor] = {}
    for param, tensor in state.items():
        moved = tensor
        for axis in range(len(spec.axes.get(param, ()))):
            index = axis_index(spec, param, axis, perms)
            if index is not None:
                moved = moved.index_select(axis, index.to(moved.device))
        out[param] = moved.clone() if moved is tensor else moved
    return out
