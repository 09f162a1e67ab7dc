"""Per-model and per-layer parameters (mergekit's models[i].parameters, gradients, filter lists)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch.testing import assert_close

from mudsc_core.errors import InvalidParameters
from mudsc_core.io import load_state_dict, save_state_dict
from mudsc_core.same_base.stream import merge_checkpoints
from mudsc_core.same_base.task_arithmetic import task_arithmetic
from mudsc_core.schema import JobSpec
from mudsc_core.schema.mergekit import to_mergekit
from mudsc_core.schema.parameters import (
    FilterOverride,
    ParameterResolver,
    TensorValues,
    layer_count,
    layer_index,
    resolve,
)
from mudsc_core.schema.same_base_params import GeneralizedTaskArithmeticParams, SlerpParams, TiesParams

T = torch.tensor


# --------------------------------------------------------------------------- resolution
def test_layer_index_from_the_name() -> None:
    assert layer_index("model.layers.7.mlp.up_proj.weight") == 7
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("encoder.layer.11.output.dense.bias") == 11
    assert layer_index("blocks.2.norm1.weight") == 2
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("lm_head.weight") is None
    assert layer_index("model.mlp_h.3.weight") is None  # a whole name segment only
    assert layer_count(["embed.weight", "layers.0.w", "layers.4.w", "norm.weight"]) == 5
    assert layer_count(["embed.weight"]) == 0


def test_gradient_over_three_layers_and_outside_tensors() -> None:
    gradient = [0.0, 1.0]
    assert [resolve(gradient, f"layers.{i}.w", i, 3) for i in range(3)] == [0.0, 0.5, 1.0]
    # outside the layers (embeddings, final norm, lm_head): mergekit's t = 0, the first value
    assert resolve(gradient, "embed.weight", None, 3) == 0.0
    assert resolve(gradient, "lm_head.weight", None, 3) == 0.0
    # one layer: mergekit's t = 1, the last value
    assert resolve(gradient, "layers.0.w", 0, 1) == 1.0
    # piecewise linear over evenly spaced anchors: [0, 1, 0] over 5 layers
    assert [resolve([0.0, 1.0, 0.0], "x", i, 5) for i in range(5)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    # a gradient longer than the layer count samples its anchors (as mergekit)
    assert [resolve([1.0, 2.0, 3.0, 4.0, 5.0], "x", i, 3) for i in range(3)] == [1.0, 3.0, 5.0]


def test_filter_overrides_pick_by_substring_first_match_wins() -> None:
    value = [
        FilterOverride(filter="self_attn", value=[0.0, 1.0]),
        FilterOverride(filter="attn", value=0.3),
        FilterOverride(value=0.7),
    ]
    assert resolve(value, "layers.1.self_attn.q_proj.weight", 1, 3) == 0.5
    assert resolve(value, "layers.1.cross_attn.q.weight", 1, 3) == 0.3
    assert resolve(value, "layers.1.mlp.up.weight", 1, 3) == 0.7
    assert resolve([FilterOverride(filter="*", value=0.2)], "anything", None, 0) == 0.2
    assert resolve([FilterOverride(filter="mlp", value=0.2)], "layers.0.attn.w", 0, 2) is None


def test_resolver_falls_back_model_then_method_then_default() -> None:
    params = TiesParams(density=[FilterOverride(filter="mlp", value=0.4)])
    resolver = ParameterResolver(
        params,
        TiesParams.TENSOR_PARAMETERS,
        TiesParams.PER_MODEL_PARAMETERS,
        [{"density": [FilterOverride(filter="attn", value=0.9)]}, {"weight": [1.0, 3.0]}],
        [2.0, 5.0],
        layers=3,
    )
    attn, mlp, other = resolver.at("layers.2.attn.w"), resolver.at("layers.2.mlp.w"), resolver.at("layers.2.norm")
    assert attn.get("density", 0) == 0.9 and attn.get("density", 1) == 0.2  # model 1: no match -> ties default
    assert mlp.get("density", 0) == 0.4 and mlp.get("density", 1) == 0.4  # no model match -> the method's
    assert other.get("density", 0) == 0.2  # nothing matches anywhere: the method's default
    assert attn.get("weight", 0) == 2.0 and attn.get("weight", 1) == 3.0  # weights[i], parameters.weight
    assert resolver.at("embed.weight").get("weight", 1) == 1.0


@settings(max_examples=60, deadline=None)
@given(
    st.floats(0.001, 1.0),
    st.integers(1, 8),
    st.integers(1, 40),
    st.data(),
)
def test_constant_gradient_equals_the_scalar(c: float, n: int, layers: int, data: st.DataObject) -> None:
    layer = data.draw(st.one_of(st.none(), st.integers(0, layers - 1)))
    name = "embed.weight" if layer is None else f"model.layers.{layer}.w"
    assert resolve([c] * n, name, layer, layers) == pytest.approx(c, rel=1e-12, abs=1e-15)
    assert resolve([FilterOverride(value=[c] * n)], name, layer, layers) == pytest.approx(c, rel=1e-12, abs=1e-15)
    assert resolve(c, name, layer, layers) == c


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6), st.integers(1, 30), st.data())
def test_gradient_stays_between_its_anchors(gradient: list[float], layers: int, data: st.DataObject) -> None:
    layer = data.draw(st.integers(0, layers - 1))
    value = resolve(gradient, f"h.{layer}.w", layer, layers)
    assert value is not None and min(gradient) - 1e-12 <= value <= max(gradient) + 1e-12


# --------------------------------------------------------------------------- known answers
def test_per_model_density_changes_which_entries_survive() -> None:
    base = torch.zeros(4)
    tau0, tau1 = T([1.0, -2.0, 0.5, 3.0]), T([-3.0, 1.0, 0.5, 0.9])
    # model 0 keeps 1 of 4 (density 0.25): [0, 0, 0, 3]; model 1 keeps 3 (0.75): [-3, 1, 0, 0.9]
    # sum [-3, 1, 0, 3.9] elects [-, +, +, +]; disjoint mean: [-3, 1, 0 (none agree), (3 + 0.9) / 2]
    values = TensorValues({"scaling_factor": 1.0}, {0: {"density": 0.25}, 1: {"density": 0.75}})
    out = task_arithmetic(base, [tau0, tau1], [1.0, 1.0], TiesParams().to_gta(), values=values)
    assert_close(out, T([-3.0, 1.0, 0.0, 1.95]))
    # the same densities for both (0.5) give the scalar answer of test_same_base
    same = TensorValues({"scaling_factor": 1.0}, {0: {"density": 0.5}, 1: {"density": 0.5}})
    out = task_arithmetic(base, [tau0, tau1], [1.0, 1.0], TiesParams().to_gta(), values=same)
    assert_close(out, T([-3.0, -2.0, 0.0, 3.0]))


def _checkpoints(tmp_path: Path) -> tuple[Path, list[Path], dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    names = ["embed.weight", "model.layers.0.w", "model.layers.1.w", "model.layers.2.w", "lm_head.weight"]
    base = {n: torch.zeros(4) for n in names}
    taus = [{n: T([1.0, -2.0, 0.5, 3.0]) for n in names}, {n: T([-3.0, 1.0, 0.5, 0.9]) for n in names}]
    save_state_dict(base, tmp_path / "base")
    paths = []
    for i, tau in enumerate(taus):
        save_state_dict({n: base[n] + tau[n] for n in names}, tmp_path / f"m{i}")
        paths.append(tmp_path / f"m{i}")
    return tmp_path / "base", paths, base, taus


def _merge(tmp_path: Path, method: str, params: dict[str, Any], models: list[Path], base: Path | None, **kw: Any):
    out = tmp_path / "out"
    merge_checkpoints(
        method,
        params,
        models,
        base,
        kw.pop("weights", [1.0] * len(models)),
        out,
        dtype="float32",
        shard_size_bytes=2**30,
        **kw,
    )
    return load_state_dict(out)


def test_stream_applies_per_model_gradients_per_tensor(tmp_path: Path) -> None:
    base_dir, models, base, taus = _checkpoints(tmp_path)
    # model 0's density runs 0.25 -> 0.75 over the 3 layers; outside the layers it is 0.25 (t = 0)
    merged = _merge(
        tmp_path, "ties", {"density": 0.75}, models, base_dir, model_parameters=[{"density": [0.25, 0.75]}, {}]
    )
    expected_density = {
        "embed.weight": 0.25,
        "model.layers.0.w": 0.25,
        "model.layers.1.w": 0.5,
        "model.layers.2.w": 0.75,
        "lm_head.weight": 0.25,
    }
    for name, d0 in expected_density.items():
        values = TensorValues({"scaling_factor": 1.0}, {0: {"density": d0}, 1: {"density": 0.75}})
        expected = task_arithmetic(
            base[name], [base[name] + t[name] for t in taus], [1.0, 1.0], TiesParams().to_gta(), values=values
        )
        assert_close(merged[name], expected, msg=name)
    assert_close(merged["model.layers.0.w"], T([-3.0, 1.0, 0.0, 1.95]))  # the hand-computed case above


def test_stream_weight_gradient_and_slerp_t_filter_list(tmp_path: Path) -> None:
    base_dir, models, base, taus = _checkpoints(tmp_path)
    a, b = load_state_dict(models[0]), load_state_dict(models[1])
    # linear: model 1's weight 1 -> 3 over the layers (model 0: 1)
    merged = _merge(tmp_path, "linear", {}, models, None, model_parameters=[{}, {"weight": [1.0, 3.0]}])
    for name, w in [("embed.weight", 1.0), ("model.layers.1.w", 2.0), ("model.layers.2.w", 3.0)]:
        assert_close(merged[name], (a[name] + w * b[name]) / (1 + w), msg=name)
    # slerp: t runs 0 -> 1 over the layers for tensors named "...layers..."; the others (outside
    # the layers) match only the fallback entry, t = 1: the second model
    t = [{"filter": "layers", "value": [0.0, 1.0]}, {"value": 1.0}]
    merged = _merge(tmp_path, "slerp", {"t": t}, models, None)
    assert_close(merged["model.layers.0.w"], a["model.layers.0.w"])
    assert_close(merged["model.layers.2.w"], b["model.layers.2.w"])
    assert_close(merged["embed.weight"], b["embed.weight"])
    assert SlerpParams(t=t).t != 0.5


def test_della_band_is_checked_per_tensor_at_merge_time(tmp_path: Path) -> None:
    base_dir, models, _, _ = _checkpoints(tmp_path)
    # density 0.5 -> 0.1 over the layers: 0.1 at the last layer with epsilon 0.15 leaves the band
    # (the spec alone cannot tell: the band depends on the resolved values)
    with pytest.raises(InvalidParameters, match="model.layers.2.w") as info:
        _merge(tmp_path, "della", {"density": [0.5, 0.1], "epsilon": 0.15}, models, base_dir)
    assert info.value.code == "invalid_params"
    assert not any((tmp_path / "out").iterdir())


def test_per_model_lambda_scales_that_model_s_term_only() -> None:
    """theta_0 + sum_i lambda_i w_i tau_i' [agree_i] / divisor: the election and the divisor do not see lambda_i."""
    base = torch.zeros(4)
    tau0, tau1 = T([1.0, -2.0, 0.5, 3.0]), T([-3.0, 1.0, 0.5, 0.9])
    # task arithmetic: 0.5 * tau0 + 2 * tau1 (model 1 has no lambda of its own: the method's, 2)
    values = TensorValues({"scaling_factor": 2.0}, {0: {"lambda": 0.5}, 1: {}})
    out = task_arithmetic(base, [tau0, tau1], [1.0, 1.0], GeneralizedTaskArithmeticParams(scaling_factor=2.0),
                          values=values)  # fmt: skip
    assert_close(out, 0.5 * tau0 + 2.0 * tau1)
    # ties at density 1: signs elected from tau0 + tau1 = [-2, -1, 1, 3.9] as without lambdas; agreeing terms
    # scaled by their own lambda, divided by the agreeing weights: [-3*3, -2*1, (0.5*1 + 0.5*3)/2, (3*1 + 0.9*3)/2]
    ties = TiesParams(density=1.0).to_gta()
    values = TensorValues({"scaling_factor": 1.0}, {0: {"lambda": 1.0}, 1: {"lambda": 3.0}})
    out = task_arithmetic(base, [tau0, tau1], [1.0, 1.0], ties, values=values)
    assert_close(out, T([-9.0, -2.0, 1.0, 2.85]))
    # every model with the same lambda: the method's lambda
    same = TensorValues({"scaling_factor": 1.0}, {0: {"lambda": 0.7}, 1: {"lambda": 0.7}})
    scaled = task_arithmetic(base, [tau0, tau1], [1.0, 1.0], ties.model_copy(update={"scaling_factor": 0.7}))
    assert_close(task_arithmetic(base, [tau0, tau1], [1.0, 1.0], ties, values=same), scaled)


def test_stream_applies_a_per_model_lambda_gradient(tmp_path: Path) -> None:
    base_dir, models, base, taus = _checkpoints(tmp_path)
    # model 1's lambda runs 0 -> 2 over the 3 layers (0 outside them); model 0 keeps the method's 0.5
    merged = _merge(
        tmp_path, "task_arithmetic", {"scaling_factor": 0.5}, models, base_dir, model_parameters=[{}, {"lambda": [0.0, 2.0]}]
    )  # fmt: skip
    for name, lam1 in [("embed.weight", 0.0), ("model.layers.0.w", 0.0), ("model.layers.1.w", 1.0),
                       ("model.layers.2.w", 2.0), ("lm_head.weight", 0.0)]:  # fmt: skip
        assert_close(merged[name], 0.5 * taus[0][name] + lam1 * taus[1][name], msg=name)
    spec = _spec({}, "dare_ties", parameters={"lambda": [0.5, 1.5], "density": 0.4})
    assert spec.models[0].parameters["lambda"] == [0.5, 1.5]
    card = to_mergekit(spec.model_dump(mode="json"))
    assert card.config is not None and card.config["models"][0]["parameters"]["lambda"] == [0.5, 1.5]
    assert "ignores a per-model value" in card.reason


def test_stream_refuses_per_model_parameters_the_method_lacks(tmp_path: Path) -> None:
    base_dir, models, _, _ = _checkpoints(tmp_path)
    with pytest.raises(InvalidParameters, match="'gamma'"):
        _merge(tmp_path, "ties", {}, models, base_dir, model_parameters=[{"gamma": 0.1}, {}])
    with pytest.raises(InvalidParameters, match="outside"):
        _merge(tmp_path, "ties", {}, models, base_dir, model_parameters=[{"density": [0.5, 1.5]}, {}])


# --------------------------------------------------------------------------- the job spec
_BODY: dict[str, Any] = {
    "method": {"name": "ties", "params": {}},
    "models": [{"uri": "s3://models/a/"}, {"uri": "s3://models/b/", "weight": 0.5}],
    "base_model": {"uri": "s3://models/base/"},
}


def _spec(params: dict[str, Any] | None = None, method: str = "ties", **model0: Any) -> JobSpec:
    body = copy.deepcopy(_BODY)
    body["method"] = {"name": method, "params": params or {}}
    body["models"][0].update(model0)
    if method in ("slerp", "linear", "multislerp"):
        del body["base_model"]
    return JobSpec.model_validate(body)


def test_spec_accepts_per_model_gradients_and_filter_lists() -> None:
    spec = _spec(
        {"density": [0.2, 0.8]}, parameters={"density": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.5}]}
    )
    assert spec.models[0].parameters["density"] == [
        FilterOverride(filter="mlp", value=[0.1, 0.9]),
        FilterOverride(value=0.5),
    ]
    again = JobSpec.model_validate(spec.model_dump(mode="json"))  # the worker re-validates the stored spec
    assert again == spec


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"parameters": {"foo": 0.5}}, "unknown per-model parameter 'foo'"),
        ({"parameters": {"scaling_factor": 0.5}}, "mergekit's name 'lambda'"),
        ({"parameters": {"lambda": 500}}, r"lambda: 500 is outside \[-100, 100\]"),
        ({"parameters": {"gamma": 0.1}}, "no per-model parameter 'gamma'"),
        ({"parameters": {"density": [0.5, 1.5]}}, r"density \(gradient element 1\): 1.5 is outside \(0, 1\]"),
        ({"parameters": {"density": [{"filter": "mlp", "value": 0}]}}, r"filter entry 0 \('mlp'\)"),
        ({"parameters": {"density": [{"filter": "mlp"}]}}, r"value\s+Field required"),
        ({"parameters": {"density": []}}, "at least 1 item"),
        ({"parameters": {"density": "high"}}, "must be a number, a list of numbers"),
        ({"parameters": {"weight": 2.0}, "weight": 3.0}, "give the model's weight once"),
        ({"parameters": {"weight": [1.0, 0.0]}}, r"weight \(gradient element 1\): 0 is outside"),
    ],
)
def test_spec_refuses_bad_per_model_parameters(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _spec(**kwargs)


def test_spec_refuses_what_the_method_cannot_do() -> None:
    with pytest.raises(ValidationError, match=r"\(gradient element 2\)"):
        _spec({"density": [0.2, 0.5, 0.0]})
    with pytest.raises(ValidationError, match="topk_scope='model' needs one number"):
        _spec({"topk_scope": "model", "density": [0.2, 0.5]})
    with pytest.raises(ValidationError, match="per-model density does not fit topk_scope='model'"):
        _spec({"topk_scope": "model"}, parameters={"density": 0.3})
    with pytest.raises(ValidationError, match="della: density"):
        _spec({}, "della", parameters={"density": 0.1})
    with pytest.raises(ValidationError, match=r"it takes: none"):
        _spec({}, "slerp", parameters={"weight": 2.0})
    with pytest.raises(ValidationError, match=r"t \(gradient element 0\)"):
        _spec({"t": [-0.5, 1.0]}, "slerp")
    with pytest.raises(ValidationError, match=r"no per-model parameter 'lambda' for this method \(it takes: none\)"):
        _spec({}, "slerp", parameters={"lambda": 0.5})
    with pytest.raises(ValidationError, match=r"no per-model parameter 'lambda' for this method \(it takes: weight\)"):
        _spec({}, "tsv_merge", parameters={"lambda": 0.5})
    with pytest.raises(ValidationError, match="takes no per-model parameters"):
        JobSpec.model_validate(
            {
                "method": {"name": "weight_average", "params": {}},
                "models": [{"uri": "s3://models/a.safetensors", "parameters": {"weight": 2.0}}]
                + [{"uri": "s3://models/b.safetensors"}],
                "architecture": {"name": "mlp", "config": {}},
            }
        )


def test_mergekit_yaml_shows_per_model_parameters_and_gradients() -> None:
    spec = _spec(
        {"density": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}], "scaling_factor": [1.0, 0.5]},
        parameters={"density": [0.1, 0.5], "weight": [0.3, 1.0]},
    )
    config = yaml.safe_load(to_mergekit(spec.model_dump(mode="json")).yaml or "")
    assert config["models"][0] == {
        "model": "s3://models/a/",
        "parameters": {"weight": [0.3, 1.0], "density": [0.1, 0.5]},
    }
    assert config["models"][1] == {
        "model": "s3://models/b/",
        "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}]},
    }
    assert config["parameters"]["lambda"] == [1.0, 0.5]
    slerp = _spec({"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]}, "slerp")
    config = yaml.safe_load(to_mergekit(slerp.model_dump(mode="json")).yaml or "")
    assert config["parameters"] == {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.5}]}


def test_a_gradient_longer_than_the_layer_count_fails_the_merge(tmp_path: Path) -> None:
    """Bad input (issue: per-layer parameters): 5 anchors for a 2-layer checkpoint is refused, naming it."""
    from safetensors.torch import save_file

    from mudsc_core.errors import InvalidParameters
    from mudsc_core.same_base.stream import merge_checkpoints

    names = ["model.layers.0.w", "model.layers.1.w", "model.embed.weight"]
    paths = []
    for i, scale in enumerate((0.0, 1.0, 2.0)):
        path = tmp_path / f"m{i}.safetensors"
        save_file({n: torch.full((3,), scale) for n in names}, path)
        paths.append(path)
    with pytest.raises(InvalidParameters, match="gradient of 5 values for a checkpoint of 2 layers"):
        merge_checkpoints(
            "ties",
            {"density": [0.1, 0.2, 0.3, 0.4, 0.5]},
            paths[1:],
            paths[0],
            [1.0, 1.0],
            tmp_path / "out",
            dtype="float32",
            shard_size_bytes=1 << 30,
        )
    merge_checkpoints(
        "ties",
        {"density": [0.2, 0.5]},
        paths[1:],
        paths[0],
        [1.0, 1.0],
        tmp_path / "ok",
        dtype="float32",
        shard_size_bytes=1 << 30,
    )
