"""CIFAR ResNet with both projection-shortcut kernels, and the torchvision-style ResNet family
(torchvision names and parameter counts; spec derived by tracing and checked by permuting outputs)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from mudsc_core.architectures import resnet, torchvision_resnet
from mudsc_core.permutation.permute import permute_state_dict, random_permutations
from mudsc_core.permutation.spec import PermSpec
from mudsc_core.permutation.trace import TraceResult, self_check, trace_spec
from mudsc_core.schema.architectures import ARCHITECTURE_CONFIGS, ResNetConfig, TorchvisionResNetConfig
from mudsc_core.schema.job import ArchitectureSpec
from tests.unit.test_trace import _canonical, _randomize_norms, _rename


# --------------------------------------------------------------------------- CIFAR ResNet shortcuts
@pytest.mark.parametrize(("kernel", "expected"), [(None, 1), (1, 1), (3, 3)])
def test_cifar_resnet_builds_both_shortcut_kernels(kernel: int | None, expected: int) -> None:
    config = ResNetConfig(depth=8, width=1, shortcut_kernel=kernel)
    model = resnet.build(config).eval()
    state = model.state_dict()
    assert state["layer2.0.shortcut.0.weight"].shape == (32, 16, expected, expected)
    assert state["layer3.0.shortcut.0.weight"].shape == (64, 32, expected, expected)
    assert "layer1.0.shortcut.0.weight" not in state  # stage 1 keeps width and stride: identity
    (x,) = resnet.example_inputs(config)
    assert x.shape == (2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_shortcut_kernel_is_validated() -> None:
    with pytest.raises(ValidationError):
        ResNetConfig(shortcut_kernel=5)
    assert ResNetConfig().shortcut_kernel is None


def _state(kernel: int) -> dict[str, Tensor]:
    with torch.device("meta"):
        return dict(resnet.build(ResNetConfig(depth=8, shortcut_kernel=kernel)).state_dict())


def test_infer_config_reads_the_shortcut_kernel() -> None:
    config: dict[str, Any] = {"depth": 8, "width": 1, "shortcut_kernel": None}
    assert resnet.infer_config(config, _state(3)) == {"depth": 8, "width": 1, "shortcut_kernel": 3}
    assert resnet.infer_config(config, _state(1))["shortcut_kernel"] == 1
    assert config["shortcut_kernel"] is None  # the argument is not modified
    assert resnet.infer_config({"depth": 8}, _state(3)) == {"depth": 8, "shortcut_kernel": 3}  # absent = None
    assert resnet.infer_config({"depth": 8}, {})["shortcut_kernel"] == 1  # no such entry: 1
    # header entries (anything with a shape) work as well as tensors
    header = {"layer2.0.shortcut.0.weight": SimpleNamespace(shape=(32, 16, 3, 3))}
    assert resnet.infer_config({}, header)["shortcut_kernel"] == 3
    # an explicit kernel is kept
    assert resnet.infer_config({"shortcut_kernel": 1}, _state(3))["shortcut_kernel"] == 1
    inferred = ResNetConfig.model_validate(resnet.infer_config({"depth": 8}, _state(3)))
    assert set(resnet.build(inferred).state_dict()) == set(_state(3))


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_cifar_3x3_shortcut_traced_spec_equals_hand_written(norm: str) -> None:
    torch.manual_seed(0)
    config = ResNetConfig(depth=14, width=1, num_classes=5, norm=norm, groups=4, shortcut_kernel=3)
    model = resnet.build(config)
    _randomize_norms(model)
    oracle = resnet.spec(config)
    inputs = resnet.example_inputs(config)
    derived = trace_spec(model, inputs).spec
    assert _canonical(derived) == _canonical(oracle)
    assert set(derived.head_params) == set(oracle.head_params)
    assert derived.excluded == oracle.excluded
    assert set(derived.axes) == set(oracle.axes)
    for param, axes in oracle.axes.items():
        assert [a is None for a in derived.axes[param]] == [a is None for a in axes], param
    names = _rename(derived, oracle)
    assert [names[g] for g in derived.group_order()] == list(oracle.group_order())
    assert self_check(model, derived, inputs) < 1e-5
    assert self_check(model, oracle, inputs) < 1e-5


# --------------------------------------------------------------------------- torchvision ResNet: names
def _meta_state(**config: Any) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = torchvision_resnet.build(TorchvisionResNetConfig(**config))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.mark.parametrize(("depth", "count"), [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032), (101, 44_549_160)])
def test_torchvision_parameter_counts(depth: int, count: int) -> None:
    with torch.device("meta"):
        model = torchvision_resnet.build(TorchvisionResNetConfig(depth=depth))
    assert sum(p.numel() for p in model.parameters()) == count


def _torchvision18_keys() -> list[str]:
    """torchvision's resnet18 state-dict names, written out from its naming scheme."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight", *(f"bn1.{leaf}" for leaf in bn)]
    for stage in range(1, 5):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            for i in (1, 2):
                keys += [f"{prefix}.conv{i}.weight", *(f"{prefix}.bn{i}.{leaf}" for leaf in bn)]
            if stage > 1 and block == 0:
                keys += [f"{prefix}.downsample.0.weight", *(f"{prefix}.downsample.1.{leaf}" for leaf in bn)]
    return [*keys, "fc.weight", "fc.bias"]


def test_torchvision18_names_and_shapes() -> None:
    state = _meta_state(depth=18)
    assert len(state) == 122
    assert list(state) == _torchvision18_keys()
    assert state["conv1.weight"] == (64, 3, 7, 7)
    assert state["layer1.0.conv1.weight"] == (64, 64, 3, 3)
    assert state["layer2.0.conv1.weight"] == (128, 64, 3, 3)
    assert state["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert state["layer4.1.conv2.weight"] == (512, 512, 3, 3)
    assert state["fc.weight"] == (1000, 512)
    assert state["fc.bias"] == (1000,)
    assert state["bn1.num_batches_tracked"] == ()


def test_torchvision50_names_and_shapes() -> None:
    state = _meta_state(depth=50)
    assert len(state) == 320
    assert state["layer1.0.conv1.weight"] == (64, 64, 1, 1)
    assert state["layer1.0.conv2.weight"] == (64, 64, 3, 3)
    assert state["layer1.0.conv3.weight"] == (256, 64, 1, 1)
    assert state["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert state["layer1.1.conv1.weight"] == (64, 256, 1, 1)
    assert state["layer2.0.conv1.weight"] == (128, 256, 1, 1)  # v1.5: stride on the 3x3 conv2
    assert state["layer2.0.downsample.0.weight"] == (512, 256, 1, 1)
    assert state["layer4.2.bn3.running_var"] == (2048,)
    assert state["fc.weight"] == (1000, 2048)
    assert "layer1.1.downsample.0.weight" not in state


def test_torchvision_strides() -> None:
    model = torchvision_resnet.build(TorchvisionResNetConfig(depth=50, width=8, num_classes=10))
    modules = dict(model.named_modules())
    assert [modules[f"layer{s}.0.conv2"].stride for s in range(1, 5)] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert [modules[f"layer{s}.0.conv1"].stride for s in range(1, 5)] == [(1, 1)] * 4
    assert [modules[f"layer{s}.0.downsample.0"].stride for s in range(1, 5)] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_torchvision_config() -> None:
    assert ARCHITECTURE_CONFIGS["torchvision_resnet"] is TorchvisionResNetConfig
    arch = ArchitectureSpec(name="torchvision_resnet", config={"depth": 50})
    assert arch.config == {"depth": 50, "width": 64, "num_classes": 1000, "in_channels": 3}
    for bad in ({"depth": 20}, {"width": 2}, {"width": 1024}, {"num_classes": 0}, {"blocks": 3}):
        with pytest.raises(ValidationError):
            TorchvisionResNetConfig.model_validate(bad)
    assert _meta_state(width=5, in_channels=1)["conv1.weight"] == (5, 1, 7, 7)  # no multiple required


# --------------------------------------------------------------------------- torchvision ResNet: traced spec
NARROW: dict[str, dict[str, Any]] = {
    "resnet18-w8": {"depth": 18, "width": 8, "num_classes": 10},
    "resnet50-w8": {"depth": 50, "width": 8, "num_classes": 10},
}
Traced = dict[str, tuple[nn.Module, tuple[Tensor, ...], TraceResult]]


@pytest.fixture(scope="module")
def traced() -> Traced:
    out = {}
    for key, config in NARROW.items():
        torch.manual_seed(0)
        typed = TorchvisionResNetConfig(**config)
        model = torchvision_resnet.build(typed)
        _randomize_norms(model)
        inputs = torchvision_resnet.example_inputs(typed)
        out[key] = (model, inputs, trace_spec(model, inputs))
    return out


def _bn_sets(spec: PermSpec) -> dict[frozenset[str], int]:
    """Each group as the set of BatchNorm scales it indexes (a BN names the unit space it normalises)."""
    found: dict[str, set[str]] = {g: set() for g in spec.groups}
    for param, axes in spec.axes.items():
        if param.endswith(".weight") and len(axes) == 1 and axes[0] is not None:
            found[axes[0][0].group].add(param.removesuffix(".weight"))
    return {frozenset(bns): spec.groups[g].size for g, bns in found.items()}


def _expected_groups(config: dict[str, Any]) -> dict[frozenset[str], int]:
    """Residual stream of each stage (block outputs and the projection), inner channels of each block."""
    typed = TorchvisionResNetConfig(**config)
    bottleneck = typed.depth >= 50
    expansion, last = (4, 3) if bottleneck else (1, 2)
    groups: dict[frozenset[str], int] = {}
    if bottleneck:
        groups[frozenset({"bn1"})] = typed.width  # the stem: read by layer1.0's conv1 and downsample
    for s, (planes, blocks, _stride) in enumerate(torchvision_resnet.stage_plan(typed), start=1):
        stream = {f"layer{s}.{b}.bn{last}" for b in range(blocks)}
        stream.add(f"layer{s}.0.downsample.1" if (s > 1 or bottleneck) else "bn1")  # BasicBlock: stem = stream 1
        groups[frozenset(stream)] = planes * expansion
        for b in range(blocks):
            for i in range(1, last):
                groups[frozenset({f"layer{s}.{b}.bn{i}"})] = planes
    return groups


@pytest.mark.parametrize("key", list(NARROW))
def test_torchvision_traced_groups(traced: Traced, key: str) -> None:
    model, _inputs, result = traced[key]
    spec = result.spec
    assert _bn_sets(spec) == _expected_groups(NARROW[key])
    assert len(spec.groups) == {"resnet18-w8": 4 + 8, "resnet50-w8": 1 + 4 + 2 * 16}[key]
    assert set(spec.head_params) == {"fc.weight", "fc.bias"}
    assert spec.axes["fc.weight"][0] is None and spec.axes["conv1.weight"][1] is None  # labels, pixels
    assert all(g.num_blocks == 1 and g.block_tie is None for g in spec.groups.values())
    assert all(g.activation is not None for g in spec.groups.values())
    assert spec.excluded == {k for k in model.state_dict() if k.endswith("num_batches_tracked")}
    assert result.seconds > 0


@pytest.mark.parametrize("key", list(NARROW))
def test_torchvision_traced_spec_self_check(traced: Traced, key: str) -> None:
    model, inputs, result = traced[key]
    assert self_check(model, result.spec, inputs, trials=2) < 1e-5


@pytest.mark.parametrize("key", list(NARROW))
def test_torchvision_random_permutations_leave_outputs_unchanged(traced: Traced, key: str) -> None:
    model, inputs, result = traced[key]
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(*inputs)
    for seed in (1, 2):
        permuted = permute_state_dict(
            result.spec, state, random_permutations(result.spec, torch.Generator().manual_seed(seed))
        )
        assert any(not torch.equal(permuted[k], state[k]) for k in result.spec.axes)
        model.load_state_dict(permuted)
        with torch.no_grad():
            torch.testing.assert_close(model(*inputs), expected, atol=1e-5, rtol=1e-4)
    model.load_state_dict(state)
