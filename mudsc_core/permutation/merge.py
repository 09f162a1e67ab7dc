"""Public entry point for permutation merging: ``merge(models, architecture, method, ...)``.

Mirrors the API's job spec: an architecture spec, a method spec (name + params), N state
dicts, optional calibration inputs. Same-base (task-vector) methods stream from files
instead; see :mod:`mudsc_core.files`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mudsc_core.architectures import (
    build_model,
    check_checkpoint,
    example_inputs,
    infer_architecture,
    trace_architecture,
)
from mudsc_core.devices import resolve_device
from mudsc_core.errors import ComputeOverflow, InvalidCalibration, InvalidCheckpoint, MergeError
from mudsc_core.permutation.iteration import build_merged_state, find_correspondences
from mudsc_core.permutation.similarity import activation_correlations
from mudsc_core.permutation.spec import PermSpec
from mudsc_core.permutation.trace import TraceResult, self_check
from mudsc_core.permutation.trace_build import GroupSummary
from mudsc_core.progress import Progress
from mudsc_core.schema import METHODS, ArchitectureSpec, MethodSpec

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    state_dict: dict[str, Tensor]
    report: dict[str, Any] = field(default_factory=dict)


def _batches(calibration: Tensor, batch_size: int, device: torch.device) -> Iterator[Tensor]:
    for start in range(0, calibration.shape[0], batch_size):
        yield calibration[start : start + batch_size].to(device)


def _check_weights(index: int, state: Mapping[str, Tensor], excluded: frozenset[str]) -> None:
    for name, tensor in state.items():
        if name in excluded:  # bookkeeping (BN num_batches_tracked) is an integer by nature
            continue
        if not tensor.is_floating_point():
            raise InvalidCheckpoint(
                f"model {index}: tensor {name!r} has dtype {tensor.dtype}; weights must be floating point"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidCheckpoint(f"model {index}: tensor {name!r} contains NaN or Inf")
        if not bool(torch.isfinite(tensor.to(torch.float32)).all()):  # the merge computes in float32
            raise ComputeOverflow(
                f"model {index}: tensor {name!r} holds {tensor.dtype} values beyond the float32 range the merge "
                "computes in"
            )


def _check_calibration(calibration: Tensor, probe: nn.Module, device: torch.device) -> Tensor:
    if not isinstance(calibration, Tensor) or not calibration.is_floating_point():
        raise InvalidCalibration("calibration inputs must be a floating-point tensor")
    if calibration.ndim < 2 or calibration.shape[0] == 0:
        raise InvalidCalibration(f"calibration inputs must be (samples, ...), got shape {list(calibration.shape)}")
    if not bool(torch.isfinite(calibration).all()):
        raise InvalidCalibration("calibration inputs contain NaN or Inf")
    calibration = calibration.to(torch.float32)
    try:
        with torch.no_grad():
            probe(calibration[:2].to(device))
    except (RuntimeError, ValueError, IndexError) as exc:
        raise InvalidCalibration(
            f"calibration inputs of shape {list(calibration.shape[1:])} per sample do not fit "
            f"the architecture: {str(exc).splitlines()[0]}"
        ) from exc
    return calibration


def reset_batchnorm(model: nn.Module, calibration: Tensor, batch_size: int, device: torch.device) -> bool:
    """Re-estimate BatchNorm running statistics: reset, one pass in train mode, cumulative average."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average over the pass
    model.train()
    with torch.no_grad():
        for batch in _batches(calibration, batch_size, device):
            if batch.shape[0] > 1:  # BatchNorm cannot train on one sample
                model(batch)
    model.eval()
    return True


@dataclass(frozen=True)
class GroupReport:
    size: int
    merged_size: int
    mean_similarity: float


@dataclass
class PermutationReport:
    """What a permutation merge did; ``to_dict()`` is ``MergeResult.report`` (and the job's ``report.json``)."""

    method: str
    params: dict[str, Any]
    mode: str
    matching: bool
    similarity_space: str  # "dual" | "activation" | "weight" | "none"
    beta: float | None
    weight_space_only: bool
    num_models: int
    heads: str
    architecture: dict[str, Any]
    bn_reset: bool
    groups: dict[str, GroupReport]
    spec: dict[str, Any]  # how the permutation spec was derived and checked (spec_summary)
    objective_per_sweep: list[float]
    sweeps: int
    timings_s: dict[str, float]

    def metrics(self) -> dict[str, Any]:
        """The job's ``result.metrics``: the numbers worth listing without reading the whole report."""
        return {
            "mean_similarity_per_group": {name: group.mean_similarity for name, group in self.groups.items()},
            "objective": max(self.objective_per_sweep) if self.objective_per_sweep else None,
            "sweeps": self.sweeps,
            "similarity_space": self.similarity_space,
            "bn_reset": self.bn_reset,
            "spec_groups": len(self.groups),
            "self_check_max_rel_error": self.spec["self_check"]["max_rel_error"],
            "timings_s": {stage: round(seconds, 4) for stage, seconds in self.timings_s.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "metrics": self.metrics()}


@dataclass
class _Stopwatch:
    """Seconds per stage, and the progress callback that stages report to."""

    progress: Progress
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - started


def merge(
    models: Sequence[Mapping[str, Tensor]],
    architecture: ArchitectureSpec | Mapping[str, Any],
    method: MethodSpec | Mapping[str, Any],
    calibration: Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    calibration_batch_size: int = 128,
    spec: PermSpec | None = None,
) -> MergeResult:
    """Merge N >= 2 models of one architecture trained separately. Never mutates its inputs.

    The permutation spec is derived by tracing the architecture's model unless ``spec`` gives one
    (an integration's own, or a hand-written oracle); either way it must pass the self-check.

    ``progress(stage, fraction, message)`` is called between units of work; it may raise
    :class:`~mudsc_core.errors.MergeCanceled` to stop.
    """
    arch = architecture if isinstance(architecture, ArchitectureSpec) else ArchitectureSpec.model_validate(architecture)
    method_spec = method if isinstance(method, MethodSpec) else MethodSpec.model_validate(method)
    info = METHODS[method_spec.name]
    if info.family != "permutation":
        raise MergeError(f"method {info.name!r} merges same-base checkpoints; use mudsc_core.merge_files")
    problems = info.input_problems(
        models=len(models), base=False, architecture=True, calibration=calibration is not None
    )
    if problems:
        raise (InvalidCalibration if calibration is None and info.calibration == "required" else MergeError)(
            problems[0]
        )
    params = method_spec.typed_params().to_mudsc()
    device = resolve_device(device)
    clock = _Stopwatch(progress or (lambda stage, fraction, message: None))
    if models:
        arch = infer_architecture(arch, models[0])
    with clock.stage("tracing"):
        traced = trace_architecture(arch) if spec is None else given_spec(spec)
    spec = traced.spec

    states, networks = _load_models(models, arch, spec, device)
    if calibration is not None:
        calibration = _check_calibration(calibration, networks[0], device)
    with clock.stage("self_check"):
        check_error = _self_check(networks, spec, arch, calibration, device)
    activation_sims = None
    if calibration is not None and params.match and params.beta < 1.0:
        with clock.stage("collecting_activations"):
            activation_sims = _activation_similarities(
                networks, spec, calibration, calibration_batch_size, device, clock.progress
            )
    with clock.stage("matching"):
        clock.progress("matching", 0.0, "starting")
        outcome = find_correspondences(
            states, spec, params, activation_sims, progress=lambda f, msg: clock.progress("matching", f, msg)
        )
    with clock.stage("merging"):
        clock.progress("merging", 0.0, "building merged weights")
        merged = build_merged_state(states, spec, outcome.correspondences, heads=params.heads)
        merged_arch = _merged_architecture(arch, params.heads, len(states))
        bn_reset = False
        if params.reset_bn and calibration is not None:
            merged, bn_reset = _reset_batchnorm_of(merged, merged_arch, calibration, calibration_batch_size, device)
        clock.progress("merging", 1.0, "done")

    space = _similarity_space(params.match, params.beta, activation_sims is not None)
    report = PermutationReport(
        method=info.name,
        params=method_spec.params,
        mode=params.mode,
        matching=params.match,
        similarity_space=space,
        beta=params.beta if space == "dual" else _SPACE_BETA[space],
        weight_space_only=params.match and calibration is None,
        num_models=len(states),
        heads=params.heads,
        architecture=merged_arch.model_dump(mode="json"),
        bn_reset=bn_reset,
        groups={
            name: GroupReport(
                spec.groups[name].size, outcome.correspondences[name].width, outcome.group_scores.get(name, 0.0)
            )
            for name in spec.group_order()
        },
        spec=spec_summary(traced, check_error),
        objective_per_sweep=outcome.objective_per_sweep,
        sweeps=outcome.sweeps,
        timings_s=clock.seconds,
    )
    if report.weight_space_only:
        log.info("no calibration data: matching in weight space only")
    return MergeResult({k: v.detach().cpu() for k, v in merged.items()}, report.to_dict())


def given_spec(spec: PermSpec) -> TraceResult:
    """A caller's spec in the form of a derivation's result (every group free, nothing traced)."""
    groups = tuple(GroupSummary(g.name, g.size, g.num_blocks, True) for g in spec.groups.values())
    return TraceResult(spec, groups, output_note="spec given by the caller", source="given", capture="none")


def spec_summary(traced: TraceResult, check_error: float) -> dict[str, Any]:
    """The report's account of the spec: derived by tracing, its groups free or pinned and why, the check."""
    return {
        "source": traced.source,
        "capture": traced.capture,
        "derivation_s": round(traced.seconds, 4),
        "groups": [
            {"name": g.name, "size": g.size, "blocks": g.num_blocks, "free": g.free, "pinned_because": list(g.reasons)}
            for g in traced.groups
        ],
        "pinned_by": dict(traced.pinned_by),
        "outputs": traced.output_note,
        "self_check": {"max_rel_error": check_error, "tolerance": SELF_CHECK_RTOL},
    }


SELF_CHECK_RTOL = 1e-4
_SELF_CHECK_SAMPLES = 8


def _self_check(
    networks: Sequence[nn.Module],
    spec: PermSpec,
    arch: ArchitectureSpec,
    calibration: Tensor | None,
    device: torch.device,
) -> float:
    """Random permutations by the spec must leave every input model's outputs unchanged (else the job fails)."""
    if calibration is not None:
        batch: tuple[Tensor, ...] = (calibration[:_SELF_CHECK_SAMPLES].to(device),)
    else:
        batch = tuple(t.to(device) for t in example_inputs(arch))
    return max(self_check(network, spec, batch, rtol=SELF_CHECK_RTOL) for network in networks)


_SPACE_BETA: dict[str, float | None] = {"activation": 0.0, "weight": 1.0, "none": None}


def _similarity_space(match: bool, beta: float, activations: bool) -> str:
    if activations:
        return "activation" if beta == 0.0 else "dual"
    return "weight" if match else "none"


def _load_models(
    models: Sequence[Mapping[str, Tensor]], arch: ArchitectureSpec, spec: PermSpec, device: torch.device
) -> tuple[list[dict[str, Tensor]], list[nn.Module]]:
    """Checked float32 copies of the state dicts on ``device``, and each loaded into its network (eval mode)."""
    for index, state in enumerate(models):
        check_checkpoint(arch, state, spec)
        _check_weights(index, state, spec.excluded)
    states = [
        {
            k: v.detach().to(device=device, dtype=torch.float32) if v.is_floating_point() else v.to(device)
            for k, v in state.items()
        }
        for state in models
    ]
    template = build_model(arch).state_dict()
    for state in states:  # excluded bookkeeping entries (BN num_batches_tracked) may be absent
        for name in spec.excluded:
            state.setdefault(name, template[name].to(device))
    networks = []
    for state in states:
        network = build_model(arch).to(device)
        network.load_state_dict(state)
        networks.append(network.eval())
    return states, networks


def _activation_similarities(
    networks: Sequence[nn.Module],
    spec: PermSpec,
    calibration: Tensor,
    batch_size: int,
    device: torch.device,
    progress: Progress,
) -> dict[str, Tensor]:
    num_batches = -(-calibration.shape[0] // batch_size)
    return activation_correlations(
        networks,
        spec,
        _batches(calibration, batch_size, device),
        progress=lambda f: progress("collecting_activations", f, "calibration batches"),
        num_batches=num_batches,
    )


def _merged_architecture(arch: ArchitectureSpec, heads: str, num_models: int) -> ArchitectureSpec:
    """With separate heads the merged model has every model's classes (logits concatenated)."""
    if heads != "separate":
        return arch
    config = dict(arch.config)
    config["num_classes"] = config["num_classes"] * num_models
    return ArchitectureSpec(name=arch.name, config=config)


def _reset_batchnorm_of(
    merged: dict[str, Tensor], arch: ArchitectureSpec, calibration: Tensor, batch_size: int, device: torch.device
) -> tuple[dict[str, Tensor], bool]:
    network = build_model(arch).to(device)
    network.load_state_dict(merged)
    if not reset_batchnorm(network, calibration, batch_size, device):
        return merged, False
    return {k: v.detach().clone() for k, v in network.state_dict().items()}, True
