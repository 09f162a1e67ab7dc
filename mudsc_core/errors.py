"""The failures a user can cause, each with a stable machine-readable code.

Every error the core raises for bad input derives from :class:`MergeError`; the worker maps
``code`` to the job's ``error.code`` and the API maps the ``ValueError`` subclasses raised
inside pydantic validators to 422 answers.
"""

from __future__ import annotations


class MergeError(Exception):
    """Base of every user-caused merge failure. ``code`` is stable; ``message`` is for people."""

    code: str = "internal"
    retryable: bool = False

    def __init__(self, message: str, *, stage: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.stage = stage


class ObjectNotFound(MergeError):
    code = "object_not_found"


class ObjectNotReadable(MergeError):
    """An input the storage refuses to hand out (access denied, or another refusal)."""

    code = "object_not_readable"


class InvalidCheckpoint(MergeError):
    """Not safetensors, truncated, hostile header, NaN/Inf weights, unsupported dtype."""

    code = "invalid_checkpoint"


class IncompatibleModels(MergeError):
    """Models that cannot be merged with each other (shapes, missing tensors)."""

    code = "incompatible_models"


class ArchitectureMismatch(MergeError):
    """A checkpoint that does not fit the architecture (or permutation spec) it was given."""

    code = "architecture_mismatch"


class InvalidCalibration(MergeError):
    code = "invalid_calibration"


class SpecError(MergeError):
    """A permutation spec that is internally inconsistent (a bug in an architecture's spec)."""

    code = "invalid_spec"


class MergeCanceled(MergeError):
    """Raised by a progress callback to stop a merge cooperatively."""

    code = "canceled"


class UnsupportedArchitecture(MergeError):
    """A model whose permutation spec cannot be derived or verified (untraceable forward, a spec
    that changes the model's outputs under permutation)."""

    code = "unsupported_architecture"


class OutputOverflow(MergeError):
    """A merged tensor holds values the output dtype cannot represent (finite inputs, inf after the cast)."""

    code = "output_overflow"


class InvalidParameters(MergeError):
    """Method or per-model parameters that do not fit the checkpoints (e.g. a per-tensor value out of
    the method's range once resolved for a tensor)."""

    code = "invalid_params"


class ComputeOverflow(MergeError):
    """Finite weights or activations that overflow the float32 the merge computes in (e.g. float64 weights
    beyond 3.4e38, or weights so large that a forward pass reaches inf): the inputs' fault, not calibration's."""

    code = "compute_overflow"


class TooLarge(MergeError):
    """A merge whose estimated peak memory exceeds the worker's budget (``MUDSC_WORKER__MEMORY_BUDGET_BYTES``):
    refused before the heavy work instead of being killed by the kernel. Deterministic, so not retried."""

    code = "too_large"
