"""Per-tensor statistics of a same-base merge, measured while the stream merges (the report's ``tensor_stats``).

For each merged tensor: the L2 norm of every model's task vector (model minus base), the fraction of
elements whose task vectors disagree in sign (some positive, some negative: what TIES' sign election
resolves), and the merged task vector's norm and fraction of non-zero elements ("kept": below 1 where a
sparsifier dropped elements). Cheap by construction: the norms are exact (one reduction per task vector,
read while it is in memory anyway); the two fractions are measured on an evenly strided sample of at most
``SAMPLE`` elements per tensor (a standard error below 0.002), so they cost a constant per tensor and no
tensor-sized temporaries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

SAMPLE = 65536


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    """At most SAMPLE elements, evenly strided over the flattened tensor (a view where it is contiguous)."""
    flat = tensor.reshape(-1)
    stride = max(1, math.ceil(flat.numel() / SAMPLE))
    return flat[::stride][:SAMPLE]


class TaskVectorStats:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._reset()

    def _reset(self) -> None:
        self._norms: list[float] = []
        self._positive: torch.Tensor | None = None
        self._negative: torch.Tensor | None = None
        # blocked tensors (begin_blocks ... end_blocks): sums of squares and per-block sample counts
        self._stride = 1
        self._squares: list[float] = []
        self._merged_squares = 0.0
        self._sampled = self._conflicts = self._kept = 0

    def watch(
        self, task_vectors: Iterable[torch.Tensor], norms: Sequence[float] | None = None
    ) -> Iterator[torch.Tensor]:
        """Yield the task vectors unchanged, measuring each before the merger may overwrite it; ``norms``: their
        L2 norms where the producer computed them already (filled as it yields)."""
        self._reset()
        for tau in task_vectors:
            index = len(self._norms)
            self._norms.append(norms[index] if norms is not None else float(torch.linalg.vector_norm(tau)))
            sample = _sample(tau)
            if self._positive is None or self._negative is None:
                self._positive, self._negative = sample > 0, sample < 0
            else:
                self._positive |= sample > 0
                self._negative |= sample < 0
            yield tau

    def merged(self, name: str, delta: torch.Tensor) -> None:
        """Record the tensor's row, given its merged task vector."""
        sample = _sample(delta)
        size = max(sample.numel(), 1)
        conflicts = 0
        if self._positive is not None and self._negative is not None and len(self._norms) > 1:
            conflicts = int((self._positive & self._negative).sum())
        self.rows.append(
            {
                "name": name,
                "numel": delta.numel(),
                "task_vector_norms": self._norms,
                "merged_norm": float(torch.linalg.vector_norm(delta)),
                "sign_conflict": conflicts / size,
                "kept": int(torch.count_nonzero(sample)) / size,
            }
        )
        self._reset()

    # A tensor merged in row blocks (mudsc_core.same_base.blocks): the same row, accumulated block by block
    # (the norms from sums of squares, so equal to the whole-tensor ones up to rounding; the same sample).
    def begin_blocks(self, numel: int) -> None:
        self._reset()
        self._stride = max(1, math.ceil(numel / SAMPLE))

    def _block_sample(self, start: int, block: torch.Tensor) -> torch.Tensor:
        """The whole tensor's sample entries that fall in ``block`` (flat entries from ``start`` on)."""
        flat = block.reshape(-1)
        first = -(-start // self._stride)  # the first sample index at or after start
        stop = min(-(-(start + flat.numel()) // self._stride), SAMPLE)
        if stop <= first:
            return flat[:0]
        return flat[first * self._stride - start :: self._stride][: stop - first]

    def watch_block(self, start: int, index: int, tau: torch.Tensor) -> None:
        """Model ``index``'s task vector on the block at flat offset ``start`` (before it is overwritten)."""
        if index == len(self._squares):
            self._squares.append(0.0)
        self._squares[index] += float(torch.linalg.vector_norm(tau)) ** 2
        sample = self._block_sample(start, tau)
        if index == 0 or self._positive is None or self._negative is None:
            self._positive, self._negative = sample > 0, sample < 0
        else:
            self._positive |= sample > 0
            self._negative |= sample < 0

    def merged_block(self, start: int, delta: torch.Tensor) -> None:
        """The merged task vector on the block (after every model's ``watch_block`` for it)."""
        self._merged_squares += float(torch.linalg.vector_norm(delta)) ** 2
        sample = self._block_sample(start, delta)
        self._sampled += sample.numel()
        self._kept += int(torch.count_nonzero(sample))
        if self._positive is not None and self._negative is not None and len(self._squares) > 1:
            self._conflicts += int((self._positive & self._negative).sum())
        self._positive = self._negative = None

    def end_blocks(self, name: str, numel: int) -> None:
        size = max(self._sampled, 1)
        self.rows.append(
            {
                "name": name,
                "numel": numel,
                "task_vector_norms": [math.sqrt(s) for s in self._squares],
                "merged_norm": math.sqrt(self._merged_squares),
                "sign_conflict": self._conflicts / size,
                "kept": self._kept / size,
            }
        )
        self._reset()
