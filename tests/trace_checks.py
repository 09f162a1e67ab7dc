"""Checks shared by the tracer's tests on Hugging Face models: where a parameter axis lands, and the
permuted-copy test (random permutations by the spec move the weights and leave the outputs unchanged)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mudsc_core.permutation.permute import permute_state_dict, random_permutations
from mudsc_core.permutation.spec import PermSpec, Segment
from mudsc_core.permutation.trace import TraceResult, self_check


def segments(spec: PermSpec, param: str, axis: int) -> tuple[Segment, ...]:
    found = spec.axes[param][axis]
    assert found is not None, f"{param}[{axis}] is pinned"
    return found


def group_of(spec: PermSpec, param: str, axis: int) -> str:
    (segment,) = segments(spec, param, axis)
    return segment.group


def pin_reasons(result: TraceResult, label: str) -> tuple[str, ...]:
    """The reasons the report gives for the pinned space labelled ``param[axis]``."""
    pinned = {g.name: g for g in result.pinned_groups}
    assert label in pinned, f"{label} is not a pinned space of the report: {sorted(pinned)}"
    return pinned[label].reasons


def outputs(model: nn.Module, inputs: Mapping[str, Tensor]) -> list[Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, Tensor):
        return [out]
    return [v for v in out.values() if isinstance(v, Tensor)]


def assert_check_passes(model: nn.Module, spec: PermSpec, inputs: Mapping[str, Tensor]) -> float:
    error = self_check(model, spec, inputs)
    assert error < 1e-4
    return error


def assert_permuted_copy_agrees(
    model: nn.Module, spec: PermSpec, inputs: Mapping[str, Tensor], seed: int = 3
) -> dict[str, Tensor]:
    """A copy permuted by random permutations of every free group gives the same outputs (1e-4 relative).

    Returns the permuted state dict.
    """
    expected = outputs(model, inputs)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moved = permute_state_dict(spec, state, random_permutations(spec, torch.Generator().manual_seed(seed)))
    assert any(not torch.equal(moved[k], state[k]) for k in state)  # the weights did move
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(moved)
    for a, b in zip(expected, outputs(permuted, inputs), strict=True):
        scale = float(a.abs().max()) if a.numel() else 1.0
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * scale)
    return moved
