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
    complete_state,
    example_inputs,
    infer_architecture,
    outputs_features,
    trace_architecture,
)
from mudsc_core.architectures import transformers as hf
from mudsc_core.devices import resolve_device
from mudsc_core.errors import (
    ComputeOverflow,
    InvalidCalibration,
    InvalidCheckpoint,
    InvalidParameters,
    MergeError,
    TooLarge,
)
from mudsc_core.permutation import auto_beta, partial
from mudsc_core.permutation.iteration import build_merged_state, find_correspondences, space_scores
from mudsc_core.permutation.memory import MemoryEstimate, estimate_merge_memory
from mudsc_core.permutation.repair import repair
from mudsc_core.permutation.similarity import Batch, activation_correlations, batch_samples, batch_slice, site_samples
from mudsc_core.permutation.spec import PermSpec
from mudsc_core.permutation.trace import Inputs, TraceResult, self_check
from mudsc_core.permutation.trace_build import GroupSummary
from mudsc_core.progress import Progress
from mudsc_core.schema import METHODS, ArchitectureSpec, MethodSpec
from mudsc_core.schema.permutation_params import MudscParams

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    state_dict: dict[str, Tensor]
    report: dict[str, Any] = field(default_factory=dict)


def _batches(calibration: Batch, batch_size: int, device: torch.device) -> Iterator[Batch]:
    for start in range(0, batch_samples(calibration), batch_size):
        yield _to(batch_slice(calibration, start, start + batch_size), device)


def _to(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, Mapping):
        return {name: t.to(device) for name, t in batch.items()}
    return batch.to(device)


def _forward(model: nn.Module, batch: Batch) -> Any:
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


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


def _check_calibration(calibration: Batch, probe: nn.Module, device: torch.device, arch: ArchitectureSpec) -> Batch:
    if isinstance(calibration, Mapping):
        return _check_keyword_calibration(calibration, probe, device, arch)
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


def _check_keyword_calibration(
    calibration: Mapping[str, Tensor], probe: nn.Module, device: torch.device, arch: ArchitectureSpec
) -> dict[str, Tensor]:
    """Calibration tensors passed to forward by name (transformers models): checked, floats in float32."""
    if arch.name != "transformers":
        raise InvalidCalibration(f"architecture {arch.name!r} takes one calibration tensor, not keywords")
    hf.check_inputs(arch.typed_config(), calibration, probe)
    inputs = {name: t.to(torch.float32) if t.is_floating_point() else t for name, t in calibration.items()}
    try:
        with torch.no_grad():
            _forward(probe, _to(batch_slice(inputs, 0, 2), device))
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        shapes = ", ".join(f"{name} {list(t.shape[1:])}" for name, t in sorted(inputs.items()))
        raise InvalidCalibration(
            f"calibration inputs ({shapes} per sample) do not fit the model: {str(exc).splitlines()[0]}"
        ) from exc
    return inputs


def reset_batchnorm(model: nn.Module, calibration: Batch, batch_size: int, device: torch.device) -> bool:
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
            if batch_samples(batch) > 1:  # BatchNorm cannot train on one sample
                _forward(model, batch)
    model.eval()
    return True


@dataclass(frozen=True)
class GroupReport:
    size: int
    merged_size: int
    mean_similarity: float  # in the space the merge matched in (the dual mix, or one space)
    # The final matching scored in weight space and in activation space separately, and the fraction of
    # units whose nearest partner differs between the spaces (iteration.space_scores); None where unmeasured.
    weight: float | None = None
    activation: float | None = None
    disagreement: float | None = None


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
    repair: dict[str, Any] | None  # REPAIR's per-group std ratios before/after, and the groups it skipped
    beta_search: dict[str, Any] | None  # beta "auto": every candidate's held-out score and the choice
    groups: dict[str, GroupReport]
    spec: dict[str, Any]  # how the permutation spec was derived and checked (spec_summary)
    objective_per_sweep: list[float]
    sweeps: int
    timings_s: dict[str, float]
    memory: dict[str, Any] = field(default_factory=dict)  # the peak estimate (memory.estimate_merge_memory)
    partial: dict[str, Any] | None = None  # stop_after (partial zip): the cut, the layout, the sizes

    def metrics(self) -> dict[str, Any]:
        """The job's ``result.metrics``: the numbers worth listing without reading the whole report."""
        return {
            "mean_similarity_per_group": {name: group.mean_similarity for name, group in self.groups.items()},
            "objective": max(self.objective_per_sweep) if self.objective_per_sweep else None,
            "sweeps": self.sweeps,
            "similarity_space": self.similarity_space,
            "bn_reset": self.bn_reset,
            "beta_chosen": None if self.beta_search is None else self.beta_search["chosen"],
            "repair_std_ratio": None
            if self.repair is None
            else {g: (r["std_ratio_before"], r["std_ratio_after"]) for g, r in self.repair["groups"].items()},
            "spec_groups": len(self.groups),
            "self_check_max_rel_error": self.spec["self_check"]["max_rel_error"],
            "timings_s": {stage: round(seconds, 4) for stage, seconds in self.timings_s.items()},
            "memory": {"estimated_peak_bytes": self.memory.get("estimated_peak_bytes")},
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
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started  # candidates add up


def merge(
    models: Sequence[Mapping[str, Tensor]],
    architecture: ArchitectureSpec | Mapping[str, Any],
    method: MethodSpec | Mapping[str, Any],
    calibration: Batch | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    calibration_batch_size: int = 128,
    spec: PermSpec | None = None,
    memory_budget_bytes: int | None = None,
) -> MergeResult:
    """Merge N >= 2 models of one architecture trained separately. Never mutates its inputs.

    The permutation spec is derived by tracing the architecture's model unless ``spec`` gives one
    (an integration's own, or a hand-written oracle); either way it must pass the self-check.

    ``progress(stage, fraction, message)`` is called between units of work; it may raise
    :class:`~mudsc_core.errors.MergeCanceled` to stop.

    ``memory_budget_bytes`` (None or 0: no limit): the merge fails with
    :class:`~mudsc_core.errors.TooLarge` before its heavy work when its estimated peak memory
    (:func:`~mudsc_core.permutation.memory.estimate_merge_memory`) exceeds it.
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
    auto = params.beta == "auto"
    if auto and calibration is None:
        raise InvalidCalibration('beta "auto" scores candidate merges on held-out calibration inputs: give calibration')
    if auto:  # every candidate sets its own; 0.5 stands for them until then (memory estimate, activations)
        params = params.model_copy(update={"beta": 0.5})
    if params.repair and calibration is None:
        raise InvalidCalibration("repair renormalises merged units from activations: give calibration inputs")
    if params.heads == "separate" and arch.name == "transformers":
        raise InvalidParameters(
            'heads "separate" needs an architecture whose class count the merge can widen; transformers models '
            'keep their config: use heads "shared"'
        )
    if params.stop_after is not None and arch.name == "transformers":
        raise InvalidParameters(
            "stop_after (partial zip) gives a trunk and one branch per model, which is no Hugging Face model; "
            "transformers models merge whole (their residual stream runs through every layer)"
        )
    if params.stop_after is not None and params.repair:
        raise InvalidParameters("repair applies to whole merges: leave it out with stop_after (partial zip)")
    device = resolve_device(device)
    clock = _Stopwatch(progress or (lambda stage, fraction, message: None))
    if models:
        arch = infer_architecture(arch, models[0])
    with clock.stage("tracing"):
        # A features encoder merged by align keeps its output groups free: the result is in model 0's order.
        free_outputs = outputs_features(arch) and params.mode == "align" and params.heads == "shared"
        traced = trace_architecture(arch, free_outputs=free_outputs) if spec is None else given_spec(spec)
    spec = traced.spec
    cut = None if params.stop_after is None else partial.resolve(spec, params.stop_after)  # (depth, trunk groups)
    collects = calibration is not None and params.match and params.beta < 1.0
    estimate = _check_memory(models, spec, params, collects, None, device, memory_budget_bytes, auto)  # before loading

    states, networks, added = _load_models(models, arch, spec, device)
    if calibration is not None:
        calibration = _check_calibration(calibration, networks[0], device, arch)
        if collects:  # now with one calibration batch's activations, measured on a few samples
            batch = min(calibration_batch_size, batch_samples(calibration))
            samples = site_samples(networks[0], spec, _to(batch_slice(calibration, 0, 4), device), batch)
            estimate = _check_memory(models, spec, params, collects, samples, device, memory_budget_bytes, auto)
    with clock.stage("self_check"):
        check_error = _self_check(networks, spec, arch, calibration, device)
    merged_arch = _merged_architecture(arch, params.heads if cut is None else "shared", len(states))
    built = _MergedModel(
        merged_arch, device, params.heads, None if cut is None else partial.trunk_parameters(spec, cut[1])
    )
    scorer, held_out = None, None
    if auto:  # statistics from the first part of the calibration inputs, candidates scored on the rest
        assert calibration is not None
        calibration, held_out = auto_beta.split(calibration)
        scorer = auto_beta.Scorer(
            networks,
            list(_batches(held_out, calibration_batch_size, device)),
            _forward,
            heads=params.heads,
            features=outputs_features(arch),
            model_zero_order=bool(spec.outputs),
        )
    activation_sims = None
    if collects:
        assert calibration is not None
        with clock.stage("collecting_activations"):
            activation_sims = _activation_similarities(
                networks, spec, calibration, calibration_batch_size, device, clock.progress
            )
    del networks  # only the self-check, the calibration pass and the scorer run the models

    def candidate(beta: float) -> tuple[Any, dict[str, Tensor], tuple[bool, dict[str, Any] | None]]:
        chosen = params.model_copy(update={"beta": beta})
        with clock.stage("matching"):
            clock.progress("matching", 0.0, "starting" if not auto else f"beta {beta}")
            outcome = find_correspondences(
                states, spec, chosen, activation_sims, progress=lambda f, msg: clock.progress("matching", f, msg)
            )
        with clock.stage("merging"):
            clock.progress("merging", 0.0, "building merged weights")
            if cut is None:
                merged = build_merged_state(states, spec, outcome.correspondences, heads=params.heads)
            else:
                merged = partial.build_partial_state(states, spec, outcome.correspondences, cut[1])
            bn_reset = False
            if params.reset_bn and calibration is not None:
                merged, bn_reset = _reset_batchnorm_of(merged, built, calibration, calibration_batch_size, device)
        repaired: dict[str, Any] | None = None
        if params.repair and calibration is not None:
            with clock.stage("repair"):
                clock.progress("repair", 0.0, "renormalising merged units")
                merged, repaired = _repair(
                    merged,
                    states,
                    spec,
                    outcome.correspondences,
                    (arch, merged_arch),
                    calibration,
                    calibration_batch_size,
                    device,
                )
        return outcome, merged, (bn_reset, repaired)

    beta_search: dict[str, Any] | None = None
    if scorer is not None and held_out is not None:
        results: dict[float, tuple[bool, dict[str, Any] | None]] = {}

        def scored(beta: float) -> tuple[Any, dict[str, Tensor], float | None]:
            outcome, merged, extras = candidate(beta)
            results[beta] = extras
            return outcome, merged, max(outcome.objective_per_sweep, default=None)

        sited = all(g.activation is not None for g in spec.groups.values())  # beta 0 needs every group's site
        best, outcome, merged, candidates = auto_beta.choose(
            scored,
            lambda state: scorer(built.network(state)),
            auto_beta.GRID if sited else tuple(b for b in auto_beta.GRID if b > 0),
        )
        bn_reset, repaired = results[best]
        params = params.model_copy(update={"beta": best})
        beta_search = {
            "chosen": best,
            "held_out_samples": batch_samples(held_out),
            "candidates": [{"beta": c.beta, "score": c.score, "objective": c.objective} for c in candidates],
        }
    else:
        outcome, merged, (bn_reset, repaired) = candidate(float(params.beta))
    per_space = space_scores(states, spec, outcome.correspondences, activation_sims) if params.match else {}
    collected, activation_sims = activation_sims is not None, None  # the merging needs no similarity
    clock.progress("merging", 1.0, "done")

    space = _similarity_space(params.match, float(params.beta), collected)
    report = PermutationReport(
        method=info.name,
        params=method_spec.params,
        mode=params.mode,
        matching=params.match,
        similarity_space=space,
        beta=float(params.beta) if space == "dual" else _SPACE_BETA[space],
        weight_space_only=params.match and calibration is None,
        num_models=len(states),
        heads=params.heads,
        architecture=merged_arch.model_dump(mode="json"),
        bn_reset=bn_reset,
        repair=repaired,
        beta_search=beta_search,
        groups={
            name: GroupReport(
                spec.groups[name].size,
                outcome.correspondences[name].width,
                outcome.group_scores.get(name, 0.0),
                **per_space.get(name, {}),
            )
            for name in spec.group_order()
        },
        spec=spec_summary(traced, check_error),
        objective_per_sweep=outcome.objective_per_sweep,
        sweeps=outcome.sweeps,
        timings_s=clock.seconds,
        memory=estimate.to_dict(),
        partial=None if cut is None else _partial_report(spec, cut, params.stop_after, params.heads, merged),
    )
    if report.weight_space_only:
        log.info("no calibration data: matching in weight space only")
    # Entries the input format leaves out (a tied LM head) are left out of the output too.
    return MergeResult({k: v.detach().cpu() for k, v in merged.items() if k not in added}, report.to_dict())


def _check_memory(
    models: Sequence[Mapping[str, Tensor]],
    spec: PermSpec,
    params: MudscParams,
    activations: bool,
    samples: Mapping[str, int] | None,
    device: torch.device,
    budget: int | None,
    auto: bool = False,
) -> MemoryEstimate:
    """The merge's estimated peak memory; :class:`TooLarge` when it exceeds ``budget`` (None, 0: no limit)."""
    estimate = estimate_merge_memory(
        spec,
        models,
        mode=params.mode,
        reduce=params.reduce,
        match=params.match,
        activations=activations,
        activation_samples=samples,
        device=device.type,
        auto=auto,
        repair=params.repair,
    )
    if budget and estimate.peak_bytes > budget:
        raise TooLarge(
            f"the merge needs about {estimate.peak_bytes / 2**30:.2f} GiB ({estimate.peak_bytes} bytes, at its "
            f"{estimate.peak_stage} stage), over the memory budget of {budget / 2**30:.2f} GiB ({budget} bytes); "
            f"its largest unit group is {estimate.largest_group!r} with {estimate.largest_group_width} units per "
            f"model ({len(models)} models: similarity matrices of "
            f"{len(models) * estimate.largest_group_width}^2). Merge fewer or narrower models, or raise "
            "MUDSC_WORKER__MEMORY_BUDGET_BYTES",
            stage="planning",
        )
    return estimate


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
    calibration: Batch | None,
    device: torch.device,
) -> float:
    """Random permutations by the spec must leave every input model's outputs unchanged (else the job fails)."""
    batch: Inputs
    if isinstance(calibration, Mapping):
        batch = {name: t[:_SELF_CHECK_SAMPLES].to(device) for name, t in calibration.items()}
    elif calibration is not None:
        batch = (calibration[:_SELF_CHECK_SAMPLES].to(device),)
    else:
        examples = example_inputs(arch)
        if isinstance(examples, Mapping):
            batch = {name: t.to(device) for name, t in examples.items()}
        else:
            batch = tuple(t.to(device) for t in examples)
    return max(self_check(network, spec, batch, rtol=SELF_CHECK_RTOL) for network in networks)


_SPACE_BETA: dict[str, float | None] = {"activation": 0.0, "weight": 1.0, "none": None}


def _similarity_space(match: bool, beta: float, activations: bool) -> str:
    if activations:
        return "activation" if beta == 0.0 else "dual"
    return "weight" if match else "none"


def _load_models(
    models: Sequence[Mapping[str, Tensor]], arch: ArchitectureSpec, spec: PermSpec, device: torch.device
) -> tuple[list[dict[str, Tensor]], list[nn.Module], set[str]]:
    """Checked float32 copies of the state dicts on ``device``, each loaded into its network (eval mode), and
    the names of the entries filled in that the checkpoints leave out (``complete_state``)."""
    completed = [complete_state(arch, state) for state in models]
    models = [state for state, _ in completed]
    added = set().union(*(names for _, names in completed)) if completed else set()
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
    return states, networks, added


def _activation_similarities(
    networks: Sequence[nn.Module],
    spec: PermSpec,
    calibration: Batch,
    batch_size: int,
    device: torch.device,
    progress: Progress,
) -> dict[str, Tensor]:
    num_batches = -(-batch_samples(calibration) // batch_size)
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


def _network(arch: ArchitectureSpec, state: Mapping[str, Tensor], device: torch.device) -> nn.Module:
    built = build_model(arch).to(device)
    built.load_state_dict(dict(state))
    return built.eval()


def _repair(
    merged: dict[str, Tensor],
    states: Sequence[Mapping[str, Tensor]],
    spec: PermSpec,
    correspondences: Mapping[str, Any],
    archs: tuple[ArchitectureSpec, ArchitectureSpec],
    calibration: Batch,
    batch_size: int,
    device: torch.device,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """REPAIR (``repair.py``) on the merged state: the input networks are rebuilt from their states."""

    state, report = repair(
        merged,
        [_network(archs[0], s, device) for s in states],
        spec,
        {g: c.merge for g, c in correspondences.items()},
        lambda s: _network(archs[1], s, device),
        lambda: _batches(calibration, batch_size, device),
    )
    return state, report.to_dict()


@dataclass(frozen=True)
class _MergedModel:
    """The merged state as a network and back: one network, or a partial zip's branches (``trunk``: the
    trunk's parameter names)."""

    arch: ArchitectureSpec
    device: torch.device
    heads: str
    trunk: frozenset[str] | None = None

    def network(self, state: Mapping[str, Tensor]) -> nn.Module:
        if self.trunk is None:
            return _network(self.arch, state, self.device)
        return partial.partial_model(lambda: build_model(self.arch).to(self.device), state, self.heads)

    def state(self, network: nn.Module) -> dict[str, Tensor]:
        if self.trunk is None:
            return _detached(network)
        assert isinstance(network, partial.PartialModel)
        return partial.join([_detached(branch) for branch in network.branches], self.trunk)


def _detached(network: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def _reset_batchnorm_of(
    merged: dict[str, Tensor], built: _MergedModel, calibration: Batch, batch_size: int, device: torch.device
) -> tuple[dict[str, Tensor], bool]:
    """A partial zip's branches are reset one by one: their equal trunks get equal statistics."""
    network = built.network(merged)
    if not reset_batchnorm(network, calibration, batch_size, device):
        return merged, False
    return built.state(network), True


def _partial_report(
    spec: PermSpec, cut: tuple[int, frozenset[str]], stop_after: int | str, heads: str, merged: Mapping[str, Tensor]
) -> dict[str, Any]:
    depth, trunk = cut
    order = spec.group_order()
    branches = partial.num_branches(merged)
    trunk_numel = sum(t.numel() for k, t in merged.items() if not k.startswith(partial.PREFIX))
    branch_numel = sum(t.numel() for k, t in merged.items() if k.startswith(partial.PREFIX)) // max(branches, 1)
    return {
        "stop_after": stop_after,
        "depth": depth,
        "merged_groups": list(order[:depth]),
        "separate_groups": list(order[depth:]),
        "valid_depths": partial.valid_depths(spec),
        "branches": branches,
        "combine": partial.combine_for(heads),
        "layout": f"trunk entries under their own names, branch i's as '{partial.PREFIX}{{i}}.<name>'; the trunk "
        "plus one branch is a state dict of the input architecture",
        "trunk_elements": trunk_numel,
        "branch_elements": branch_numel,
        "size_vs_one_model": (trunk_numel + branches * branch_numel) / max(trunk_numel + branch_numel, 1),
    }
