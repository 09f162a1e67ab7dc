"""Peak memory of a permutation merge, estimated before the heavy work starts, and measured after.

MuDSC's similarities are (N*n, N*n) float64 matrices per unit group: two models with a 4096-wide
residual stream give 8192^2 * 8 bytes = 0.5 GiB per matrix, an 11008-wide MLP 22016^2 * 8 = 3.6 GiB.
:func:`estimate_merge_memory` adds up, stage by stage, what :func:`mudsc_core.permutation.merge.merge`
holds at once (bytes, host and device together):

- ``loading``: the given state dicts, their float32 copies (none when they are float32 already) and
  one network per model (the calibration pass and the self-check run them);
- ``self_check``: a few more copies of one model (the check permutes a copy of a copy);
- ``collecting_activations``: a float64 (N*n)^2 accumulator per group with an activation site, all
  alive during the pass (one forward feeds every group), plus one batch of the sites' activations;
- ``matching``: every group's activation correlation (float64, kept through all sweeps), each group's
  merge/unmerge matrices (current and best), and the largest step: a group's weight features
  ((N*n, F) in float32, F = everything the spec lists for a unit) with its float64 Gram matrix, or
  the similarity with the matcher's symmetric copy and working copy (3 x (N*n)^2 float64), plus the
  similarities of groups kept between sweeps (at most ``iteration.SIMILARITY_CACHE_BYTES``);
- ``merging``: the merged state and the copies of its largest tensor being averaged;
- ``repair`` (``repair: true``): the input networks rebuilt from their states, the merged network and a
  copy of the merged state being corrected.

With ``beta: "auto"`` the scorer keeps the input networks alive through every candidate, and the best
candidate's merged state is kept while the next is built and scored: both count in matching and merging.

Every stage also counts :data:`RUNTIME_OVERHEAD_BYTES` (allocator, BLAS buffers, lazy imports). The
networks and the activation correlations are released as soon as their stage is over, so they do not
count in later stages. The estimate is checked against measured peak RSS in
``tests/unit/test_merge_memory.py`` (within 1.6x either way; 0.8-1.2x measured); numbers in
``docs/performance.md``.
"""

from __future__ import annotations

import math
import os
import resource
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from mudsc_core.permutation.iteration import SIMILARITY_CACHE_BYTES
from mudsc_core.permutation.similarity import GRAM_CHUNK_ELEMENTS
from mudsc_core.permutation.spec import PermSpec

F32, F64 = 4, 8
_SELF_CHECK_COPIES = 4  # deep copy of the model, its state, the checker's copy, one permuted state
_CALIBRATION_COPIES = 3  # a batch's site tensors (float32), the forward's own intermediates, the float64 stack
# What a merge holds beyond its tensors: the allocator's retained free blocks, BLAS and thread-pool buffers,
# modules first imported by the merge (measured: ~100 MiB on merges whose tensors are a few MiB).
RUNTIME_OVERHEAD_BYTES = 96 * 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """What a merge will hold at its peak; ``stages`` gives the peak of each stage."""

    peak_bytes: int
    peak_stage: str
    stages: dict[str, int]
    largest_group: str  # the group with the widest similarity matrix
    largest_group_width: int  # its units per model

    def to_dict(self) -> dict[str, object]:
        return {
            "estimated_peak_bytes": self.peak_bytes,
            "estimated_peak_stage": self.peak_stage,
            "estimated_stage_bytes": dict(self.stages),
            "largest_group": self.largest_group,
            "largest_group_width": self.largest_group_width,
        }

    def describe(self) -> str:
        return (
            f"estimated peak {_gib(self.peak_bytes)} (in {self.peak_stage}); largest unit group "
            f"{self.largest_group!r}, {self.largest_group_width} units per model"
        )


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB ({count} bytes)"


def _unique_tensors(state: Mapping[str, Tensor]) -> list[Tensor]:
    """The state's tensors, a storage shared by two entries (tied embeddings) once (anything else: skipped,
    the merge's own checks name it)."""
    seen: set[tuple[int, int]] = set()
    tensors = []
    for tensor in state.values():
        if not isinstance(tensor, Tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        tensors.append(tensor)
    return tensors


def state_bytes(state: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in _unique_tensors(state))


def _float32_bytes(state: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * F32 for t in _unique_tensors(state) if t.is_floating_point())


def _copy_bytes(state: Mapping[str, Tensor], device: str) -> int:
    """The float32 copies the merge makes (``.to(float32)`` of a float32 tensor on the device is itself)."""
    return sum(
        t.numel() * F32
        for t in _unique_tensors(state)
        if t.is_floating_point() and (t.element_size() != F32 or t.dtype.is_complex or t.device.type != device)
    )


def _fits(tensor: object, axis: int) -> bool:
    return isinstance(tensor, Tensor) and axis < tensor.ndim and tensor.shape[axis] > 0


def feature_width(spec: PermSpec, group: str, state: Mapping[str, Tensor]) -> int:
    """F: the length of one unit's weight vector (everything the spec lists for it, one model)."""
    size = spec.groups[group].size
    width = 0
    for param, axis, _start, segment in spec.segments_of(group):
        tensor = state.get(param)
        if not _fits(tensor, axis):  # left out (a tied head, filled in by the merge) or misshapen (refused later)
            continue
        assert isinstance(tensor, Tensor)
        width += tensor.numel() // tensor.shape[axis] * segment.length // size
    return width


def _merged_numel(spec: PermSpec, param: str, tensor: Tensor, widths: Mapping[str, int]) -> int:
    """Entries of ``param`` in the merged model: every unit axis at its groups' merged widths."""
    if not isinstance(tensor, Tensor):
        return 0
    numel = tensor.numel()
    for axis, axis_spec in enumerate(spec.axes.get(param, ())):
        if axis_spec is not None and _fits(tensor, axis):
            merged = sum(widths[seg.group] * seg.expand for seg in axis_spec)
            numel = numel // tensor.shape[axis] * merged
    return numel


def merged_width(size: int, num_models: int, mode: str, reduce: float | None) -> int:
    if mode != "zip":
        return size
    r = 1.0 - 1.0 / num_models if reduce is None else reduce
    return max(1, round(num_models * size * (1.0 - r)))


def estimate_merge_memory(
    spec: PermSpec,
    states: Sequence[Mapping[str, Tensor]],
    *,
    mode: str = "zip",
    reduce: float | None = None,
    match: bool = True,
    activations: bool = False,
    activation_samples: Mapping[str, int] | None = None,
    device: str = "cpu",
    auto: bool = False,
    repair: bool = False,
) -> MemoryEstimate:
    """Peak bytes of merging ``states`` by ``spec`` (see the module docstring for what counts).

    ``activations``: whether activation similarities are collected (calibration given, beta < 1).
    ``activation_samples``: per group, the samples (positions) one calibration batch gives at its site;
    without it the batch's activations are left out (a lower bound of that stage).
    """
    num_models = len(states)
    inputs = sum(state_bytes(state) for state in states)
    copies = sum(_copy_bytes(state, device) for state in states)
    model = max((_float32_bytes(state) for state in states), default=0)
    networks = num_models * model
    held = RUNTIME_OVERHEAD_BYTES + inputs + copies  # alive from start to end

    groups = spec.group_order()
    stacked = {g: num_models * spec.groups[g].size for g in groups}
    square = {g: F64 * stacked[g] ** 2 for g in groups}
    sited = [g for g in groups if spec.groups[g].activation is not None] if activations and match else []
    correlations = sum(square[g] for g in sited)

    stages = {"loading": held + networks + model, "self_check": held + networks + _SELF_CHECK_COPIES * model}
    if sited:
        samples = activation_samples or {}
        batch = sum(stacked[g] * samples.get(g, 0) for g in sited)
        largest = max(stacked[g] * samples.get(g, 0) for g in sited)
        stages["collecting_activations"] = (
            held + networks + correlations + _CALIBRATION_COPIES * F32 * batch + 2 * F64 * largest
        )

    widths = {g: merged_width(spec.groups[g].size, num_models, mode if match else "align", reduce) for g in groups}
    merged = [
        _merged_numel(spec, param, tensor, widths) * F32 for param, tensor in (states[0] if states else {}).items()
    ]
    # beta "auto": the scorer's input networks, and the best candidate's merged state so far
    searching = networks + sum(merged) if auto else 0
    if match and states:
        # Per model (n, m) float32 merge and unmerge matrices, for the current and the best sweep.
        matchings = sum(2 * 2 * num_models * spec.groups[g].size * widths[g] * F32 for g in groups)
        steps = []
        for g in groups:
            features = stacked[g] * feature_width(spec, g, states[0]) * F32
            chunk = 2 * F64 * min(stacked[g] * max(feature_width(spec, g, states[0]), 1), GRAM_CHUNK_ELEMENTS)
            steps.append(max(2 * features, features + square[g] + chunk, 3 * square[g]))
        # the other groups' similarities kept between sweeps (iteration.SIMILARITY_CACHE_BYTES at most; the
        # current group's is the step's own)
        cache = min(SIMILARITY_CACHE_BYTES, sum(square[g] for g in groups) - max(square.values(), default=0))
        stages["matching"] = held + correlations + matchings + max(steps, default=0) + cache + searching
    else:
        matchings = 0

    # The merged state, and the N mapped copies of its largest tensor, stacked, and their sum (with auto, the
    # candidate's network being scored too).
    stages["merging"] = (
        held + matchings // 2 + sum(merged) + (2 * num_models + 1) * max(merged, default=0) + searching
    ) + (model if auto else 0)
    if repair:
        stages["repair"] = held + matchings // 2 + 2 * sum(merged) + networks + model + searching

    peak_stage = max(stages, key=lambda name: stages[name])
    widest = max(groups, key=lambda g: spec.groups[g].size) if groups else ""
    return MemoryEstimate(
        peak_bytes=stages[peak_stage],
        peak_stage=peak_stage,
        stages=stages,
        largest_group=widest,
        largest_group_width=spec.groups[widest].size if widest else 0,
    )


# --------------------------------------------------------------------------- budget and measurement
def machine_memory_bytes() -> int:
    """The memory this process may use: its cgroup's limit where one is set, else the machine's RAM."""
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            return int(text)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


DEFAULT_BUDGET_FRACTION = 0.9


def resolve_budget(configured: int | None) -> int:
    """The budget a setting gives: None -> 90% of :func:`machine_memory_bytes`, 0 -> no limit (0)."""
    if configured is None:
        return math.floor(DEFAULT_BUDGET_FRACTION * machine_memory_bytes())
    return configured


def reset_peak_rss() -> bool:
    """Restart the process's peak-RSS high-water mark (Linux: /proc/self/clear_refs); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """The process's peak resident set since start (or the last :func:`reset_peak_rss`), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return peak_rss_bytes()
