"""REPAIR (Jordan et al., 2022, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair").

Averaging aligned units shrinks their activations' spread (variance collapse), most where the models
disagree; BatchNorm re-estimation undoes it for networks with BatchNorm, nothing does for LayerNorm
transformers or plain MLPs. REPAIR rescales every merged unit so that its pre-activation mean and standard
deviation over the calibration inputs equal the interpolation of its constituents' in the input models:

    target_j = sum_i (M_i^T stat_i)_j        (the same interpolation the merge applies to the weights)
    W*_j <- W*_j * t_j,  b*_j <- (b*_j - mu*_j) * t_j + mu_target_j,  t_j = sigma_target_j / sigma*_j

A group is repaired where one Linear/Conv (or GPT-2's ``Conv1D``) produces all its units (its weight and bias are the group's only
"out" entries, over the whole axis): the producer's output is the pre-activation the correction folds into.
Groups of a residual stream (many producers summed), fused q/k/v segments and heads tied to rotary tables
are left alone and listed as skipped. Groups are repaired in forward order, each measured on the merged
model with the earlier corrections in place, as the paper's one-pass BatchNorm-style reset does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mudsc_core.permutation.similarity import Batch, HookTaps, _site_features
from mudsc_core.permutation.spec import ActivationSite, PermSpec, UnitGroup

_EPS = 1e-8


@dataclass(frozen=True)
class Producer:
    module: str
    weight: str
    bias: str | None
    unit_dim: int  # of the module's output: -1 for Linear, 1 for Conv (channels first)
    weight_axis: int = 0  # the weight's output axis: 1 for transformers' Conv1D (GPT-2: weight (in, out))


@dataclass
class RepairReport:
    """Per repaired group, the merged units' mean std ratio to the target before its correction (1: no
    variance collapse) and after all corrections, and why the other groups were left alone."""

    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"groups": self.groups, "skipped": self.skipped}


def producers(spec: PermSpec, modules: Mapping[str, nn.Module]) -> tuple[dict[str, Producer], dict[str, str]]:
    """The single producing Linear/Conv of each group that has one; why the others have none."""
    outs: dict[str, list[tuple[str, int, bool]]] = {g: [] for g in spec.groups}
    for param, axes in spec.axes.items():
        for axis, segments in enumerate(axes):
            for seg in segments or ():
                if seg.role == "out":
                    outs[seg.group].append((param, axis, len(segments or ()) == 1 and seg.expand == 1))
    found: dict[str, Producer] = {}
    skipped: dict[str, str] = {}
    for name, group in spec.groups.items():
        reason = _why_not(group, outs[name], modules)
        if reason is not None:
            skipped[name] = reason
            continue
        weight = next(p for p, _, _ in outs[name] if p.endswith(".weight"))
        module_name = weight[: -len(".weight")]
        bias = next((p for p, _, _ in outs[name] if p == module_name + ".bias"), None)
        module = modules[module_name]
        unit_dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
        found[name] = Producer(module_name, weight, bias, unit_dim, _weight_axis(module))
    return found, skipped


def _why_not(group: UnitGroup, outs: list[tuple[str, int, bool]], modules: Mapping[str, nn.Module]) -> str | None:
    if group.whole_blocks:
        return "dims fixed by rotary tables"
    weights = [p for p, _, _ in outs if p.endswith(".weight")]
    if len(weights) != 1:
        return f"{len(weights)} producing weights (a residual stream or a fused axis)"
    module_name = weights[0][: -len(".weight")]
    module = modules.get(module_name)
    if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and not _is_conv1d(module):
        return f"produced by {type(module).__name__}, not a Linear/Conv"
    if any(p not in (weights[0], module_name + ".bias") for p, _, _ in outs):
        return "other entries carry its units as outputs"
    assert module is not None
    weight_axis = _weight_axis(module)
    if not all(whole and axis == (weight_axis if p == weights[0] else 0) for p, axis, whole in outs):
        return "its units fill only part of the producer's output axis"
    return None


def _is_conv1d(module: nn.Module | None) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear with its weight stored (in, out); not imported here."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _weight_axis(module: nn.Module) -> int:
    return 1 if _is_conv1d(module) else 0


def _moments(
    model: nn.Module, spec: PermSpec, sites: Mapping[str, ActivationSite], batches: Iterable[Batch]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per group, the (mean, std) of its producer's outputs over the batches (padding excluded)."""
    taps = HookTaps(model, _with_sites(spec, sites), list(sites))
    sums: dict[str, list[Tensor]] = {}
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                for g, tensor in taps(batch).items():
                    x = _site_features(sites[g], tensor, mask).to(torch.float64)
                    acc = sums.setdefault(g, [torch.zeros(x.shape[0], dtype=torch.float64) for _ in range(3)])
                    acc[0] += x.shape[1]
                    acc[1] += x.sum(dim=1)
                    acc[2] += (x * x).sum(dim=1)
    finally:
        taps.close()
    moments = {}
    for g, (count, total, squares) in sums.items():
        mean = total / count.clamp_min(1)
        var = (squares / count.clamp_min(1) - mean * mean).clamp_min(0)
        moments[g] = (mean, var.sqrt())
    return moments


def _with_sites(spec: PermSpec, sites: Mapping[str, ActivationSite]) -> PermSpec:
    groups = {g: UnitGroup(g, spec.groups[g].size, site) for g, site in sites.items()}
    return PermSpec(groups=groups, axes={})


def repair(
    merged: Mapping[str, Tensor],
    networks: Sequence[nn.Module],
    spec: PermSpec,
    merge_matrices: Mapping[str, Sequence[Tensor]],
    build: Callable[[Mapping[str, Tensor]], nn.Module],
    batches: Callable[[], Iterable[Batch]],
) -> tuple[dict[str, Tensor], RepairReport]:
    """The merged state with every repairable group's pre-activation statistics set to the interpolated ones.

    ``networks``: the input models (eval mode); ``merge_matrices[g]``: per model the (n, m) matrix M_i of the
    merge (W* = sum_i M_i^T W_i); ``build(state)``: a network in eval mode holding ``state``; ``batches()``: a
    fresh iterator over the calibration batches.
    """
    report = RepairReport()
    found, report.skipped = producers(spec, dict(networks[0].named_modules()))
    order = [g for g in spec.group_order() if g in found]
    if not order:
        return dict(merged), report
    sites = {g: ActivationSite(found[g].module, "output", found[g].unit_dim) for g in order}
    per_model = [_moments(network, spec, sites, batches()) for network in networks]
    targets = {}
    for g in order:
        matrices = [m.to(torch.float64).cpu() for m in merge_matrices[g]]
        mean = torch.stack([m.T @ stats[g][0] for m, stats in zip(matrices, per_model)]).sum(dim=0)
        std = torch.stack([m.T @ stats[g][1] for m, stats in zip(matrices, per_model)]).sum(dim=0)
        targets[g] = (mean, std)
    state = {k: v.clone() for k, v in merged.items()}
    for g in order:
        producer = found[g]
        (mean, std), (target_mean, target_std) = _moments(build(state), spec, {g: sites[g]}, batches())[g], targets[g]
        scale = torch.where(std > _EPS, target_std / std.clamp_min(_EPS), torch.ones_like(std))
        weight = state[producer.weight]
        shape = tuple(-1 if axis == producer.weight_axis else 1 for axis in range(weight.ndim))
        state[producer.weight] = (weight.to(torch.float64) * scale.view(shape)).to(weight.dtype)
        if producer.bias is not None:
            bias = state[producer.bias].to(torch.float64)
            state[producer.bias] = ((bias - mean) * scale + target_mean).to(weight.dtype)
        report.groups[g] = {
            "std_ratio_before": _ratio(std, target_std),
            "units_rescaled": int((std > _EPS).sum()),
            "mean_shifted": producer.bias is not None,
        }
    after = _moments(build(state), spec, sites, batches())
    for g in order:
        report.groups[g]["std_ratio_after"] = _ratio(after[g][1], targets[g][1])
    return state, report


def _ratio(std: Tensor, target: Tensor) -> float:
    """Mean over units of the merged std over the target std (1: no collapse)."""
    ratio = (std / target.clamp_min(_EPS))[target > _EPS]
    return round(float(ratio.mean()), 6) if ratio.numel() else 1.0
