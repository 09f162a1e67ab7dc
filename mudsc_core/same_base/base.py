"""The protocol every same-base method implements (what its registry entry's factory returns).

A *merger* merges one tensor at a time. For methods with a base (``needs_base``) ``inputs``
yields task vectors tau_i = theta_i - theta_0 (float32) and the merger returns the merged task
vector, lambda included (the result is theta_0 plus it); for methods without one, ``inputs``
yields the models' tensors and the merger returns the merged tensor. ``inputs`` is consumed
lazily, so a merger holds no more task vectors than its rule needs. The tensors it yields are the
merger's to overwrite (they live in read buffers reused for the next tensor); a merger may return
one but must not keep any.

Per-tensor and per-model parameters (gradients over the layers, filter lists, ``models[i].parameters``)
are resolved by the stream for each tensor and handed over as ``values``
(:class:`~mudsc_core.schema.parameters.TensorValues`): ``values.get(key)`` is the method's value for this
tensor, ``values.get(key, model_id)`` that model's (falling back to the method's). ``weights`` are
already each model's resolved weight. Without ``values`` (a whole-tensor call) a merger uses its
params' numbers.

A merger whose rule needs statistics over the whole model first (whole-model TIES: one
magnitude threshold per model) returns a :class:`FirstPass` from ``first_pass()``: the stream then
shows it every task vector once before merging, and ``finish()`` returns notes for the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch

from mudsc_core.schema.parameters import TensorValues


class FirstPass(Protocol):
    def observe(self, name: str, model_id: int, task_vector: torch.Tensor) -> None: ...

    def finish(self) -> list[str]: ...


class Merger(Protocol):
    @property
    def needs_base(self) -> bool: ...

    def merge(
        self,
        name: str,
        inputs: Iterable[torch.Tensor],
        weights: Sequence[float],
        model_ids: Sequence[int],
        values: TensorValues | None = None,
    ) -> torch.Tensor: ...

    def first_pass(self) -> FirstPass | None: ...


# What a same-base registry entry's implementation is: typed params in, a merger out.
MergerFactory = Callable[[Any], Merger]


class SinglePass:
    """Base of the mergers that need no pass over the whole model before merging."""

    def first_pass(self) -> FirstPass | None:
        return None
