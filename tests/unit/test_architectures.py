"""Architectures and their permutation specs: a correct spec leaves outputs unchanged under any
random permutation of its groups, and names every state-dict entry."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import Tensor, nn

from mudsc_core.architectures import build_model, check_checkpoint, oracle_spec, perm_spec
from mudsc_core.errors import ArchitectureMismatch
from mudsc_core.permutation.permute import axis_index, permute_state_dict, random_permutations
from mudsc_core.schema import ArchitectureSpec

# name -> (architecture dict, input shape of one sample)
CONFIGS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "mlp": ({"name": "mlp", "config": {"input_dim": 64, "hidden": [32, 32], "num_classes": 10}}, (1, 8, 8)),
    "vgg": (
        {"name": "vgg", "config": {"in_channels": 1, "layers": [8, "M", 12, 12, "M"], "num_classes": 10}},
        (1, 8, 8),
    ),
    "vgg-nobn": ({"name": "vgg", "config": {"in_channels": 3, "layers": [6, "M", 10], "batch_norm": False}}, (3, 8, 8)),
    "resnet8-bn": ({"name": "resnet", "config": {"depth": 8, "width": 1, "in_channels": 1}}, (1, 8, 8)),
    "resnet14-bn": ({"name": "resnet", "config": {"depth": 14, "width": 1, "in_channels": 1}}, (1, 8, 8)),
    "resnet8-gn": (
        {"name": "resnet", "config": {"depth": 8, "width": 1, "norm": "group", "groups": 4, "in_channels": 1}},
        (1, 8, 8),
    ),
    "resnet14-gn": (
        {"name": "resnet", "config": {"depth": 14, "width": 1, "norm": "group", "groups": 2, "in_channels": 3}},
        (3, 8, 8),
    ),
    "vit": (
        {
            "name": "vit",
            "config": {
                "image_size": 8,
                "patch_size": 4,
                "in_channels": 1,
                "embed_dim": 16,
                "depth": 2,
                "num_heads": 2,
                "mlp_ratio": 2.0,
            },
        },
        (1, 8, 8),
    ),
}


def _nontrivial_state(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """Default init plus noise; BN statistics and norm scales moved off their trivial values."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in model.state_dict().items():
        if not value.is_floating_point():
            state[name] = value.clone()
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(value.shape, generator=gen)
        else:
            state[name] = value + 0.2 * torch.randn(value.shape, generator=gen)
    return state


@cache
def _fixture(key: str) -> tuple[nn.Module, dict[str, Tensor], Tensor]:
    arch, sample = CONFIGS[key]
    torch.manual_seed(0)
    model = build_model(arch).eval()
    state = _nontrivial_state(model, 1)
    inputs = torch.randn((5, *sample), generator=torch.Generator().manual_seed(2))
    return model, state, inputs


def _outputs(model: nn.Module, state: dict[str, Tensor], inputs: Tensor) -> Tensor:
    model.load_state_dict(state)
    with torch.no_grad():
        return model(inputs)


@pytest.mark.parametrize("key", sorted(CONFIGS))
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_random_permutation_leaves_outputs_unchanged(key: str, seed: int) -> None:
    model, state, inputs = _fixture(key)
    spec = perm_spec(CONFIGS[key][0])
    perms = random_permutations(spec, torch.Generator().manual_seed(seed))
    permuted = permute_state_dict(spec, state, perms)
    expected = _outputs(model, state, inputs)
    torch.testing.assert_close(_outputs(model, permuted, inputs), expected, atol=1e-4, rtol=1e-4)
    # The permutation really moved something (else the test proves nothing).
    assert any(not torch.equal(permuted[k], state[k]) for k in spec.axes)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_activation_sites_carry_the_group_units(key: str) -> None:
    """At every activation site, the permuted model's tensor is the original's gathered by the group's
    permutation along unit_dim (inside each declared segment)."""
    model, state, inputs = _fixture(key)
    spec = perm_spec(CONFIGS[key][0])
    perms = random_permutations(spec, torch.Generator().manual_seed(7))
    permuted = permute_state_dict(spec, state, perms)

    def capture(weights: dict[str, Tensor]) -> dict[str, Tensor]:
        seen: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        handles = []
        for name, group in spec.groups.items():
            site = group.activation
            assert site is not None, name
            assert site.module in modules, f"{name}: no module {site.module!r}"

            def hook(
                _m: nn.Module, args: tuple[Tensor, ...], out: Tensor, *, name: str = name, io: str = site.io
            ) -> None:
                seen[name] = (args[0] if io == "input" else out).detach().clone()

            handles.append(modules[site.module].register_forward_hook(hook))
        _outputs(model, weights, inputs)
        for h in handles:
            h.remove()
        return seen

    before, after = capture(state), capture(permuted)
    for name, group in spec.groups.items():
        site = group.activation
        assert site is not None
        dim = site.unit_dim
        for start, stop in site.segments or ((0, before[name].shape[dim]),):
            assert stop - start == group.size, name
            original = before[name].narrow(dim, start, stop - start)
            moved = after[name].narrow(dim, start, stop - start)
            # Permuted channels change the order of a conv's float32 sums: the error scales with the tensor's
            # size, not with each entry's own value (1.2e-4 on one entry of the untrained BatchNorm ResNet-14,
            # whose activations reach 3e4, on an AMD EPYC); a wrong permutation would be off by O(scale).
            scale = float(original.abs().max())
            torch.testing.assert_close(
                moved, original.index_select(dim, perms[name]), atol=max(1e-4, 2e-5 * scale), rtol=1e-4
            )


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_spec_covers_state_dict_exactly(key: str) -> None:
    model, state, _ = _fixture(key)
    spec = perm_spec(CONFIGS[key][0])
    spec.check()
    assert set(state) == set(spec.axes) | (set(spec.excluded) & set(state))
    assert set(spec.excluded) <= set(state)
    assert all(k.endswith("num_batches_tracked") for k in spec.excluded)
    assert set(spec.group_order()) == set(spec.groups)
    head = spec.head_params
    assert len(head) == 2 and all(spec.axes[p][0] is None for p in head)
    check_checkpoint(CONFIGS[key][0], state)
    for param, axes in spec.axes.items():  # every unit axis has the group's size
        for axis, axis_spec in enumerate(axes):
            if axis_spec is not None:
                assert state[param].shape[axis] == sum(s.length for s in axis_spec), (param, axis)


@pytest.mark.parametrize("key", ["mlp", "resnet8-bn", "vit"])
def test_check_checkpoint_rejects_bad_state(key: str) -> None:
    arch = CONFIGS[key][0]
    _, state, _ = _fixture(key)
    victim = next(iter(perm_spec(arch).axes))

    missing = {k: v for k, v in state.items() if k != victim}
    with pytest.raises(ArchitectureMismatch, match=victim):
        check_checkpoint(arch, missing)

    with pytest.raises(ArchitectureMismatch, match="stowaway.weight"):
        check_checkpoint(arch, {**state, "stowaway.weight": torch.zeros(3)})

    # a unit axis of the wrong size: caught by the spec
    grown = {**state, victim: torch.zeros(state[victim].shape[0] + 1, *state[victim].shape[1:])}
    with pytest.raises(ArchitectureMismatch, match=victim):
        check_checkpoint(arch, grown)

    # a non-unit axis of the wrong size (the label space): caught by the exact shape check
    head_w = perm_spec(arch).head_params[0]
    wrong_head = {**state, head_w: torch.zeros(state[head_w].shape[0] + 2, state[head_w].shape[1])}
    with pytest.raises(ArchitectureMismatch, match=rf"{head_w}.*\[12, .*\[10, "):
        check_checkpoint(arch, wrong_head)


def test_check_checkpoint_allows_missing_step_counter() -> None:
    arch = CONFIGS["resnet8-bn"][0]
    _, state, _ = _fixture("resnet8-bn")
    check_checkpoint(arch, {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})


_RESNET20_KEYS = """
    conv1.weight
    bn1.weight bn1.bias bn1.running_mean bn1.running_var bn1.num_batches_tracked
    layer1.0.conv1.weight
    layer1.0.bn1.weight layer1.0.bn1.bias layer1.0.bn1.running_mean layer1.0.bn1.running_var layer1.0.bn1.num_batches_tracked
    layer1.0.conv2.weight
    layer1.0.bn2.weight layer1.0.bn2.bias layer1.0.bn2.running_mean layer1.0.bn2.running_var layer1.0.bn2.num_batches_tracked
    layer1.1.conv1.weight
    layer1.1.bn1.weight layer1.1.bn1.bias layer1.1.bn1.running_mean layer1.1.bn1.running_var layer1.1.bn1.num_batches_tracked
    layer1.1.conv2.weight
    layer1.1.bn2.weight layer1.1.bn2.bias layer1.1.bn2.running_mean layer1.1.bn2.running_var layer1.1.bn2.num_batches_tracked
    layer1.2.conv1.weight
    layer1.2.bn1.weight layer1.2.bn1.bias layer1.2.bn1.running_mean layer1.2.bn1.running_var layer1.2.bn1.num_batches_tracked
    layer1.2.conv2.weight
    layer1.2.bn2.weight layer1.2.bn2.bias layer1.2.bn2.running_mean layer1.2.bn2.running_var layer1.2.bn2.num_batches_tracked
    layer2.0.conv1.weight
    layer2.0.bn1.weight layer2.0.bn1.bias layer2.0.bn1.running_mean layer2.0.bn1.running_var layer2.0.bn1.num_batches_tracked
    layer2.0.conv2.weight
    layer2.0.bn2.weight layer2.0.bn2.bias layer2.0.bn2.running_mean layer2.0.bn2.running_var layer2.0.bn2.num_batches_tracked
    layer2.0.shortcut.0.weight
    layer2.0.shortcut.1.weight layer2.0.shortcut.1.bias layer2.0.shortcut.1.running_mean layer2.0.shortcut.1.running_var layer2.0.shortcut.1.num_batches_tracked
    layer2.1.conv1.weight
    layer2.1.bn1.weight layer2.1.bn1.bias layer2.1.bn1.running_mean layer2.1.bn1.running_var layer2.1.bn1.num_batches_tracked
    layer2.1.conv2.weight
    layer2.1.bn2.weight layer2.1.bn2.bias layer2.1.bn2.running_mean layer2.1.bn2.running_var layer2.1.bn2.num_batches_tracked
    layer2.2.conv1.weight
    layer2.2.bn1.weight layer2.2.bn1.bias layer2.2.bn1.running_mean layer2.2.bn1.running_var layer2.2.bn1.num_batches_tracked
    layer2.2.conv2.weight
    layer2.2.bn2.weight layer2.2.bn2.bias layer2.2.bn2.running_mean layer2.2.bn2.running_var layer2.2.bn2.num_batches_tracked
    layer3.0.conv1.weight
    layer3.0.bn1.weight layer3.0.bn1.bias layer3.0.bn1.running_mean layer3.0.bn1.running_var layer3.0.bn1.num_batches_tracked
    layer3.0.conv2.weight
    layer3.0.bn2.weight layer3.0.bn2.bias layer3.0.bn2.running_mean layer3.0.bn2.running_var layer3.0.bn2.num_batches_tracked
    layer3.0.shortcut.0.weight
    layer3.0.shortcut.1.weight layer3.0.shortcut.1.bias layer3.0.shortcut.1.running_mean layer3.0.shortcut.1.running_var layer3.0.shortcut.1.num_batches_tracked
    layer3.1.conv1.weight
    layer3.1.bn1.weight layer3.1.bn1.bias layer3.1.bn1.running_mean layer3.1.bn1.running_var layer3.1.bn1.num_batches_tracked
    layer3.1.conv2.weight
    layer3.1.bn2.weight layer3.1.bn2.bias layer3.1.bn2.running_mean layer3.1.bn2.running_var layer3.1.bn2.num_batches_tracked
    layer3.2.conv1.weight
    layer3.2.bn1.weight layer3.2.bn1.bias layer3.2.bn1.running_mean layer3.2.bn1.running_var layer3.2.bn1.num_batches_tracked
    layer3.2.conv2.weight
    layer3.2.bn2.weight layer3.2.bn2.bias layer3.2.bn2.running_mean layer3.2.bn2.running_var layer3.2.bn2.num_batches_tracked
    linear.weight linear.bias
"""


def test_resnet20_parameter_names_match_public_ports() -> None:
    arch = {"name": "resnet", "config": {"depth": 20, "width": 1}}
    state = build_model(arch).state_dict()
    assert set(state) == set(_RESNET20_KEYS.split())
    assert len(_RESNET20_KEYS.split()) == 128
    assert state["conv1.weight"].shape == (16, 3, 3, 3)
    assert state["layer2.0.shortcut.0.weight"].shape == (32, 16, 1, 1)
    assert state["linear.weight"].shape == (10, 64)
    spec = oracle_spec(arch)  # the hand-written spec; the traced one equals it up to names (test_trace.py)
    assert [g for g in spec.group_order() if "inner" not in g] == ["layer1", "layer2", "layer3"]
    assert len(spec.groups) == 3 + 9


def test_resnet_group_norm_blocks() -> None:
    spec = perm_spec({"name": "resnet", "config": {"depth": 8, "width": 2, "norm": "group", "groups": 8}})
    assert {g.num_blocks for g in spec.groups.values()} == {8}
    spec_bn = perm_spec({"name": "resnet", "config": {"depth": 8, "width": 2}})
    assert {g.num_blocks for g in spec_bn.groups.values()} == {1}


def test_vit_spec_structure() -> None:
    arch = CONFIGS["vit"][0]
    spec = oracle_spec(arch)  # the hand-written spec; the traced one equals it up to names (test_trace.py)
    assert spec.groups["blocks.0.attn.qk"].num_blocks == 2
    assert spec.groups["blocks.1.attn.v"].block_tie == "blocks.1.attn.qk"
    rows = spec.axes["blocks.0.attn.qkv.weight"][0]
    assert rows is not None and [s.group for s in rows] == ["blocks.0.attn.qk"] * 2 + ["blocks.0.attn.v"]
    state = build_model(arch).state_dict()
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight"} <= set(state)
    assert state["pos_embed"].shape == (1, 5, 16)
    # the qk rows of a head move together: q row r and k row r get the same source row
    perms = random_permutations(spec, torch.Generator().manual_seed(0))
    index = axis_index(spec, "blocks.0.attn.qkv.weight", 0, perms)
    assert index is not None
    torch.testing.assert_close(index[16:32] - 16, index[:16])


def test_build_model_accepts_spec_object_and_dict() -> None:
    arch = ArchitectureSpec(name="mlp", config={"input_dim": 4, "hidden": [3], "num_classes": 2})
    a, b = build_model(arch), build_model(arch.model_dump())
    assert set(a.state_dict()) == set(b.state_dict()) == {"fc0.weight", "fc0.bias", "head.weight", "head.bias"}
    assert next(a.parameters()).device.type == "cpu"
    assert perm_spec(arch).group_order() == ("fc0",)


@pytest.mark.parametrize(
    "arch",
    [
        {"name": "resnet", "config": {"depth": 21}},
        {"name": "resnet", "config": {"depth": 8, "norm": "group", "groups": 3}},
        {"name": "vit", "config": {"embed_dim": 10, "num_heads": 4}},
        {"name": "vgg", "config": {"layers": ["M"]}},
        {"name": "mlp", "config": {"hidden": [0]}},
        {"name": "mlp", "config": {"widths": [3]}},
        {"name": "transformer-xl", "config": {}},
    ],
)
def test_build_model_validates_config(arch: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        build_model(arch)
