"""Row-block merging of large tensors (the embedding, the LM head, any tensor above a size threshold).

Whole-tensor merging of a tensor holds it N + 1 times (the base and every task vector) plus a
sparsifier's tensor-sized temporaries (TIES: a magnitude copy and a mask). Here a large tensor is
merged a block of rows at a time: each block of the base and of the models is read straight from the
checkpoint files (positioned reads into small reusable buffers) and merged into the output buffer,
which is the only tensor-sized memory. What is not elementwise is the top-k magnitude threshold
(TIES, breadcrumbs): a global order statistic of each task vector. It is found first, one model at a
time, with the output buffer as scratch: |theta_i - theta_0| is filled in block by block, selected in
place (numpy's introselect), and the entries strictly above the threshold counted; the merge pass then
keeps, block by block, the entries above the threshold and the first (lowest flat index) ones equal to
it until exactly k are kept, which is :func:`~mudsc_core.same_base.sparsify.topk_mask`'s rule.

The results are bit for bit those of the whole-tensor path: every other step of the family
(weighting, sign election, the mix, lambda, adding the base) is elementwise, and the random
sparsifiers draw from one generator per (tensor, model) kept across the blocks (the CPU generator's
stream does not depend on how the draws are split). What would not be bitwise is a whole-tensor sum:
configurations that rescale by L1 norms (``rescale`` on magnitude/breadcrumbs, ``rescale_rule:
l1_norm``) keep the whole-tensor path, as do tensors read through a checkpoint view (a LoRA adapter
applied on read) and 0-d/1-D tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from mudsc_core.io import Checkpoint, read_exact
from mudsc_core.same_base import sparsify as sp
from mudsc_core.same_base.base import FirstPass
from mudsc_core.same_base.task_arithmetic import TaskArithmeticFamily
from mudsc_core.same_base.tensor_stats import TaskVectorStats
from mudsc_core.schema.parameters import TensorValues

# Tensors above this many float32 bytes are merged in row blocks of about BLOCK_ELEMENTS entries.
BLOCK_ABOVE_BYTES = 32 * 1024 * 1024
BLOCK_ELEMENTS = 2 * 1024 * 1024
_COUNT_CHUNK = 1 << 20


def supports_blocks(merger: object) -> bool:
    """Whether the merger's result can be computed block by block, bit for bit (see the module doc)."""
    if type(merger) is not TaskArithmeticFamily:
        return False
    p = merger.params
    if p.sparsifier in ("magnitude", "breadcrumbs"):
        return not p.rescale
    if p.sparsifier in ("random", "della"):
        return not p.rescale or p.rescale_rule == "keep_probability"
    return p.sparsifier == "none"


def wants_blocks(shape: Sequence[int], sources: Sequence[Checkpoint]) -> bool:
    """A tensor merged in blocks: 2-D or more, above the threshold, every source a plain checkpoint."""
    return (
        len(shape) >= 2
        and shape[0] > 1
        and 4 * math.prod(shape) > BLOCK_ABOVE_BYTES
        and all(type(c) is Checkpoint for c in sources)
    )


class BlockReader:
    """Positioned reads of row ranges of a tensor, as float32, into buffers reused across tensors."""

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` for ``slot`` (grown when a larger block needs it)."""
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < nbytes:
            self._buffers.pop(slot, None)
            del buffer
            buffer = self._buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return buffer

    def rows(
        self, checkpoint: Checkpoint, name: str, start: int, stop: int, out: torch.Tensor | None = None, slot: int = 0
    ) -> torch.Tensor:
        """Rows ``start:stop`` of ``name`` as float32 (into ``out``, a contiguous float32 tensor of that
        size, or into ``slot``'s buffer); NaN/Inf raise as :meth:`Checkpoint.get_float32` does."""
        entry = checkpoint.entry(name)
        shape = (stop - start, *entry.shape[1:])
        count = math.prod(shape)
        itemsize = entry.dtype.itemsize
        if out is None:
            out = self.buffer(slot, 4 * count)[: 4 * count].view(torch.float32)
        out = out.view(shape)
        if entry.dtype == torch.float32:
            stored = out
        else:  # read the stored bytes behind the float32 block, then convert
            stored = self.buffer(-1 - slot, count * itemsize)[: count * itemsize].view(entry.dtype).view(shape)
        row_bytes = itemsize * math.prod(entry.shape[1:])
        view = stored.reshape(-1).view(torch.uint8).numpy().data.cast("B")
        read_exact(entry.file, entry.start + start * row_bytes, view, name)
        if stored is not out:
            out.copy_(stored)
        checkpoint.check_finite(name, out, stored)
        return out


def row_blocks(shape: Sequence[int]) -> list[tuple[int, int]]:
    """The tensor's row ranges of about BLOCK_ELEMENTS entries each (at least one row)."""
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, BLOCK_ELEMENTS // per_row)
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


class _TopK:
    """Exactly ``k`` of ``n`` entries, the largest ones (ties at the threshold: lowest flat index first),
    handed out block by block in order."""

    def __init__(self, k: int, n: int) -> None:
        self.k, self.n = k, n
        self.threshold = 0.0
        self.ties_left = 0  # entries equal to the threshold still to keep

    @property
    def needs_threshold(self) -> bool:
        return 0 < self.k < self.n

    def mask(self, magnitudes: torch.Tensor) -> torch.Tensor:
        if self.k <= 0:
            return torch.zeros_like(magnitudes, dtype=torch.bool)
        if self.k >= self.n:
            return torch.ones_like(magnitudes, dtype=torch.bool)
        threshold = torch.tensor(self.threshold, dtype=magnitudes.dtype)
        mask = magnitudes > threshold
        if self.ties_left > 0:
            flat = mask.view(-1)
            ties = (magnitudes.reshape(-1) == threshold).nonzero().squeeze(1)[: self.ties_left]
            flat[ties] = True
            self.ties_left -= ties.numel()
        return mask


def _select(scratch: torch.Tensor, selections: Sequence[_TopK]) -> None:
    """Each selection's threshold (its k-th largest of ``scratch``, a flat float32 tensor reordered in
    place) and how many entries equal to it it keeps."""
    wanted = [s for s in selections if s.needs_threshold]
    if not wanted:
        return
    n = scratch.numel()
    values = scratch.numpy()
    values.partition(sorted({n - s.k for s in wanted}))
    for s in wanted:
        s.threshold = float(values[n - s.k])  # float32 -> float: exact
    for s in wanted:
        threshold = torch.tensor(s.threshold, dtype=torch.float32)
        above = 0
        for start in range(0, n, _COUNT_CHUNK):
            above += int(torch.count_nonzero(scratch[start : start + _COUNT_CHUNK] > threshold))
        s.ties_left = s.k - above


class BlockSparsifier:
    """The family's sparsifier for one tensor, applied to consecutive row blocks of each task vector."""

    def __init__(
        self,
        family: TaskArithmeticFamily,
        name: str,
        shape: Sequence[int],
        model_ids: Sequence[int],
        values: TensorValues | None,
    ) -> None:
        self.family = family
        self.p = family.params
        vals = values
        n = math.prod(shape)
        self.selections: dict[int, list[_TopK]] = {}
        self.generators: dict[int, torch.Generator] = {}
        for i in model_ids:
            if self.p.sparsifier == "magnitude" and self.p.topk_scope == "tensor":
                density = family.value("density", vals, i)
                if density < 1.0:
                    self.selections[i] = [_TopK(int(density * n), n)]
            elif self.p.sparsifier == "breadcrumbs":
                density = family.value("density", vals, i)
                if density < 1.0:
                    target, n_top = int(density * n), int(family.value("gamma", vals, i) * n)
                    n_bottom = n - target - n_top
                    if n_bottom < 0:  # as sparsify.breadcrumbs
                        n_top += n_bottom
                        n_bottom = 0
                    self.selections[i] = [_TopK(n - n_bottom, n), _TopK(n_top, n)]
            elif self.p.sparsifier in ("random", "della"):
                self.generators[i] = sp.rng_for(self.p.seed, name, i)

    def needs_thresholds(self, model_id: int) -> bool:
        return any(s.needs_threshold for s in self.selections.get(model_id, ()))

    def select(self, model_id: int, magnitudes: torch.Tensor) -> None:
        """Thresholds from the model's whole |task vector| (flat float32; reordered in place)."""
        _select(magnitudes, self.selections[model_id])

    def __call__(self, name: str, delta: torch.Tensor, model_id: int, values: TensorValues | None) -> torch.Tensor:
        p, family = self.p, self.family
        if p.sparsifier in ("none",) or (p.sparsifier == "magnitude" and p.topk_scope == "model"):
            return family.sparsify(name, delta, model_id, values)  # elementwise
        if p.sparsifier == "magnitude":
            chosen = self.selections.get(model_id)
            if chosen is None:  # density >= 1
                return delta
            mask = chosen[0].mask(delta.abs())
            return delta.mul_(mask)  # as sparsify.magnitude_ (no rescale here)
        if p.sparsifier == "breadcrumbs":
            chosen = self.selections.get(model_id)
            if chosen is None:
                return delta.clone()
            magnitudes = delta.abs()
            mask = chosen[0].mask(magnitudes) & ~chosen[1].mask(magnitudes)
            del magnitudes
            return delta * mask
        return family.sparsify(name, delta, model_id, values, generator=self.generators[model_id])  # random, della


def merge_blocked(
    family: TaskArithmeticFamily,
    name: str,
    shape: Sequence[int],
    base: Checkpoint,
    models: Sequence[Checkpoint],
    model_ids: Sequence[int],
    weights: Sequence[float],
    values: TensorValues | None,
    out: torch.Tensor,
    reader: BlockReader,
    stats: TaskVectorStats | None = None,
    on_read: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """theta_0 + family(theta_i - theta_0) for one tensor, in row blocks, into ``out`` (contiguous float32,
    at least the tensor's size); returns ``out``'s first numel entries shaped as the tensor.

    ``models[j]`` is model ``model_ids[j]``; ``on_read(seconds)`` is told the time spent reading."""
    n = math.prod(shape)
    result = out.reshape(-1)[:n]
    blocks = row_blocks(shape)
    per_row = math.prod(shape[1:])
    sparsify = BlockSparsifier(family, name, shape, model_ids, values)

    def read(checkpoint: Checkpoint, start: int, stop: int, into: torch.Tensor | None, slot: int) -> torch.Tensor:
        t0 = time.perf_counter()
        block = reader.rows(checkpoint, name, start, stop, out=into, slot=slot)
        if on_read is not None:
            on_read(time.perf_counter() - t0)
        return block

    # 1. Thresholds, one model at a time, the output buffer as scratch for its |task vector|.
    for slot, (model, i) in enumerate(zip(models, model_ids), start=1):
        if not sparsify.needs_thresholds(i):
            continue
        for start, stop in blocks:
            region = result[start * per_row : stop * per_row]
            read(model, start, stop, region, slot)
            region.sub_(read(base, start, stop, None, 0).view(-1)).abs_()
        sparsify.select(i, result)

    # 2. The merge, block by block: the base's rows read into the output, each model's into its buffer.
    if stats is not None:
        stats.begin_blocks(n)
    for start, stop in blocks:
        region = result[start * per_row : stop * per_row].view(stop - start, *shape[1:])
        base_rows = read(base, start, stop, region, 0)
        deltas = []
        for slot, (model, _) in enumerate(zip(models, model_ids), start=1):
            delta = read(model, start, stop, None, slot).sub_(base_rows)
            if stats is not None:
                stats.watch_block(start * per_row, slot - 1, delta)
            deltas.append(delta)
        mixed = family.merge(name, iter(deltas), weights, model_ids, values, sparsify=sparsify)
        del deltas
        if stats is not None:
            stats.merged_block(start * per_row, mixed)
        base_rows.add_(mixed)
        del mixed
    if stats is not None:
        stats.end_blocks(name, n)
    return result.view(tuple(shape))


def observe_blocked(
    first_pass: FirstPass,
    name: str,
    shape: Sequence[int],
    base: Checkpoint,
    models: Sequence[Checkpoint],
    model_ids: Sequence[int],
    reader: BlockReader,
) -> None:
    """Show a whole-model first pass every task vector of one tensor, a row block at a time."""
    for start, stop in row_blocks(shape):
        base_rows = reader.rows(base, name, start, stop, slot=0)
        for slot, (model, i) in enumerate(zip(models, model_ids), start=1):
            first_pass.observe(name, i, reader.rows(model, name, start, stop, slot=slot).sub_(base_rows))
