"""Same-base methods: known answers on small tensors, properties, and the streaming merge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch.testing import assert_close

from mudsc_core.errors import IncompatibleModels, InvalidCheckpoint, MergeCanceled, MergeError
from mudsc_core.io import load_state_dict, open_checkpoint, save_state_dict
from mudsc_core.same_base import sparsify as sp
from mudsc_core.same_base.model_stock import model_stock_delta
from mudsc_core.same_base.slerp import multislerp, slerp
from mudsc_core.same_base.stream import merge_checkpoints
from mudsc_core.same_base.svd import iso_c, iso_cts, tsv_merge
from mudsc_core.same_base.task_arithmetic import linear, task_arithmetic
from mudsc_core.schema.methods import (
    METHODS,
    DareLinearParams,
    DellaParams,
    TaskArithmeticParams,
    TiesParams,
)
from mudsc_core.schema.methods import (
    GeneralizedTaskArithmeticParams as GTA,
)

T = torch.tensor


# --------------------------------------------------------------------------- known answers
def test_linear_known_answer() -> None:
    a, b = T([1.0, 2.0]), T([3.0, 4.0])
    assert_close(linear([a, b], [1.0, 3.0]), T([2.5, 3.5]))
    assert_close(linear([a, b], [1.0, 3.0], normalize=False), T([10.0, 14.0]))


def test_task_arithmetic_known_answer() -> None:
    base = T([1.0, 1.0])
    out = task_arithmetic(
        base,
        [base + T([1.0, -2.0]), base + T([3.0, 1.0])],
        [1.0, 1.0],
        TaskArithmeticParams(scaling_factor=0.5).to_gta(),
    )
    assert_close(out, T([3.0, 0.5]))


def test_ties_known_answer() -> None:
    base = torch.zeros(4)
    tau1, tau2 = T([1.0, -2.0, 0.5, 3.0]), T([-3.0, 1.0, 0.5, 0.9])
    # trim to 2 of 4: tau1 -> [0,-2,0,3], tau2 -> [-3,1,0,0]; sum [-3,-1,0,3] elects [-,-,+,+];
    # disjoint mean over agreeing entries: [-3/1, -2/1, 0 (none agree), 3/1]
    out = task_arithmetic(base, [tau1, tau2], [1.0, 1.0], TiesParams(density=0.5).to_gta())
    assert_close(out, T([-3.0, -2.0, 0.0, 3.0]))
    # weights 1, 3: the weighted sum [-9, 1, 0, 3] now elects '+' at entry 1, where only
    # tau2 agrees: (3 * 1) / 3; entry 0: (3 * -3) / 3
    out = task_arithmetic(base, [tau1, tau2], [1.0, 3.0], TiesParams(density=0.5).to_gta())
    assert_close(out, T([-3.0, 1.0, 0.0, 3.0]))
    # count rule: sign counts [-1, 0, 0, +1] elect [-, +, +, +] (a tie goes to '+')
    out = task_arithmetic(base, [tau1, tau2], [1.0, 1.0], TiesParams(density=0.5, consensus="count").to_gta())
    assert_close(out, T([-3.0, 1.0, 0.0, 3.0]))


def test_magnitude_topk_exact_k_and_ties_by_index() -> None:
    x = T([1.0, -1.0, 1.0, 0.5])
    assert_close(sp.magnitude(x, 0.5), T([1.0, -1.0, 0.0, 0.0]))
    assert_close(sp.magnitude(x, 0.5, rescale=True), T([1.0, -1.0, 0.0, 0.0]) * (3.5 / 2.0))


def test_breadcrumbs_band_known_answer() -> None:
    x = torch.arange(1.0, 11.0) * T([1, -1] * 5)
    # density 0.5, gamma 0.1: drop the largest (10) and the 4 smallest; keep magnitudes 5..9
    kept = sp.breadcrumbs(x, 0.5, 0.1)
    assert_close(kept.abs(), T([0, 0, 0, 0, 5, 6, 7, 8, 9, 0.0]))
    # gamma small enough that no large value goes: the band still keeps `density` (mergekit keeps none)
    assert int((sp.breadcrumbs(x, 0.5, 0.0) != 0).sum()) == 5
    # density + gamma > 1: fewer large values are dropped
    assert int((sp.breadcrumbs(x, 0.95, 0.1) != 0).sum()) == 9


def test_dare_drop_and_rescale() -> None:
    tau = torch.linspace(0.1, 1.0, 1000)
    out = sp.random_drop(tau, 0.25, sp.rng_for(3, "w", 0))
    kept = out != 0
    assert_close(out[kept], tau[kept] / 0.25)
    assert 150 < int(kept.sum()) < 350
    assert torch.equal(out, sp.random_drop(tau, 0.25, sp.rng_for(3, "w", 0)))  # seeded
    assert not torch.equal(out, sp.random_drop(tau, 0.25, sp.rng_for(3, "w", 1)))  # per model
    assert_close(sp.random_drop(tau, 0.25, sp.rng_for(3, "w", 0), rescale=False)[kept], tau[kept])


def test_della_probabilities_and_rescale() -> None:
    probs = sp.della_keep_probabilities(T([[0.1, -0.3, 0.2]]).abs(), density=0.5, epsilon=0.1)
    assert_close(probs, T([[0.4, 0.6, 0.5]]))
    tau = torch.randn(4, 500, generator=torch.Generator().manual_seed(0))
    out = sp.della(tau, 0.5, 0.2, sp.rng_for(0, "w", 0))
    p = sp.della_keep_probabilities(tau.abs(), 0.5, 0.2)
    kept = out != 0
    assert_close(out[kept], (tau / p)[kept])
    big, small = tau.abs() > tau.abs().median(), tau.abs() <= tau.abs().median()
    assert kept[big].float().mean() > kept[small].float().mean()  # larger magnitudes survive more


def test_l1_norm_rescale_rule_is_mergekit_s() -> None:
    """rule="l1_norm": the same mask as the papers' rule, survivors times ||tau||_1 / ||kept||_1 (mergekit 0.1.5's
    rescaled_masked_tensor with RescaleNorm.l1), for DARE and DELLA alike."""
    tau = torch.randn(4, 500, generator=torch.Generator().manual_seed(0))
    for drop in (
        lambda rule: sp.random_drop(tau, 0.3, sp.rng_for(0, "w", 0), rule=rule),
        lambda rule: sp.della(tau, 0.5, 0.2, sp.rng_for(0, "w", 0), rule=rule),
    ):
        papers, l1 = drop("keep_probability"), drop("l1_norm")
        kept = papers != 0
        assert torch.equal(kept, l1 != 0)
        masked = tau * kept
        assert_close(l1, masked * (tau.abs().sum() / masked.abs().sum()))
        assert_close(l1.abs().sum(), tau.abs().sum())
    tiny = torch.full((10,), 1e-9)  # norms below mergekit's eps 1e-7: left unscaled, as there
    unscaled = sp.random_drop(tiny, 0.5, sp.rng_for(0, "t", 0), rescale=False)
    assert torch.equal(sp.random_drop(tiny, 0.5, sp.rng_for(0, "t", 0), rule="l1_norm"), unscaled)


def test_slerp_known_answers() -> None:
    v0, v1 = T([1.0, 0.0]), T([0.0, 1.0])
    assert_close(slerp(0.5, v0, v1), T([math.sqrt(0.5), math.sqrt(0.5)]))
    assert_close(slerp(1 / 3, v0, v1), T([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    assert_close(slerp(0.25, T([1.0, 1.0]), T([2.0, 2.0])), T([1.25, 1.25]))  # colinear: lerp


def test_multislerp_known_answers() -> None:
    v0, v1 = T([1.0, 0.0]), T([0.0, 1.0])
    assert_close(multislerp([v0, v1], [1.0, 1.0]), T([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6, rtol=0)
    # norms interpolate linearly: [2,0] and [0,2] -> same direction, norm 2
    assert_close(multislerp([2 * v0, 2 * v1], [1.0, 1.0]), T([math.sqrt(2), math.sqrt(2)]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        multislerp([v0, -v0, v0 * 0 + T([0.0, 0.0])], [1.0, 1.0, 1.0])


def test_model_stock_known_answers() -> None:
    assert_close(model_stock_delta([T([1.0, 0.0]), T([0.0, 1.0])]), T([0.0, 0.0]))  # orthogonal: t = 0
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    assert_close(model_stock_delta([T([1.0, 1.0]), T([1.0, 0.0])]), t * T([1.0, 0.5]))
    rows = model_stock_delta([T([[1.0, 0.0], [1.0, 1.0]]), T([[0.0, 1.0], [1.0, 1.0]])], filter_wise=True)
    assert_close(rows, T([[0.0, 0.0], [1.0, 1.0]]))  # row 0 orthogonal (t=0), row 1 identical (t=1)


def _rank_one(scale: float, i: int, n: int = 4) -> torch.Tensor:
    e = torch.zeros(n)
    e[i] = 1.0
    f = torch.zeros(n)
    f[(i + 1) % n] = 1.0
    return scale * torch.outer(e, f)


def test_tsv_of_orthogonal_task_vectors_is_their_sum() -> None:
    taus = [_rank_one(s, i) for i, s in enumerate([3.0, 2.0, 1.5, 1.0])]
    assert_close(tsv_merge(iter(taus), 4), sum(taus), atol=1e-5, rtol=0)
    assert_close(tsv_merge(iter([T([1.0, 2.0]), T([3.0, 4.0])]), 2), T([4.0, 6.0]))  # 1-D: task arithmetic


def test_tsv_decorrelates_overlapping_tasks() -> None:
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(6, 5, generator=g) for _ in range(2)]
    merged = tsv_merge(iter(taus), 2)
    u, s, vh = torch.linalg.svd(merged)
    kept = [torch.linalg.svdvals(t)[:2] for t in taus]  # k = int(5 / 2) = 2 per task
    assert_close(s[:4].sort().values, torch.cat(kept).sort().values, atol=1e-4, rtol=1e-4)


def test_iso_c_flattens_the_spectrum() -> None:
    out = iso_c(iter([torch.diag(T([4.0, 0.0])), torch.diag(T([0.0, 2.0]))]))
    assert_close(out, torch.diag(T([3.0, 3.0])))
    assert_close(iso_c(iter([T([1.0]), T([2.0])])), T([3.0]))


def test_iso_cts_full_common_space_is_iso_c_and_spectrum_is_flat() -> None:
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(8, 6, generator=g) for _ in range(3)]
    assert_close(iso_cts(taus, 1.0), iso_c(iter(taus)), atol=1e-5, rtol=1e-5)
    out = iso_cts(taus, 0.5)  # 3 common + 1 per task = 6 directions
    s = torch.linalg.svdvals(out)
    assert_close(s, torch.full_like(s, float(s.mean())), atol=1e-4, rtol=1e-4)


def _mergekit_gta(base, tensors, weights, sparse, consensus, normalize, lam=1.0):
    """mergekit's GTATask.execute, transcribed as a reference (stack everything)."""
    deltas = torch.stack([sparse(t - base) for t in tensors])
    w = torch.tensor(weights).view(-1, *([1] * base.dim()))
    weighted = deltas * w
    if consensus:
        sign = weighted.sign()
        total = weighted.sum(0) if consensus == "sum" else sign.sum(0)
        majority = (total >= 0).float() * 2 - 1
        mask = (sign == majority).float()
        mixed, divisor = (weighted * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(0), w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


@pytest.mark.parametrize("consensus", ["sum", "count", None])
@pytest.mark.parametrize("normalize", [True, False])
def test_family_matches_mergekit_reference(consensus, normalize) -> None:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(33, 17, generator=g)
    tensors = [base + 0.1 * torch.randn(33, 17, generator=g) for _ in range(3)]
    weights = [0.5, 1.0, 2.0]
    params = GTA(
        sparsifier="magnitude", density=0.3, consensus=consensus or "none", normalize=normalize, scaling_factor=0.7
    )
    expected = _mergekit_gta(base, tensors, weights, lambda d: sp.magnitude(d, 0.3), consensus, normalize, 0.7)
    assert_close(task_arithmetic(base, tensors, weights, params), expected)
    params = GTA(sparsifier="breadcrumbs", density=0.6, gamma=0.05, consensus=consensus or "none", normalize=normalize)
    expected = _mergekit_gta(base, tensors, weights, lambda d: sp.breadcrumbs(d, 0.6, 0.05), consensus, normalize)
    assert_close(task_arithmetic(base, tensors, weights, params), expected)


def test_family_blocks_match_unblocked(monkeypatch) -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(100, 50, generator=g)
    tensors = [base + torch.randn(100, 50, generator=g) for _ in range(3)]
    expected = task_arithmetic(base, tensors, [1.0] * 3, TiesParams(density=0.4).to_gta())
    monkeypatch.setattr(sp, "_CHUNK", 97)
    assert_close(task_arithmetic(base, tensors, [1.0] * 3, TiesParams(density=0.4).to_gta()), expected)


def test_params_validation() -> None:
    with pytest.raises(ValueError, match="density"):
        DellaParams(density=0.1, epsilon=0.2)
    with pytest.raises(ValueError):
        TiesParams(density=1.5)
    with pytest.raises(ValueError):
        TiesParams(densty=0.5)  # extra keys forbidden
    with pytest.raises(ValueError):
        TiesParams(density=20)  # fractions are fractions
    assert METHODS["slerp"].max_models == 2 and METHODS["ties"].requires_base
    assert not METHODS["linear"].requires_base and METHODS["ties"].family == "same_base"


# --------------------------------------------------------------------------- properties
_floats = st.floats(-10, 10, allow_nan=False, width=32)
_vectors = st.lists(_floats, min_size=1, max_size=24)


@settings(max_examples=40, deadline=None)
@given(_vectors, st.lists(_vectors, min_size=1, max_size=4), st.floats(-2, 2, allow_nan=False))
def test_ties_density_one_without_sign_election_is_task_arithmetic(base, others, lam) -> None:
    base_t = T(base)
    tensors = [T((o * len(base))[: len(base)]) for o in others]
    weights = [1.0 + i for i in range(len(tensors))]
    ties = TiesParams(density=1.0, consensus="none", normalize=False, scaling_factor=lam).to_gta()
    ta = TaskArithmeticParams(scaling_factor=lam).to_gta()
    assert_close(task_arithmetic(base_t, tensors, weights, ties), task_arithmetic(base_t, tensors, weights, ta))


@settings(max_examples=40, deadline=None)
@given(_vectors, st.integers(0, 2**31 - 1))
def test_dare_with_drop_rate_zero_is_identity(values, seed) -> None:
    tau = T(values)
    assert torch.equal(sp.random_drop(tau, 1.0, sp.rng_for(seed, "w", 0)), tau)
    base = torch.zeros_like(tau)
    out = task_arithmetic(base, [tau], [1.0], DareLinearParams(density=1.0, seed=seed).to_gta())
    assert torch.equal(out, tau)


@settings(max_examples=40, deadline=None)
@given(_vectors, st.lists(st.floats(0.1, 10), min_size=1, max_size=5))
def test_linear_of_identical_models_is_the_model(values, weights) -> None:
    model = T(values)
    assert_close(linear([model] * len(weights), weights), model)


@settings(max_examples=40, deadline=None)
@given(_vectors, _vectors)
def test_slerp_ends(a, b) -> None:
    v0 = T(a)
    v1 = T((b * len(a))[: len(a)])
    assert torch.equal(slerp(0.0, v0, v1), v0)
    assert torch.equal(slerp(1.0, v0, v1), v1)


@settings(max_examples=40, deadline=None)
@given(_vectors, _vectors, st.integers(2, 4))
def test_model_stock_of_identical_models_is_the_model(base, model, k) -> None:
    base_t = T(base)
    model_t = T((model * len(base))[: len(base)])
    delta = model_stock_delta([model_t - base_t] * k)
    assert_close(base_t + delta, model_t, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- streaming
def _models(tmp_path: Path, n: int = 3, **extra: torch.Tensor) -> tuple[Path, list[Path], dict]:
    g = torch.Generator().manual_seed(0)
    base = {
        "embed.weight": torch.randn(20, 8, generator=g),
        "layer.0.weight": torch.randn(8, 8, generator=g),
        "layer.0.bias": torch.randn(8, generator=g),
        "position_ids": torch.arange(5),
    }
    save_state_dict(base, tmp_path / "base")
    (tmp_path / "base" / "config.json").write_text('{"model_type": "toy"}')
    paths = []
    for i in range(n):
        state = {
            k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()
        }
        save_state_dict(state, tmp_path / f"m{i}", shard_size_bytes=300)
        paths.append(tmp_path / f"m{i}")
    return tmp_path / "base", paths, base


def _merge(method, params, models, base, out, **kw):
    kw.setdefault("dtype", "float32")
    kw.setdefault("shard_size_bytes", 2**30)
    return merge_checkpoints(method, params, models, base, [1.0] * len(models), out, **kw)


def test_stream_equals_in_memory_family_and_writes_layout(tmp_path: Path) -> None:
    base_dir, models, base = _models(tmp_path)
    seen = []
    report = _merge(
        "ties",
        {"density": 0.5},
        models,
        base_dir,
        tmp_path / "out",
        shard_size_bytes=400,
        spec_json={"method": {"name": "ties"}, "models": [{"uri": f"s3://b/m{i}/"} for i in range(3)]},
        progress=lambda stage, frac, msg: seen.append((stage, frac)),
    )
    out = tmp_path / "out"
    assert (out / "config.json").read_text() == '{"model_type": "toy"}'
    assert json.loads((out / "spec.json").read_text())["method"]["name"] == "ties"
    card = (out / "README.md").read_text()
    assert "ties" in card and "s3://b/m1/" in card and '"density": 0.5' in card
    assert (out / "model.safetensors.index.json").exists() and not list(out.glob(".partial-*"))
    merged = load_state_dict(out)
    states = [load_state_dict(m) for m in models]
    for name in ("embed.weight", "layer.0.weight", "layer.0.bias"):
        expected = task_arithmetic(base[name], [s[name] for s in states], [1.0] * 3, TiesParams(density=0.5).to_gta())
        assert_close(merged[name], expected)
    assert torch.equal(merged["position_ids"], base["position_ids"])
    assert report["tensors"] == 4 and {"read_s", "compute_s", "write_s", "total_s"} <= set(report["metrics"])
    assert seen[-1] == ("merging", 1.0) and all(s == "merging" for s, _ in seen)


# passthrough is excluded: a layer remap by the job's slices, not a per-tensor merge (tests/unit/test_passthrough.py)
@pytest.mark.parametrize(
    "method", sorted(n for n, i in METHODS.items() if i.family == "same_base" and n != "passthrough")
)
def test_every_method_streams_and_writes_the_asked_dtype(tmp_path: Path, method: str) -> None:
    base_dir, models, _ = _models(tmp_path)
    info = METHODS[method]
    models = models[:2] if info.max_models == 2 else models
    _merge(method, {}, models, base_dir if info.requires_base else None, tmp_path / "out", dtype="bfloat16")
    ckpt = open_checkpoint(tmp_path / "out")
    assert ckpt.dtype("embed.weight") == torch.bfloat16 and ckpt.dtype("position_ids") == torch.int64
    assert torch.isfinite(ckpt.get("layer.0.weight").float()).all()


def test_whole_model_ties_uses_one_threshold_per_model(tmp_path: Path) -> None:
    base = {"big": torch.zeros(10), "small": torch.zeros(10)}
    save_state_dict(base, tmp_path / "base")
    model = {"big": torch.linspace(10, 20, 10), "small": torch.linspace(0.1, 0.2, 10)}
    save_state_dict(model, tmp_path / "m0")
    save_state_dict(model, tmp_path / "m1")
    models = [tmp_path / "m0", tmp_path / "m1"]
    report = _merge("ties", {"density": 0.5, "topk_scope": "model"}, models, tmp_path / "base", tmp_path / "g")
    whole = load_state_dict(tmp_path / "g")
    assert_close(whole["big"], model["big"]) and torch.count_nonzero(whole["small"]) == 0
    assert any("whole model" in n for n in report["notes"])
    _merge("ties", {"density": 0.5}, models, tmp_path / "base", tmp_path / "t")
    per_tensor = load_state_dict(tmp_path / "t")
    assert torch.count_nonzero(per_tensor["small"]) == 5 and torch.count_nonzero(per_tensor["big"]) == 5


def test_histogram_threshold_keeps_at_least_k_within_a_bin() -> None:
    values = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    hist = sp.MagnitudeHistogram()
    hist.add(values[:50_000])
    hist.add(values[50_000:])
    thr = hist.threshold(20_000)
    kept = int((values.abs() >= thr).sum())
    assert 20_000 <= kept <= 20_000 * 1.01


def test_partial_and_base_missing_tensors_have_defined_behaviour(tmp_path: Path) -> None:
    base = {"shared": torch.zeros(3), "base_only": torch.ones(3)}
    save_state_dict(base, tmp_path / "base")
    save_state_dict({"shared": torch.full((3,), 2.0), "extra": torch.full((2,), 4.0)}, tmp_path / "m0")
    save_state_dict({"shared": torch.full((3,), 4.0)}, tmp_path / "m1")
    report = _merge("task_arithmetic", {}, [tmp_path / "m0", tmp_path / "m1"], tmp_path / "base", tmp_path / "o")
    out = load_state_dict(tmp_path / "o")
    assert_close(out["shared"], torch.full((3,), 6.0))
    assert_close(out["base_only"], torch.ones(3))
    assert_close(out["extra"], torch.full((2,), 4.0))  # mean over the models that have it
    assert len(report["notes"]) >= 3


def test_shape_mismatch_fails_naming_the_tensor_and_leaves_nothing(tmp_path: Path) -> None:
    base_dir, models, base = _models(tmp_path, n=2)
    save_state_dict({**base, "layer.0.weight": torch.zeros(8, 9)}, tmp_path / "bad")
    out = tmp_path / "out"
    with pytest.raises(IncompatibleModels, match="layer.0.weight"):
        _merge("ties", {}, [models[0], tmp_path / "bad"], base_dir, out)
    assert not out.exists() or not any(out.iterdir())


def test_nan_fails_naming_the_tensor_and_leaves_nothing(tmp_path: Path) -> None:
    base_dir, models, base = _models(tmp_path, n=2)
    broken = dict(base)
    broken["layer.0.bias"] = torch.full((8,), float("inf"))
    (tmp_path / "bad").mkdir()  # written with the safetensors library: our writer refuses to write an inf
    save_file(broken, tmp_path / "bad" / "model.safetensors")
    out = tmp_path / "out"
    with pytest.raises(InvalidCheckpoint, match="layer.0.bias"):
        _merge("task_arithmetic", {}, [models[0], tmp_path / "bad"], base_dir, out)
    assert not any(out.iterdir())


@pytest.mark.parametrize("where", ["base", "model 0", "model 1"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear"])
def test_one_non_finite_element_names_the_file_that_holds_it(
    tmp_path: Path, where: str, value: float, method: str
) -> None:
    """Inputs are checked through their task vectors' norms: one bad element, in the base or in any model,
    still fails naming that checkpoint (its folder) and the tensor."""
    base_dir, models, base = _models(tmp_path, n=2)
    broken = {k: v.clone() for k, v in base.items()}
    broken["layer.0.weight"].view(-1)[5] = value
    (tmp_path / "bad").mkdir()  # written with the safetensors library: our writer refuses to write NaN/Inf
    save_file(broken, tmp_path / "bad" / "model.safetensors")
    inputs = {"base": (models, tmp_path / "bad"), "model 0": ([tmp_path / "bad", models[1]], base_dir)}
    inputs["model 1"] = ([models[0], tmp_path / "bad"], base_dir)
    chosen, base_input = inputs[where]
    out = tmp_path / "out"
    with pytest.raises(InvalidCheckpoint, match=r"bad.*layer\.0\.weight|layer\.0\.weight.*bad") as caught:
        _merge(method, {}, chosen, base_input, out)
    assert "NaN or Inf" in str(caught.value)
    assert not any(out.iterdir())


def test_finite_inputs_whose_difference_overflows_are_not_blamed_on_a_checkpoint(tmp_path: Path) -> None:
    """model - base beyond float32 makes the norm inf although both inputs are finite: the re-check clears
    them, and the merge then fails as an overflow of the result, not as a broken checkpoint."""
    base_dir, models, base = _models(tmp_path, n=1)
    big = {k: v.clone() for k, v in base.items()}
    big["layer.0.weight"].view(-1)[0] = 3e38
    low = {k: v.clone() for k, v in base.items()}
    low["layer.0.weight"].view(-1)[0] = -3e38
    save_state_dict(big, tmp_path / "big")
    save_state_dict(low, tmp_path / "low")
    with pytest.raises(MergeError) as caught:
        _merge(
            "task_arithmetic", {"scaling_factor": 0.5}, [tmp_path / "big", models[0]], tmp_path / "low", tmp_path / "o"
        )
    assert not isinstance(caught.value, InvalidCheckpoint), caught.value
    assert type(caught.value).__name__ in {"OutputOverflow", "ComputeOverflow"}, caught.value


def test_cancel_propagates_and_leaves_nothing(tmp_path: Path) -> None:
    base_dir, models, _ = _models(tmp_path, n=2)

    def cancel(stage: str, fraction: float, message: str) -> None:
        if fraction > 0.3:
            raise MergeCanceled("canceled by user")

    out = tmp_path / "out"
    with pytest.raises(MergeCanceled):
        _merge("ties", {}, models, base_dir, out, progress=cancel)
    assert not any(out.iterdir())


def test_base_rules(tmp_path: Path) -> None:
    base_dir, models, _ = _models(tmp_path, n=2)
    with pytest.raises(ValueError, match="does not use a base"):
        _merge("linear", {}, models, base_dir, tmp_path / "o")
    with pytest.raises(ValueError, match="requires a base"):
        _merge("ties", {}, models, None, tmp_path / "o")
    with pytest.raises(ValueError):
        _merge("slerp", {}, models + models[:1], None, tmp_path / "o")


def test_single_file_inputs(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "base.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.full((2,), 3.0)}, tmp_path / "b.safetensors")
    _merge("linear", {}, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], None, tmp_path / "o")
    assert_close(load_state_dict(tmp_path / "o")["w"], torch.full((2,), 2.0))
    assert not (tmp_path / "o" / "config.json").exists()


@given(
    seed=st.integers(0, 2**31),
    n=st.integers(2, 300),
    distinct=st.integers(1, 8),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
@settings(max_examples=60, deadline=None)
def test_kth_largest_is_torch_kthvalue(seed: int, n: int, distinct: int, dtype: torch.dtype) -> None:
    """The CPU selection (numpy's introselect) is the same order statistic as torch.kthvalue, ties included."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, distinct, (n,), generator=g).to(dtype) * torch.rand(1, generator=g).to(dtype)
    for k in {1, n // 2 or 1, n - 1}:
        expected = torch.kthvalue(values, n - k + 1).values
        got = sp._kth_largest(values, k)
        assert got.dtype == expected.dtype and torch.equal(got, expected)
        mask = sp.topk_mask(values, k)
        assert int(mask.sum()) == k and bool(values[mask].min() >= values[~mask].max())
