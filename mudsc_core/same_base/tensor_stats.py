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
from collections.abc import Iterable, Iterator
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

    def watch(self, task_vectors: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Yield the task vectors unchanged, measuring each before the merger may overwrite it."""
        self._reset()
        for tau in task_vectors:
            self._norms.append(float(torch.linalg.vector_norm(tau)))
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
