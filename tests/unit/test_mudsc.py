"""MuDSC core: recovery of permuted copies, identical models, numerics, errors, heads, report."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from mudsc_core import merge
from mudsc_core.architectures import build_model, perm_spec
from mudsc_core.errors import ArchitectureMismatch, InvalidCalibration, InvalidCheckpoint, MergeCanceled
from mudsc_core.permutation.permute import permute_state_dict, random_permutations
from mudsc_core.permutation.similarity import CorrelationAccumulator, row_correlation

IMAGE = (1, 8, 8)
ARCHITECTURES = {
    "mlp": ({"name": "mlp", "config": {"input_dim": 64, "hidden": [24, 16], "num_classes": 10}}, (64,)),
    "vgg": ({"name": "vgg", "config": {"in_channels": 1, "layers": [8, "M", 16], "num_classes": 10}}, IMAGE),
    "resnet_bn": ({"name": "resnet", "config": {"depth": 8, "width": 1, "num_classes": 10, "in_channels": 1}}, IMAGE),
    "resnet_gn": (
        {
            "name": "resnet",
            "config": {"depth": 8, "width": 1, "num_classes": 10, "in_channels": 1, "norm": "group", "groups": 4},
        },
        IMAGE,
    ),
    "resnet_3x3": (
        {"name": "resnet", "config": {"depth": 8, "width": 1, "in_channels": 1, "shortcut_kernel": 3}},
        IMAGE,
    ),
    "torchvision_resnet": (
        {"name": "torchvision_resnet", "config": {"depth": 18, "width": 4, "num_classes": 10, "in_channels": 1}},
        IMAGE,
    ),
    "vit": (
        {
            "name": "vit",
            "config": {
                "image_size": 8,
                "patch_size": 2,
                "in_channels": 1,
                "embed_dim": 16,
                "depth": 2,
                "num_heads": 4,
                "num_classes": 10,
            },
        },
        IMAGE,
    ),
}
WEIGHT_SPACE = [
    ("git_rebasin", {}),
    ("weight_zip", {}),
    ("mudsc", {"mode": "align"}),
    ("mudsc", {"mode": "zip"}),
]


def _model(arch: dict, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(arch)
    for module in model.modules():  # non-trivial BN statistics so that they must be permuted too
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch_name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("method,params", WEIGHT_SPACE)
def test_merging_a_permuted_copy_returns_the_original(arch_name: str, method: str, params: dict) -> None:
    arch, shape = ARCHITECTURES[arch_name]
    state = _model(arch, 0)
    spec = perm_spec(arch)
    permuted = permute_state_dict(spec, state, random_permutations(spec, torch.Generator().manual_seed(7)))
    calibration = torch.randn(64, *shape)
    result = merge(
        [state, permuted], arch, {"name": method, "params": {**params, "reset_bn": False}}, calibration=calibration
    )
    for name, tensor in state.items():
        assert_close(result.state_dict[name].to(tensor.dtype), tensor, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch_name", sorted(ARCHITECTURES))
# alpha = 1: a fused unit keeps its similarity to the third copy. With the default alpha = 0.5
# the greedy definition damps it and may rather fuse two units of one model first (ZipIt!).
# Zip with activations is left out: dead units (zero variance) correlate 0 with everything,
# so three copies of a dead unit are no more alike than any other pair (docs/design/MUDSC.md §6).
@pytest.mark.parametrize(
    "method,params", [("weight_zip", {"alpha": 1.0}), ("mudsc", {"mode": "align"}), ("git_rebasin", {})]
)
def test_merging_identical_models_returns_the_model(arch_name: str, method: str, params: dict) -> None:
    arch, shape = ARCHITECTURES[arch_name]
    state = _model(arch, 1)
    result = merge(
        [state, state, state],
        arch,
        {"name": method, "params": {**params, "reset_bn": False}},
        calibration=torch.randn(48, *shape),
    )
    assert result.report["num_models"] == 3
    for name, tensor in state.items():
        assert_close(result.state_dict[name].to(tensor.dtype), tensor, atol=1e-5, rtol=1e-5, msg=name)


def test_weight_average_collapses_a_permuted_copy_but_matching_does_not() -> None:
    arch, shape = ARCHITECTURES["mlp"]
    state = _model(arch, 0)
    spec = perm_spec(arch)
    permuted = permute_state_dict(spec, state, random_permutations(spec, torch.Generator().manual_seed(3)))
    averaged = merge([state, permuted], arch, {"name": "weight_average"}).state_dict
    assert (averaged["fc0.weight"] - state["fc0.weight"]).abs().max() > 0.05


def test_without_calibration_runs_in_weight_space_and_says_so() -> None:
    arch, _ = ARCHITECTURES["resnet_bn"]
    a, b = _model(arch, 0), _model(arch, 1)
    report = merge([a, b], arch, {"name": "mudsc", "params": {"mode": "zip", "beta": 0.3}}).report
    assert report["weight_space_only"] is True
    assert report["similarity_space"] == "weight"
    assert report["bn_reset"] is False
    assert report["sweeps"] >= report["params"]["patience"]
    assert set(report["groups"]) == set(perm_spec(arch).groups)
    assert all(not math.isnan(g["mean_similarity"]) for g in report["groups"].values())


def test_report_has_objective_per_sweep_and_timings_and_keeps_the_best() -> None:
    arch, shape = ARCHITECTURES["vgg"]
    a, b = _model(arch, 0), _model(arch, 1)
    report = merge(
        [a, b], arch, {"name": "mudsc", "params": {"mode": "align", "beta": 0.5}}, calibration=torch.randn(64, *shape)
    ).report
    assert report["similarity_space"] == "dual" and report["beta"] == 0.5
    history = report["objective_per_sweep"]
    assert len(history) == report["sweeps"] and len(history) >= 1
    best = max(history)
    # The chosen correspondence is the best sweep's: its group scores average to the best objective.
    chosen = sum(g["mean_similarity"] for g in report["groups"].values()) / len(report["groups"])
    assert chosen == pytest.approx(best, abs=1e-9)
    assert {"collecting_activations", "matching", "merging"} <= set(report["timings_s"])


def test_separate_heads_concatenate_every_models_logits() -> None:
    arch, shape = ARCHITECTURES["resnet_bn"]
    a, b = _model(arch, 0), _model(arch, 1)
    x = torch.randn(40, *shape)
    result = merge([a, b], arch, {"name": "mudsc", "params": {"mode": "zip", "heads": "separate"}}, calibration=x)
    assert result.report["heads"] == "separate"
    assert result.report["architecture"]["config"]["num_classes"] == 20
    assert result.state_dict["linear.weight"].shape == (20, a["linear.weight"].shape[1])
    model = build_model(result.report["architecture"])
    model.load_state_dict(result.state_dict)
    assert model.eval()(x).shape == (40, 20)


def test_same_model_with_separate_heads_reproduces_each_models_logits() -> None:
    arch, shape = ARCHITECTURES["mlp"]
    state = _model(arch, 0)
    spec = perm_spec(arch)
    permuted = permute_state_dict(spec, state, random_permutations(spec, torch.Generator().manual_seed(5)))
    x = torch.randn(16, *shape)
    result = merge([state, permuted], arch, {"name": "git_rebasin", "params": {"heads": "separate"}})
    merged = build_model(result.report["architecture"])
    merged.load_state_dict(result.state_dict)
    original = build_model(arch)
    original.load_state_dict(state)
    out = merged.eval()(x)
    assert_close(out[:, :10], original.eval()(x), atol=1e-5, rtol=1e-5)
    assert_close(out[:, 10:], original(x), atol=1e-5, rtol=1e-5)


def test_inputs_are_not_mutated() -> None:
    arch, shape = ARCHITECTURES["vit"]
    a, b = _model(arch, 0), _model(arch, 1)
    before = [{k: v.clone() for k, v in s.items()} for s in (a, b)]
    calibration = torch.randn(32, *shape)
    calibration_before = calibration.clone()
    merge([a, b], arch, {"name": "mudsc", "params": {"mode": "zip"}}, calibration=calibration)
    for state, copy in zip((a, b), before):
        for name in state:
            assert torch.equal(state[name], copy[name])
    assert torch.equal(calibration, calibration_before)


def test_progress_reports_every_stage_and_cancel_stops_the_merge() -> None:
    arch, shape = ARCHITECTURES["mlp"]
    a, b = _model(arch, 0), _model(arch, 1)
    seen: list[tuple[str, float]] = []
    merge(
        [a, b],
        arch,
        {"name": "mudsc"},
        calibration=torch.randn(300, *shape),
        progress=lambda stage, fraction, message: seen.append((stage, fraction)),
        calibration_batch_size=100,
    )
    stages = [s for s, _ in seen]
    assert stages.index("collecting_activations") < stages.index("matching") < stages.index("merging")
    assert all(0.0 <= f <= 1.0 for _, f in seen)

    def cancel(stage: str, fraction: float, message: str) -> None:
        if stage == "matching":
            raise MergeCanceled("canceled by user")

    with pytest.raises(MergeCanceled):
        merge([a, b], arch, {"name": "mudsc"}, calibration=torch.randn(30, *shape), progress=cancel)


def test_bad_inputs_get_specific_errors() -> None:
    arch, shape = ARCHITECTURES["mlp"]
    a, b = _model(arch, 0), _model(arch, 1)
    broken = dict(b)
    broken["fc0.weight"] = broken["fc0.weight"].clone()
    broken["fc0.weight"][0, 0] = float("nan")
    with pytest.raises(InvalidCheckpoint, match="fc0.weight"):
        merge([a, broken], arch, {"name": "git_rebasin"})
    integer = {**b, "fc1.weight": b["fc1.weight"].to(torch.int32)}
    with pytest.raises(InvalidCheckpoint, match="fc1.weight.*floating point"):
        merge([a, integer], arch, {"name": "git_rebasin"})
    missing = {k: v for k, v in b.items() if k != "head.bias"}
    with pytest.raises(ArchitectureMismatch, match="head.bias"):
        merge([a, missing], arch, {"name": "git_rebasin"})
    with pytest.raises(InvalidCalibration, match="do not fit"):
        merge([a, b], arch, {"name": "zipit"}, calibration=torch.randn(8, 3, 5))
    with pytest.raises(InvalidCalibration, match="NaN"):
        merge([a, b], arch, {"name": "zipit"}, calibration=torch.full((8, 64), float("nan")))
    with pytest.raises(InvalidCalibration, match="requires"):
        merge([a, b], arch, {"name": "zipit"})


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.floats(-1e6, 1e6), st.floats(1e-3, 1e4))
def test_streaming_correlation_matches_exact_and_is_nan_free(seed: int, offset: float, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 400, generator=generator, dtype=torch.float64) * scale + offset
    x[3] = offset  # a constant (dead) unit
    accumulator = CorrelationAccumulator()
    for chunk in x.split(37, dim=1):
        accumulator.update(chunk.float() if abs(offset) < 1e3 else chunk)
    corr = accumulator.correlation()
    assert not torch.isnan(corr).any()
    assert torch.all(corr[3] == 0) and torch.all(corr[:, 3] == 0)
    alive = [0, 1, 2, 4]
    expected = torch.corrcoef(x[alive])
    assert_close(corr[alive][:, alive], expected, atol=1e-4, rtol=0)


def test_row_correlation_of_constant_rows_is_zero() -> None:
    features = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [5.0, 5.0, 5.0]])
    corr = row_correlation(features)
    assert corr[0, 1] == pytest.approx(1.0)
    assert torch.all(corr[2] == 0)


@pytest.mark.parametrize("with_calibration", [False, True])
def test_one_pass_without_iteration_matches_every_group(with_calibration: bool) -> None:
    arch, shape = ARCHITECTURES["resnet_bn"]
    state = _model(arch, 0)
    spec = perm_spec(arch)
    permuted = permute_state_dict(spec, state, random_permutations(spec, torch.Generator().manual_seed(2)))
    calibration = torch.randn(32, *shape) if with_calibration else None
    result = merge(
        [state, permuted],
        arch,
        {"name": "mudsc", "params": {"iterate": False, "reset_bn": False}},
        calibration=calibration,
    )
    assert result.report["sweeps"] == 1
    assert set(result.report["groups"]) == set(spec.groups)


# --------------------------------------------------------------------------- traced specs in the merge
def test_every_merge_reports_its_traced_spec_and_self_check() -> None:
    arch, shape = ARCHITECTURES["vit"]
    a, b = _model(arch, 0), _model(arch, 1)
    report = merge(
        [a, b], arch, {"name": "mudsc", "params": {"mode": "zip"}}, calibration=torch.randn(16, *shape)
    ).report
    spec = report["spec"]
    assert spec["source"] == "traced" and spec["self_check"]["max_rel_error"] <= 1e-4
    free = [g for g in spec["groups"] if g["free"]]
    assert {g["name"] for g in free} == set(report["groups"])
    assert any(g["blocks"] == 4 for g in free)  # attention heads are blocks
    assert report["metrics"]["self_check_max_rel_error"] == spec["self_check"]["max_rel_error"]
    assert {"tracing", "self_check"} <= set(report["timings_s"])


def test_shortcut_kernel_is_read_off_the_checkpoint() -> None:
    built = {"name": "resnet", "config": {"depth": 8, "width": 1, "in_channels": 1, "shortcut_kernel": 3}}
    a, b = _model(built, 0), _model(built, 1)
    assert a["layer2.0.shortcut.0.weight"].shape == (32, 16, 3, 3)
    given_without_kernel = {"name": "resnet", "config": {"depth": 8, "width": 1, "in_channels": 1}}
    result = merge([a, b], given_without_kernel, {"name": "git_rebasin"})
    assert result.report["architecture"]["config"]["shortcut_kernel"] == 3
    assert result.state_dict["layer2.0.shortcut.0.weight"].shape == (32, 16, 3, 3)


def test_a_spec_that_fails_the_self_check_fails_the_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    from mudsc_core.errors import UnsupportedArchitecture
    from mudsc_core.permutation import merge as merge_module
    from mudsc_core.permutation.spec import PermSpec

    arch, _ = ARCHITECTURES["mlp"]
    traced = merge_module.trace_architecture(arch)
    # fc1.weight's input axis no longer follows group fc0: permuting fc0 now changes the outputs
    axes = dict(traced.spec.axes)
    axes["fc1.weight"] = (axes["fc1.weight"][0], None)
    broken = PermSpec(traced.spec.groups, axes, traced.spec.excluded, traced.spec.head_params, traced.spec.order)
    monkeypatch.setattr(merge_module, "trace_architecture", lambda _arch, **_: type(traced)(broken, traced.groups))
    with pytest.raises(UnsupportedArchitecture, match="fc0"):
        merge([_model(arch, 0), _model(arch, 1)], arch, {"name": "git_rebasin"})


def test_a_given_oracle_spec_merges_exactly_as_the_traced_one() -> None:
    from mudsc_core.architectures import oracle_spec

    arch, shape = ARCHITECTURES["resnet_bn"]
    a, b = _model(arch, 0), _model(arch, 1)
    calibration = torch.randn(32, *shape)
    method = {"name": "mudsc", "params": {"mode": "zip"}}
    traced = merge([a, b], arch, method, calibration=calibration)
    given = merge([a, b], arch, method, calibration=calibration, spec=oracle_spec(arch))
    assert given.report["spec"]["source"] == "given" and traced.report["spec"]["source"] == "traced"
    for name, tensor in traced.state_dict.items():
        assert_close(given.state_dict[name], tensor, rtol=0, atol=0)
