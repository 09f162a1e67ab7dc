"""REPAIR (Jordan et al., 2022, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair").

Averaging aligned units shrinks their activations' spread (variance collapse), most where the models
disagree; BatchNorm re-estimation undoes it for networks with BatchNorm, nothing does for LayerNorm
transformers or plain MLPs. REPAIR rescales every merged unit so that its pre-activation mean and standard
deviation over the calibration inputs equal the interpolation of its constituents' in the input models:

    target_j = sum_i (M_i^T stat_i)_j        (the same interpolation the merge applies to the weights)
    W*_j <- W*_j * t_j,  b*_j <- (b*_j - mu*_j) * t_j + mu_target_j,  t_j = sigma_target_j / sigma*_j

Every module that produces a group's units and can take the correction is a repair site: a Linear, a Conv,
GPT-2's ``Conv1D`` or a LayerNorm whose output axis carries the group (its weight's output axis and its bias list
only "out" segments), one site per segment of that axis (a fused qkv projection gives a q, a k and a v site).
A LayerNorm's output ``w * x_hat + b`` takes the same fold as a Linear's. So besides the groups with one
producing Linear (an MLP's hidden units), a transformer's residual stream is repaired at every projection
that writes into it and at every LayerNorm that reads or (post-LN) makes it, and q and k at each projection:
averaging shrinks both, and with them the attention logits' scale. Groups that carry BatchNorm statistics are
left to the BatchNorm reset; heads tied to rotary tables and segments repeated for grouped-query attention
are left alone and listed as skipped. Sites are repaired in forward order (the order the input model calls
their modules), each module measured on the merged model with the earlier corrections in place, as the
paper's one-pass BatchNorm-style reset does: one calibration pass per site module.
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
    """One repair site: units ``start:stop`` of ``module``'s output (its weight rows, bias entries) are a group's."""

    module: str
    weight: str
    bias: str | None
    unit_dim: int  # of the module's output: -1 for Linear/LayerNorm, 1 for Conv and GroupNorm (channels first)
    weight_axis: int = 0  # the weight's output axis: 1 for transformers' Conv1D (GPT-2: weight (in, out))
    start: int = 0
    stop: int | None = None  # None: the whole output axis

    @property
    def label(self) -> str:
        return self.module if self.stop is None else f"{self.module}[{self.start}:{self.stop}]"


@dataclass
class RepairReport:
    """Per repaired group, the merged units' mean std ratio to the target before their correction (1: no
    variance collapse) and after all corrections (means over the group's sites), the sites, and why the other
    groups were left alone."""

    groups: dict[str, dict[str, object]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"groups": self.groups, "skipped": self.skipped}


def _is_conv1d(module: nn.Module | None) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear with its weight stored (in, out); not imported here."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _weight_axis(module: nn.Module) -> int:
    return 1 if _is_conv1d(module) else 0


def _unit_dim(module: nn.Module) -> int | None:
    """The unit axis of the module's output where the correction can fold into its weight and bias; None: not a
    repair site (no per-unit affine output)."""
    if isinstance(module, (nn.modules.conv._ConvNd, nn.GroupNorm)):
        return 1
    if isinstance(module, nn.Linear) or _is_conv1d(module):
        return -1
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return -1
    return None


def producers(spec: PermSpec, modules: Mapping[str, nn.Module]) -> tuple[dict[str, list[Producer]], dict[str, str]]:
    """The repair sites of each group that has one (in the spec's entry order); why the others have none."""
    found: dict[str, list[Producer]] = {g: [] for g in spec.groups}
    batchnorm: set[str] = set()
    repeated: set[str] = set()
    for param, axes in spec.axes.items():
        module_name, _, kind = param.rpartition(".")
        module = modules.get(module_name)
        for segments in axes:
            for seg in segments or ():
                if seg.role == "out" and isinstance(module, nn.modules.batchnorm._BatchNorm):
                    batchnorm.add(seg.group)
        if kind != "weight" or module is None or (unit_dim := _unit_dim(module)) is None:
            continue
        weight_axis = _weight_axis(module)
        out = axes[weight_axis] if weight_axis < len(axes) else None
        if not out or any(seg.role != "out" for seg in out):
            continue
        bias = module_name + ".bias" if module_name + ".bias" in spec.axes else None
        if bias is not None and spec.axes[bias][0] != out:
            continue
        start = 0
        for seg in out:
            if seg.expand != 1:
                repeated.add(seg.group)
            else:
                whole = len(out) == 1
                found[seg.group].append(
                    Producer(
                        module_name,
                        param,
                        bias,
                        unit_dim,
                        weight_axis,
                        start if not whole else 0,
                        start + seg.length if not whole else None,
                    )
                )
            start += seg.length
    skipped: dict[str, str] = {}
    for name, group in spec.groups.items():
        reason = None
        if group.whole_blocks:
            reason = "dims fixed by rotary tables"
        elif name in batchnorm:
            reason = "BatchNorm statistics carry its units (re-estimated by reset_bn)"
        elif not found[name]:
            reason = (
                "repeated per block (grouped-query attention)"
                if name in repeated
                else "no Linear/Conv/LayerNorm/GroupNorm produces its units"
            )
        if reason is not None:
            skipped[name] = reason
            del found[name]
    return {g: sites for g, sites in found.items() if sites}, skipped


def _call_order(network: nn.Module, names: Sequence[str], batch: Batch) -> dict[str, int]:
    """The position of each module's first call in a forward pass over ``batch`` (modules not called: absent)."""
    order: dict[str, int] = {}
    handles = []
    for name in names:

        def hook(module: nn.Module, args: tuple[object, ...], output: object, name: str = name) -> None:
            order.setdefault(name, len(order))

        handles.append(network.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            if isinstance(batch, Mapping):
                network(**batch)
            else:
                network(batch)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _moments(model: nn.Module, sites: Sequence[Producer], batches: Iterable[Batch]) -> list[tuple[Tensor, Tensor]]:
    """Per site, the (mean, std) of its units in the module's output over the batches (padding excluded)."""
    observed = {site.module: ActivationSite(site.module, "output", site.unit_dim) for site in sites}
    spec = PermSpec(groups={m: UnitGroup(m, 1, observed[m]) for m in observed}, axes={})
    taps = HookTaps(model, spec, list(observed))
    sums: list[list[Tensor]] = [[torch.zeros((), dtype=torch.float64) for _ in range(3)] for _ in sites]
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                captured = taps(batch)
                features = {m: _site_features(observed[m], tensor, mask) for m, tensor in captured.items()}
                for acc, site in zip(sums, sites, strict=True):
                    x = features[site.module][site.start : site.stop].to(torch.float64)  # (units, samples)
                    acc[0] = acc[0] + x.shape[1]
                    acc[1] = acc[1] + x.sum(dim=1)
                    acc[2] = acc[2] + (x * x).sum(dim=1)
    finally:
        taps.close()
    moments = []
    for count, total, squares in sums:
        mean = total / count.clamp_min(1)
        var = (squares / count.clamp_min(1) - mean * mean).clamp_min(0)
        moments.append((mean, var.sqrt()))
    return moments


def repair(
    merged: Mapping[str, Tensor],
    networks: Sequence[nn.Module],
    spec: PermSpec,
    merge_matrices: Mapping[str, Sequence[Tensor]],
    build: Callable[[Mapping[str, Tensor]], nn.Module],
    batches: Callable[[], Iterable[Batch]],
) -> tuple[dict[str, Tensor], RepairReport]:
    """The merged state with every repair site's output statistics set to the interpolated ones.

    ``networks``: the input models (eval mode); ``merge_matrices[g]``: per model the (n, m) matrix M_i of the
    merge (W* = sum_i M_i^T W_i); ``build(state)``: a network in eval mode holding ``state``; ``batches()``: a
    fresh iterator over the calibration batches.
    """
    report = RepairReport()
    found, report.skipped = producers(spec, dict(networks[0].named_modules()))
    first = next(iter(batches()), None)
    called = (
        {} if first is None else _call_order(networks[0], sorted({p.module for s in found.values() for p in s}), first)
    )
    for group, group_sites in list(found.items()):
        if not any(site.module in called for site in group_sites):
            report.skipped[group] = "its producing modules are not called by the forward pass"
    sites = sorted(
        ((g, site) for g, group_sites in found.items() for site in group_sites if site.module in called),
        key=lambda item: (called[item[1].module], item[1].start),
    )
    if not sites:
        return dict(merged), report
    per_model = [_moments(network, [site for _, site in sites], batches()) for network in networks]
    targets = []
    for position, (g, _) in enumerate(sites):
        matrices = [m.to(torch.float64).cpu() for m in merge_matrices[g]]
        mean = torch.stack([m.T @ stats[position][0] for m, stats in zip(matrices, per_model)]).sum(dim=0)
        std = torch.stack([m.T @ stats[position][1] for m, stats in zip(matrices, per_model)]).sum(dim=0)
        targets.append((mean, std))
    state = {k: v.clone() for k, v in merged.items()}
    before: list[tuple[Tensor, bool]] = []
    position = 0
    while position < len(sites):  # one pass per module: its sites (segments) do not affect each other
        module = sites[position][1].module
        stop = position
        while stop < len(sites) and sites[stop][1].module == module:
            stop += 1
        measured = _moments(build(state), [site for _, site in sites[position:stop]], batches())
        for (_, site), (mean, std), (target_mean, target_std) in zip(
            sites[position:stop], measured, targets[position:stop], strict=True
        ):
            scale = torch.where(std > _EPS, target_std / std.clamp_min(_EPS), torch.ones_like(std))
            _fold(state, site, scale, mean, target_mean)
            before.append((std, site.bias is not None))
        position = stop
    after = _moments(build(state), [site for _, site in sites], batches())
    for g in dict.fromkeys(g for g, _ in sites):
        at = [i for i, (group, _) in enumerate(sites) if group == g]
        report.groups[g] = {
            "std_ratio_before": _mean(_ratio(before[i][0], targets[i][1]) for i in at),
            "std_ratio_after": _mean(_ratio(after[i][1], targets[i][1]) for i in at),
            "units_rescaled": int(sum(int((before[i][0] > _EPS).sum()) for i in at)),
            "mean_shifted": all(before[i][1] for i in at),
            "sites": [sites[i][1].label for i in at],
        }
    return state, report


def _fold(state: dict[str, Tensor], site: Producer, scale: Tensor, mean: Tensor, target_mean: Tensor) -> None:
    """y <- (y - mean) * scale + target_mean on the site's units, folded into its weight rows and bias."""
    weight = state[site.weight]
    stop = weight.shape[site.weight_axis] if site.stop is None else site.stop
    shape = tuple(-1 if axis == site.weight_axis else 1 for axis in range(weight.ndim))
    rescaled = weight.to(torch.float64)  # a copy: the merged state's tensors are not written in place
    rescaled.narrow(site.weight_axis, site.start, stop - site.start).mul_(scale.view(shape))
    state[site.weight] = rescaled.to(weight.dtype)
    if site.bias is not None:
        bias = state[site.bias].to(torch.float64)
        bias[site.start : stop] = (bias[site.start : stop] - mean) * scale + target_mean
        state[site.bias] = bias.to(weight.dtype)


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return round(sum(items) / max(len(items), 1), 6)


def _ratio(std: Tensor, target: Tensor) -> float:
    """Mean over units of the merged std over the target std (1: no collapse)."""
    ratio = (std / target.clamp_min(_EPS))[target > _EPS]
    return round(float(ratio.mean()), 6) if ratio.numel() else 1.0
