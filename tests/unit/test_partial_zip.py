"""Partial zip (``stop_after``): a merged trunk up to a cut, every model's own branch after it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor

from mudsc_core import report_html
from mudsc_core.architectures import build_model, trace_architecture
from mudsc_core.errors import InvalidParameters
from mudsc_core.permutation import partial
from mudsc_core.permutation.merge import merge
from mudsc_core.permutation.permute import permute_state_dict, random_permutations
from mudsc_core.schema import ArchitectureSpec
from mudsc_core.schema.permutation_params import MudscParams

MLP: dict[str, Any] = {"name": "mlp", "config": {"input_dim": 12, "hidden": [16, 16, 16], "num_classes": 5}}
VGG: dict[str, Any] = {"name": "vgg", "config": {"in_channels": 1, "layers": [8, "M", 8, 16], "num_classes": 5}}
RESNET: dict[str, Any] = {"name": "resnet", "config": {"depth": 8, "width": 1, "num_classes": 5, "in_channels": 1}}


def _spec(arch: dict[str, Any]) -> Any:
    return trace_architecture(ArchitectureSpec.model_validate(arch)).spec


def _inputs(arch: dict[str, Any], n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if arch["name"] == "mlp":
        return torch.randn(n, arch["config"]["input_dim"], generator=g)
    return torch.randn(n, 1, 8, 8, generator=g)


def _model(arch: dict[str, Any], seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    model = build_model(ArchitectureSpec.model_validate(arch))
    model.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        model(_inputs(arch, 64, seed + 100))
    return {k: v.detach().clone() for k, v in model.eval().state_dict().items()}


def _logits(arch: dict[str, Any], state: dict[str, Tensor], x: Tensor) -> Tensor:
    model = build_model(ArchitectureSpec.model_validate(arch))
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x)


def test_valid_cuts_fall_between_residual_stages_and_anywhere_in_a_chain() -> None:
    assert partial.valid_depths(_spec(MLP)) == [1, 2, 3]
    spec = _spec(RESNET)
    depths = partial.valid_depths(spec)
    order = spec.group_order()
    assert depths[-1] == len(order)
    assert 1 not in depths  # the stem's stream is written again by the first stage's blocks
    for depth in depths:  # closed: nothing outside the trunk writes a merged group
        trunk = frozenset(order[:depth])
        for param in partial.trunk_parameters(spec, trunk):
            assert all(seg.group in trunk for axis in spec.axes[param] if axis for seg in axis)


@pytest.mark.parametrize("arch", [MLP, VGG, RESNET], ids=lambda a: a["name"])
def test_a_permuted_copy_comes_back_exactly_in_every_branch_at_every_cut(arch: dict[str, Any]) -> None:
    state = _model(arch, 0)
    spec = _spec(arch)
    permuted = permute_state_dict(spec, state, random_permutations(spec, torch.Generator().manual_seed(5)))
    x = _inputs(arch, 16, 7)
    expected = _logits(arch, state, x)
    for depth in partial.valid_depths(spec):
        result = merge(
            [state, permuted],
            arch,
            {
                "name": "git_rebasin",
                "params": {"stop_after": depth, "heads": "separate", "reset_bn": False, "max_sweeps": 2},
            },
        )
        branches = partial.branch_states(result.state_dict)
        assert len(branches) == 2
        for branch in branches:  # each branch is a complete model of the input architecture
            torch.testing.assert_close(_logits(arch, branch, x), expected, rtol=1e-5, atol=1e-5)
        combined = partial.partial_model(
            lambda: build_model(ArchitectureSpec.model_validate(arch)), result.state_dict, "separate"
        )
        with torch.no_grad():
            out = combined(x)
        torch.testing.assert_close(out, torch.cat([expected, expected], dim=1), rtol=1e-5, atol=1e-5)
        report = result.report["partial"]
        assert report["depth"] == depth and report["valid_depths"] == partial.valid_depths(spec)
        assert report["merged_groups"] == list(spec.group_order()[:depth])


def test_zip_of_two_models_shares_the_trunk_and_keeps_each_models_tail() -> None:
    arch = VGG
    states = [_model(arch, 1), _model(arch, 2)]
    calibration = _inputs(arch, 64, 3)
    spec = _spec(arch)
    depth = 1  # the trunk is the first conv; the second reads merged units, the third only its model's
    result = merge(states, arch, {"name": "zipit", "params": {"stop_after": depth, "heads": "separate"}}, calibration)
    merged = result.state_dict
    trunk = partial.trunk_parameters(spec, frozenset(spec.group_order()[:depth]))
    assert trunk and all(name in merged for name in trunk)
    # The last layer before the head is no trunk layer: every model keeps its own, unchanged where it reads
    # no merged units; the head's input follows the model's own units.
    tail = [p for p in spec.axes if p not in trunk]
    assert tail
    for i in range(2):
        for name in tail:
            assert merged[f"{partial.PREFIX}{i}.{name}"].shape == states[i][name].shape
    last_conv = [p for p in tail if p.endswith("weight") and states[0][p].ndim == 4][-1]
    for i in range(2):
        assert torch.equal(merged[f"{partial.PREFIX}{i}.{last_conv}"], states[i][last_conv])
    # BN reset on the branches gives the trunk one set of statistics (the branches' trunks are equal).
    assert result.report["bn_reset"] is True
    rebuilt = partial.join(partial.branch_states(merged), trunk)
    assert rebuilt.keys() == merged.keys()
    assert all(torch.equal(rebuilt[k], merged[k]) for k in merged)
    assert 1.0 < result.report["partial"]["size_vs_one_model"] < 2.0
    page, png = report_html.render(result.report)
    assert "<h2>Partial zip</h2>" in page and "branches.{i}" in page and png.startswith(b"\x89PNG")


def test_beta_auto_scores_the_partial_model() -> None:
    arch = MLP
    states = [_model(arch, 1), _model(arch, 2)]
    result = merge(
        states,
        arch,
        {"name": "mudsc", "params": {"mode": "zip", "beta": "auto", "stop_after": 2, "heads": "separate"}},
        _inputs(arch, 64, 4),
    )
    assert result.report["beta_search"]["chosen"] in [c["beta"] for c in result.report["beta_search"]["candidates"]]
    assert result.report["partial"]["depth"] == 2


@pytest.mark.parametrize(
    ("stop_after", "message"),
    [
        (1, "cuts inside a stream"),
        (99, "outside 1.."),
        ("no.such.group", "not a unit group"),
    ],
)
def test_invalid_cuts_fail_with_the_valid_ones_listed(stop_after: int | str, message: str) -> None:
    states = [_model(RESNET, 1), _model(RESNET, 2)]
    with pytest.raises(InvalidParameters, match=message) as raised:
        merge(states, RESNET, {"name": "git_rebasin", "params": {"stop_after": stop_after}})
    valid = partial.valid_depths(_spec(RESNET))
    assert f"{valid[0]} (" in str(raised.value)


def test_combinations_that_cannot_hold_a_partial_zip_are_refused() -> None:
    states = [_model(MLP, 1), _model(MLP, 2)]
    x = _inputs(MLP, 32, 3)
    with pytest.raises(InvalidParameters, match="repair"):
        merge(states, MLP, {"name": "zipit", "params": {"stop_after": 1, "repair": True}}, x)
    with pytest.raises(InvalidParameters, match="reduce"):
        merge(states, MLP, {"name": "zipit", "params": {"stop_after": 1, "reduce": 0.25}}, x)


@pytest.mark.parametrize("bad", [0, -1, "", 1.5, True])
def test_stop_after_is_validated_by_the_schema(bad: Any) -> None:
    with pytest.raises(ValidationError):
        MudscParams.model_validate({"stop_after": bad})
