"""Partial zip (ZipIt!): merge the unit groups up to a depth, keep the rest of every model separate.

The merged model is one shared trunk and N branches. The trunk is every parameter that writes a merged
unit group (the first ``depth`` groups in forward order), merged as usual. Everything else is each
model's own: its tensors stay as they are, except that the axes reading merged groups go through that
model's unmerge matrix (align: its permutation), so branch i reads the merged trunk's features in its
own units. The outputs of the branches are concatenated (``heads: "separate"``) or averaged
(``heads: "shared"``).

Layout of the merged state dict: trunk entries under their own names, branch entries as
``branches.{i}.{name}``. The trunk plus one branch is a complete state dict of the input architecture
(``branch_states``), so ``partial_model`` rebuilds the merged model from N ordinary networks.

A cut is valid only where the trunk is closed: no parameter may write a merged group from unmerged
ones (inside a residual stream every block writes the stream, so a cut falls between stages, not
inside one). ``valid_depths`` lists them; an invalid ``stop_after`` fails with the list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mudsc_core.errors import InvalidParameters
from mudsc_core.permutation.iteration import _map_param, _plan, build_merged_state
from mudsc_core.permutation.similarity import Correspondence
from mudsc_core.permutation.spec import PermSpec

PREFIX = "branches."


def trunk_parameters(spec: PermSpec, trunk: frozenset[str]) -> frozenset[str]:
    """The parameters that write a merged group (one of their out segments is in ``trunk``)."""
    return frozenset(
        param
        for param, axes in spec.axes.items()
        if any(seg.role == "out" and seg.group in trunk for axis in axes if axis for seg in axis)
    )


def _breaking_parameter(spec: PermSpec, trunk: frozenset[str]) -> str | None:
    """A parameter that writes a merged group and also touches an unmerged one (None: the cut is valid)."""
    for param in sorted(trunk_parameters(spec, trunk)):
        if any(seg.group not in trunk for axis in spec.axes[param] if axis for seg in axis):
            return param
    return None


def valid_depths(spec: PermSpec) -> list[int]:
    """Every depth k (the first k groups in forward order merged) at which the trunk is closed."""
    order = spec.group_order()
    return [k for k in range(1, len(order) + 1) if _breaking_parameter(spec, frozenset(order[:k])) is None]


def resolve(spec: PermSpec, stop_after: int | str) -> tuple[int, frozenset[str]]:
    """(depth, merged groups) for ``stop_after`` (a depth, or the name of the last merged group)."""
    order = spec.group_order()
    depths = valid_depths(spec)
    choices = ", ".join(f"{k} ({order[k - 1]!r})" for k in depths)
    if isinstance(stop_after, str):
        if stop_after not in order:
            raise InvalidParameters(
                f"stop_after {stop_after!r} is not a unit group of this model; valid cuts (depth and the last "
                f"merged group): {choices}"
            )
        depth = order.index(stop_after) + 1
    else:
        depth = stop_after
        if not 1 <= depth <= len(order):
            raise InvalidParameters(
                f"stop_after {depth} is outside 1..{len(order)} (the model has {len(order)} unit groups); valid "
                f"cuts: {choices}"
            )
    trunk = frozenset(order[:depth])
    breaking = _breaking_parameter(spec, trunk)
    if breaking is not None:
        raise InvalidParameters(
            f"stop_after {stop_after!r} cuts inside a stream: {breaking!r} would write merged units from "
            f"unmerged ones; valid cuts (depth and the last merged group): {choices}"
        )
    return depth, trunk


def check_widths(spec: PermSpec, trunk: frozenset[str], correspondences: Mapping[str, Correspondence]) -> None:
    """Every branch must stay a model of the input architecture: merged trunk groups keep their width."""
    for name in sorted(trunk):
        width = correspondences[name].width
        if width != spec.groups[name].size:
            raise InvalidParameters(
                f"partial zip keeps every branch an input-architecture model, but group {name!r} merged to "
                f"{width} units instead of {spec.groups[name].size}: leave reduce at its default (1 - 1/N)"
            )


def build_partial_state(
    states: Sequence[Mapping[str, Tensor]],
    spec: PermSpec,
    correspondences: Mapping[str, Correspondence],
    trunk: frozenset[str],
) -> dict[str, Tensor]:
    """The trunk merged (W* = sum_i M_i^T W_i U_i), every other tensor per model with its merged inputs."""
    check_widths(spec, trunk, correspondences)
    shared = trunk_parameters(spec, trunk)
    merged = build_merged_state(states, spec, correspondences, params=shared)
    num_models = len(states)
    for i, state in enumerate(states):
        for param in spec.axes:
            if param not in shared:
                plan = _plan(spec, param, i, num_models, correspondences, only=trunk)
                merged[f"{PREFIX}{i}.{param}"] = _map_param(state[param], plan).clone()
        for name in spec.excluded:
            if name in state:
                merged[f"{PREFIX}{i}.{name}"] = state[name].clone()
    return merged


def num_branches(state: Mapping[str, Tensor]) -> int:
    return 1 + max((int(k[len(PREFIX) :].split(".", 1)[0]) for k in state if k.startswith(PREFIX)), default=-1)


def branch_states(state: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
    """Per branch, a complete state dict of the input architecture: the trunk plus that branch's entries."""
    trunk = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    branches = []
    for i in range(num_branches(state)):
        prefix = f"{PREFIX}{i}."
        branches.append({**trunk, **{k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}})
    return branches


def join(branches: Sequence[Mapping[str, Tensor]], trunk: frozenset[str]) -> dict[str, Tensor]:
    """Inverse of :func:`branch_states`: trunk entries (``trunk``) from branch 0, the others prefixed."""
    joined = {k: v for k, v in branches[0].items() if k in trunk}
    for i, branch in enumerate(branches):
        joined.update({f"{PREFIX}{i}.{k}": v for k, v in branch.items() if k not in trunk})
    return joined


class PartialModel(nn.Module):
    """N branch networks sharing a trunk (equal trunk weights); outputs concatenated or averaged."""

    def __init__(self, branches: Sequence[nn.Module], combine: str) -> None:
        super().__init__()
        if combine not in ("concat", "mean"):
            raise ValueError(f"combine must be 'concat' or 'mean', got {combine!r}")
        self.branches = nn.ModuleList(branches)
        self.combine = combine

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        outputs = [branch(*args, **kwargs) for branch in self.branches]
        return torch.cat(outputs, dim=-1) if self.combine == "concat" else torch.stack(outputs).mean(dim=0)


def combine_for(heads: str) -> str:
    return "concat" if heads == "separate" else "mean"


def partial_model(build: Callable[[], nn.Module], state: Mapping[str, Tensor], heads: str) -> PartialModel:
    """The merged model of a partial zip: ``build()`` makes one input-architecture network per branch."""
    networks = []
    for branch in branch_states(state):
        network = build()
        network.load_state_dict(branch)
        networks.append(network.eval())
    return PartialModel(networks, combine_for(heads))
