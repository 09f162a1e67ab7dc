"""nuslerp, karcher, sce and nearswap: known answers on small tensors, params, registry, mergekit translation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from mudsc_core.same_base.karcher import karcher_mean
from mudsc_core.same_base.nearswap import nearswap
from mudsc_core.same_base.nuslerp import nuslerp
from mudsc_core.same_base.sce import sce
from mudsc_core.same_base.stream import build_merger
from mudsc_core.schema import METHODS
from mudsc_core.schema.mergekit import MergekitConfigError, from_mergekit, to_mergekit
from mudsc_core.schema.parameters import TensorValues
from mudsc_core.schema.same_base_params import KarcherParams, NearswapParams, NuslerpParams, SceParams

R = 1 / math.sqrt(2)
A, B, C, BASE = (f"s3://models/acme/{n}/" for n in ("a", "b", "c", "base"))


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------- nuslerp
def test_nuslerp_halfway_between_orthogonal_vectors_is_on_the_arc() -> None:
    torch.testing.assert_close(nuslerp(0.5, _t(1, 0), _t(0, 1)), _t(R, R))
    torch.testing.assert_close(nuslerp(0.0, _t(1, 0), _t(0, 2)), _t(1, 0))
    torch.testing.assert_close(nuslerp(1.0, _t(1, 0), _t(0, 2)), _t(0, 2))


def test_nuslerp_colinear_vectors_interpolate_linearly() -> None:
    torch.testing.assert_close(nuslerp(0.25, _t(1, 1), _t(2, 2)), _t(1.25, 1.25))


def test_nuslerp_t_comes_from_the_weights() -> None:
    merger = build_merger("nuslerp", NuslerpParams())
    out = merger.merge("w", [_t(1, 0), _t(0, 1)], [1.0, 2.0], [0, 1])  # t = 2/3
    torch.testing.assert_close(out, _t(math.cos(math.pi / 3), math.sin(math.pi / 3)))
    torch.testing.assert_close(merger.merge("w", [_t(3, 4)], [1.0], [1]), _t(3, 4))  # in one model only


def test_nuslerp_per_row_and_per_column() -> None:
    v0 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    v1 = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    rows = nuslerp(0.5, v0, v1, flatten=False)
    torch.testing.assert_close(rows, torch.tensor([[R, R], [1.5, 1.5]]))  # row 1 colinear: lerp
    columns = nuslerp(0.5, v0.t(), v1.t(), flatten=False, row_wise=True)
    torch.testing.assert_close(columns, rows.t())


# --------------------------------------------------------------------------- karcher
def test_karcher_mean_of_orthogonal_directions_and_mean_norm() -> None:
    torch.testing.assert_close(karcher_mean([_t(2, 0), _t(0, 4)]), _t(3 * R, 3 * R))


def test_karcher_leaves_out_zero_models_direction_but_not_its_norm() -> None:
    # direction of the only non-zero model, scale = (0 + 2) / 2
    torch.testing.assert_close(karcher_mean([_t(0, 0), _t(0, 2)]), _t(0, 1))
    torch.testing.assert_close(karcher_mean([_t(0, 0), _t(0, 0)]), _t(0, 0))


def test_karcher_of_three_is_symmetric_and_ignores_weights() -> None:
    merger = build_merger("karcher", KarcherParams(max_iter=50, tol=1e-7))
    eye = torch.eye(3)
    out = merger.merge("w", [eye[0].clone(), eye[1].clone(), eye[2].clone()], [1.0, 5.0, 0.1], [0, 1, 2])
    torch.testing.assert_close(out, torch.full((3,), 1 / math.sqrt(3)))


# --------------------------------------------------------------------------- sce
def test_sce_weighs_by_energy_and_erases_disagreeing_signs() -> None:
    tvs = torch.tensor([[1.0, -2.0], [3.0, 1.0]])
    # signs elected (+, -); energies 2.5 and 5 -> coefficients 1/3, 2/3; entry 1: model 0 only
    torch.testing.assert_close(sce(tvs.clone()), _t(7 / 3, -2))


def test_sce_selects_the_highest_variance_entries() -> None:
    tvs = torch.tensor([[1.0, -2.0], [3.0, 1.0]])  # variances 1 and 2.25: keep entry 1
    torch.testing.assert_close(sce(tvs.clone(), 0.5), _t(0, -2))
    torch.testing.assert_close(sce(tvs.clone(), 0.0), _t(0, 0))


def test_sce_merger_stacks_the_task_vectors_and_resolves_select_topk_per_tensor() -> None:
    merger = build_merger("sce", SceParams(select_topk=[{"filter": "mlp", "value": 0.5}]))
    assert merger.needs_base
    values = TensorValues({"select_topk": 0.5}, {})
    out = merger.merge("mlp.w", iter([_t(1, -2), _t(3, 1)]), [1.0, 1.0], [0, 1], values)
    torch.testing.assert_close(out, _t(0, -2))


# --------------------------------------------------------------------------- nearswap
def test_nearswap_moves_toward_the_second_model_by_t_over_the_gap() -> None:
    a, b = _t(0, 0, 0, 1), _t(0.005, 0.02, -1, 1)
    torch.testing.assert_close(nearswap(0.01, a, b), _t(0.005, 0.01, -0.01, 1))


def test_nearswap_merger_takes_t_per_tensor() -> None:
    merger = build_merger("nearswap", NearswapParams(t=[0.1, 0.9]))
    out = merger.merge("layers.0.w", [_t(0, 0), _t(1, 0.5)], [1.0, 1.0], [0, 1], TensorValues({"t": 0.5}, {}))
    torch.testing.assert_close(out, _t(0.5, 0.5))


# --------------------------------------------------------------------------- params and registry
def test_params_defaults_and_bounds_follow_mergekit() -> None:
    assert (NuslerpParams().nuslerp_flatten, NuslerpParams().nuslerp_row_wise) == (True, False)
    assert (KarcherParams().max_iter, KarcherParams().tol) == (10, 1e-5)
    assert SceParams().select_topk == 1.0
    with pytest.raises(ValidationError, match="select_topk"):
        SceParams(select_topk=[0.5, 1.5])
    with pytest.raises(ValidationError):
        KarcherParams(max_iter=-1)
    with pytest.raises(ValidationError):
        NearswapParams(t=2.0)
    assert KarcherParams().model_parameter_problems([{"weight": 1.0}])
    assert SceParams().model_parameter_problems([{"weight": 1.0}])
    assert not NuslerpParams().model_parameter_problems([{"weight": [0.5, 1.0]}])


def test_registry_entries() -> None:
    assert METHODS["sce"].requires_base and not METHODS["karcher"].requires_base
    assert METHODS["nuslerp"].max_models == 2 and METHODS["nearswap"].max_models == 2
    assert not METHODS["nearswap"].requires_base  # mergekit's base_model is our models[0]


# --------------------------------------------------------------------------- mergekit translation
def _round_trip(config: dict[str, Any]) -> dict[str, Any] | None:
    return to_mergekit(from_mergekit(config).model_dump(mode="json")).config


def test_mergekit_yaml_both_ways() -> None:
    configs: list[dict[str, Any]] = [
        {
            "merge_method": "nuslerp",
            "models": [{"model": A, "parameters": {"weight": 1.0}}, {"model": B, "parameters": {"weight": [0.2, 1]}}],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
            "dtype": "bfloat16",
        },
        {
            "merge_method": "karcher",
            "models": [{"model": A}, {"model": B}, {"model": C}],
            "parameters": {"max_iter": 5, "tol": 1e-4},
            "dtype": "float32",
        },
        {
            "merge_method": "sce",
            "base_model": BASE,
            "models": [{"model": A}, {"model": B}],
            "parameters": {"select_topk": 0.1},
            "dtype": "float16",
        },
        {
            "merge_method": "nearswap",
            "base_model": A,
            "models": [{"model": A}, {"model": B}],
            "parameters": {"t": [0.001, 0.01]},
            "dtype": "float32",
        },
    ]
    for config in configs:
        assert _round_trip(config) == config, config["merge_method"]
    spec = from_mergekit(configs[3])
    assert [m.uri for m in spec.models] == [A, B] and spec.base_model is None


def test_mergekit_yaml_refusals() -> None:
    with pytest.raises(MergekitConfigError) as missing_t:
        from_mergekit({"merge_method": "nearswap", "base_model": A, "models": [{"model": B}]})
    assert missing_t.value.errors[0]["loc"] == ["parameters", "t"]
    with pytest.raises(MergekitConfigError) as weighted:
        from_mergekit({"merge_method": "karcher", "models": [{"model": A, "parameters": {"weight": 2}}, {"model": B}]})
    assert weighted.value.errors[0]["loc"] == ["models", 0, "parameters", "weight"]
    with pytest.raises(MergekitConfigError) as based:
        from_mergekit({"merge_method": "nuslerp", "base_model": BASE, "models": [{"model": A}, {"model": B}]})
    assert based.value.errors[0]["loc"] == ["base_model"]
    spec = from_mergekit(
        {
            "merge_method": "sce",
            "base_model": BASE,
            "models": [{"model": A}, {"model": B}],
            "parameters": {"int8_mask": True},
        }
    )
    assert spec.method.name == "sce"
