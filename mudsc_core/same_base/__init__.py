"""Same-base (task-vector) merge methods, streamed tensor by tensor.

``merge_checkpoints`` (``stream.py``) is the entry point. Each method is a *merger*: an
object with ``needs_base`` and ``merge(name, inputs, weights, model_ids) -> Tensor``.
For methods with a base, ``inputs`` yields task vectors tau_i = theta_i - theta_0 (float32)
and the merger returns the merged task vector, lambda included (the result is theta_0 plus
it); for methods without one, ``inputs`` yields the models' tensors and the merger returns
the merged tensor. ``inputs`` is consumed lazily, so a merger holds no more task vectors
than its rule needs. The tensors it yields are the merger's to overwrite (they live in read
buffers that are reused for the next tensor); a merger may return one but must not keep any.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mudsc_core.same_base.stream import build_merger, merge_checkpoints

__all__ = ["merge_checkpoints", "build_merger"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mudsc_core.same_base import stream

        return getattr(stream, name)
    raise AttributeError(name)
