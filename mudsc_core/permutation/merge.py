"""Public entry point for permutation merging: ``merge(models, architecture, method, ...)``.

Mirrors the API's job spec: an architecture spec, a method spec (name + params), N state
dicts, optional calibration inputs. Same-base (task-vector) methods stream from files
instead; see :mod:`mudsc_core.files`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mudsc_core.devices import resolve_device
from mudsc_core.architectures import build_model, check_checkpoint, perm_spec
from mudsc_core.errors import InvalidCalibration, InvalidCheckpoint, MergeError
from mudsc_core.permutation.iteration import build_merged_state, find_correspondences
from mudsc_core.schema import ArchitectureSpec, MethodSpec, METHODS
from mudsc_core.permutation.similarity import activation_correlations

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, float, str], None]


@dataclass
class MergeResult:
    state_dict: dict[str, Tensor]
    report: dict[str, Any] = field(default_factory=dict)


def _batches(calibration: Tensor, batch_size: int, device: torch.device) -> Iterator[Tensor]:
    for start in range(0, calibration.shape[0], batch_size):
        yield calibration[start:start + batch_size].to(device)


def _check_weights(index: int, state: Mapping[str, Tensor], excluded: frozenset[str]) -> None:
    for name, tensor in state.items():
        if name in excluded:  # bookkeeping (BN num_batches_tracked) is an integer by nature
            continue
        if not tensor.is_floating_point():
            raise InvalidCheckpoint(f"model {index}: tensor {name!r} has dtype {tensor.dtype}; weights must be floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidCheckpoint(f"model {index}: tensor {name!r} contains NaN or Inf")


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
        raise InvalidCalibration(f"calibration inputs of shape {list(calibration.shape[1:])} per sample do not fit "
                                 f"the architecture: {str(exc).splitlines()[0]}") from exc
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


def merge(
    models: Sequence[Mapping[str, Tensor]],
    architecture: ArchitectureSpec | Mapping[str, Any],
    method: MethodSpec | Mapping[str, Any],
    calibration: Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    calibration_batch_size: int = 128,
) -> MergeResult:
    """Merge N >= 2 models of one architecture trained separately. Never mutates its inputs.

    ``progress(stage, fraction, message)`` is called between units of work; it may raise
    :class:`~mudsc_core.errors.MergeCanceled` to stop.
    """
    arch = architecture if isinstance(architecture, ArchitectureSpec) else ArchitectureSpec.model_validate(architecture)
    method_spec = method if isinstance(method, MethodSpec) else MethodSpec.model_validate(method)
    info = METHODS[method_spec.name]
    if info.family != "permutation":
        raise MergeError(f"method {info.name!r} merges same-base checkpoints; use mudsc_core.merge_files")
    params = method_spec.typed_params().to_mudsc()
    if len(models) < 2:
        raise MergeError("at least two models are needed")
    if info.calibration == "required" and calibration is None:
        raise InvalidCalibration(f"method {info.name!r} requires calibration inputs")
    device = resolve_device(device)
    report_progress = progress or (lambda stage, fraction, message: None)
    timings: dict[str, float] = {}
    spec = perm_spec(arch)

    for index, state in enumerate(models):
        check_checkpoint(arch, state)
        _check_weights(index, state, spec.excluded)
    states = [{k: v.detach().to(device=device, dtype=torch.float32) if v.is_floating_point() else v.to(device)
               for k, v in state.items()} for state in models]
    template = build_model(arch).state_dict()
    for state in states:  # excluded bookkeeping entries (BN num_batches_tracked) may be absent
        for name in spec.excluded:
            state.setdefault(name, template[name].to(device))
    networks = []
    for state in states:
        network = build_model(arch).to(device)
        network.load_state_dict(state)
        networks.append(network.eval())
    if calibration is not None:
        calibration = _check_calibration(calibration, networks[0], device)

    use_activations = calibration is not None and params.match and params.beta < 1.0
    activation_sims = None
    if use_activations:
        assert calibration is not None
        started = time.perf_counter()
        num_batches = -(-calibration.shape[0] // calibration_batch_size)
        activation_sims = activation_correlations(
            networks, spec, _batches(calibration, calibration_batch_size, device),
            progress=lambda f: report_progress("collecting_activations", f, "calibration batches"),
            num_batches=num_batches,
        )
        timings["collecting_activations"] = time.perf_counter() - started

    started = time.perf_counter()
    report_progress("matching", 0.0, "starting")
    outcome = find_correspondences(states, spec, params, activation_sims,
                                   progress=lambda f, msg: report_progress("matching", f, msg))
    timings["matching"] = time.perf_counter() - started

    started = time.perf_counter()
    report_progress("merging", 0.0, "building merged weights")
    merged = build_merged_state(states, spec, outcome.correspondences, heads=params.heads)
    merged_arch = arch
    if params.heads == "separate":
        config = dict(arch.config)
        config["num_classes"] = config["num_classes"] * len(states)
        merged_arch = ArchitectureSpec(name=arch.name, config=config)
    bn_reset = False
    if params.reset_bn and calibration is not None:
        network = build_model(merged_arch).to(device)
        network.load_state_dict(merged)
        bn_reset = reset_batchnorm(network, calibration, calibration_batch_size, device)
        if bn_reset:
            merged = {k: v.detach().clone() for k, v in network.state_dict().items()}
    report_progress("merging", 1.0, "done")
    timings["merging"] = time.perf_counter() - started

    if activation_sims is not None and params.beta == 0.0:
        space = "activation"
    elif activation_sims is not None:
        space = "dual"
    else:
        space = "weight" if params.match else "none"
    report = {
        "method": info.name,
        "params": method_spec.params,
        "mode": params.mode,
        "matching": params.match,
        "similarity_space": space,
        "beta": params.beta if space == "dual" else {"activation": 0.0, "weight": 1.0, "none": None}[space],
        "weight_space_only": params.match and calibration is None,
        "num_models": len(states),
        "heads": params.heads,
        "architecture": merged_arch.model_dump(mode="json"),
        "bn_reset": bn_reset,
        "groups": {
            name: {"size": spec.groups[name].size,
                   "merged_size": outcome.correspondences[name].width,
                   "mean_similarity": outcome.group_scores.get(name, 0.0)}
            for name in spec.group_order()
        },
        "objective_per_sweep": outcome.objective_per_sweep,
        "sweeps": outcome.sweeps,
        "timings_s": timings,
    }
    report["metrics"] = {
        "mean_similarity_per_group": {name: group["mean_similarity"] for name, group in report["groups"].items()},
        "objective": max(outcome.objective_per_sweep) if outcome.objective_per_sweep else None,
        "sweeps": outcome.sweeps,
        "similarity_space": space,
        "bn_reset": bn_reset,
        "timings_s": {stage: round(seconds, 4) for stage, seconds in timings.items()},
    }
    if report["weight_space_only"]:
        log.info("no calibration data: matching in weight space only")
    return MergeResult({k: v.detach().cpu() for k, v in merged.items()}, report)
