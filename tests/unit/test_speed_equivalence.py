"""The fast paths of MuDSC (issue 12) give the results of the straightforward computations.

- activation correlations: float32 GEMMs on shifted activations, summed in float64, stay within 1e-6
  of a float64 computation on ReLU outputs of a conv net and on badly centred data;
- weight similarities rebuilt only where a dependency changed: the same matching as rebuilding all;
- the pair score of a matching read from its members' entries equals the dense U^T S U definition;
- weight correlations by float32 GEMMs on float64-centred features stay within 1e-6 of float64, and other
  groups' axes mapped by index equal the dense (n, m) matrix products: the same matching.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mudsc_core.architectures import build_model, perm_spec, trace_architecture
from mudsc_core.errors import ComputeOverflow
from mudsc_core.permutation import iteration
from mudsc_core.permutation import similarity as similarity_module
from mudsc_core.permutation.iteration import find_correspondences
from mudsc_core.permutation.permute import expand_matrix
from mudsc_core.permutation.similarity import (
    CorrelationAccumulator,
    Correspondence,
    HookTaps,
    UnitMap,
    _map_axis,
    _site_features,
    activation_correlations,
    covariance_to_correlation,
    row_correlation,
)
from mudsc_core.schema import ArchitectureSpec, MethodSpec

RESNET = ArchitectureSpec(name="resnet", config={"depth": 8, "width": 2, "num_classes": 10})


def _exact(features: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of (U, S) rows in float64 (two passes: centred exactly)."""
    x = features.to(torch.float64)
    x = x - x.mean(dim=1, keepdim=True)
    return covariance_to_correlation(x @ x.T / x.shape[1])


def _networks(seed: int = 0) -> tuple[list[nn.Module], torch.Tensor]:
    inputs = torch.randn(96, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    networks = []
    for model_seed in (seed + 1, seed + 2):
        torch.manual_seed(model_seed)
        network = build_model(RESNET).train()
        with torch.no_grad():
            network(inputs)  # BatchNorm statistics of its own, as a trained network has
        networks.append(network.eval())
    return networks, inputs


def test_activation_correlations_of_relu_outputs_match_float64() -> None:
    networks, inputs = _networks()
    spec = trace_architecture(RESNET).spec
    batches = [inputs[:40], inputs[40:]]  # uneven batches: a partial slice of samples too
    got = activation_correlations(networks, spec, batches)
    for group, corr in got.items():
        site = spec.groups[group].activation
        features = []
        for network in networks:  # forward hooks: a path of its own to the sites' tensors
            taps = HookTaps(network, spec, [group])
            with torch.no_grad():
                features.append(torch.cat([_site_features(site, taps(batch)[group]) for batch in batches], dim=1))
            taps.close()
        expected = _exact(torch.cat(features))
        assert (corr - expected).abs().max() <= 1e-6, group


@pytest.mark.parametrize("offset", [0.0, 1e3, 3e4])
def test_badly_centred_float32_data_stays_within_1e_6(offset: float) -> None:
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(24, 40_000, generator=generator)
    mixing = torch.randn(24, 24, generator=generator) * 0.3 + torch.eye(24)
    x = (mixing @ base + offset).to(torch.float32)  # correlated units, far from zero
    x[7] = torch.relu(x[7] - offset) + offset  # half the samples one constant value
    expected = _exact(x)
    accumulator = CorrelationAccumulator()
    for chunk in x.split(9_000, dim=1):
        accumulator.update(chunk)
    assert (accumulator.correlation() - expected).abs().max() <= 1e-6
    blocks = CorrelationAccumulator()  # two models' unit blocks: only the upper products computed
    for chunk in x.split(9_000, dim=1):
        blocks.update_blocks([chunk[:10], chunk[10:]])
    assert (blocks.finalize() - expected).abs().max() <= 1e-6


def test_products_beyond_float32_are_computed_in_float64() -> None:
    x = torch.randn(6, 3000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[2] *= 1e25  # finite float32, its squares are not
    accumulator = CorrelationAccumulator()
    accumulator.update(x.to(torch.float32))
    assert (accumulator.correlation() - _exact(x.to(torch.float32))).abs().max() <= 1e-6


def test_non_finite_activations_name_the_model_and_group() -> None:
    networks, inputs = _networks()
    spec = trace_architecture(RESNET).spec
    with torch.no_grad():
        networks[1].conv1.weight[0] = float("inf")
    with pytest.raises(ComputeOverflow, match="model 1: activations of group"):
        activation_correlations(networks, spec, [inputs[:32]])
    accumulator = CorrelationAccumulator()
    values = torch.randn(4, 50)
    values[3, 7] = float("nan")
    assert accumulator.update_blocks([values[:2], values[2:]]) == [1]


@pytest.mark.parametrize("mode", ["align", "zip"])
def test_cached_weight_similarities_give_the_same_matching(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reused similarities and matches (unchanged dependencies) against rebuilding every one each time."""
    networks, inputs = _networks(3)
    spec = perm_spec(RESNET)
    states = [{k: v.detach().clone() for k, v in n.state_dict().items()} for n in networks]
    sims = activation_correlations(networks, spec, [inputs])
    params = MethodSpec(name="mudsc", params={"mode": mode, "beta": 0.5}).typed_params().to_mudsc()
    calls = {"weight": 0}
    real = iteration.weight_similarity

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["weight"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(iteration, "weight_similarity", counted)
    fast = find_correspondences(states, spec, params, sims)
    cached_calls, calls["weight"] = calls["weight"], 0
    # A cache bounded to one group's matrix (the oldest evicted), then none at all (rebuild every time).
    widest = max(spec.groups.values(), key=lambda g: g.size).size * len(states)
    monkeypatch.setattr(iteration, "SIMILARITY_CACHE_BYTES", widest**2 * 8)
    bounded = find_correspondences(states, spec, params, sims)
    bounded_calls, calls["weight"] = calls["weight"], 0
    monkeypatch.setattr(iteration, "SIMILARITY_CACHE_BYTES", 0)  # never reuse
    monkeypatch.setattr(iteration, "_same_correspondence", lambda a, b: False)
    slow = find_correspondences(states, spec, params, sims)
    for other in (bounded, slow):
        assert fast.objective_per_sweep == other.objective_per_sweep
        assert fast.group_scores == other.group_scores
        for group, correspondence in fast.correspondences.items():
            for a, b in zip(correspondence.unmerge, other.correspondences[group].unmerge, strict=True):
                assert torch.equal(a, b)
    assert cached_calls <= bounded_calls < calls["weight"]


def _dense_pair_score(correspondence: Correspondence, similarity: torch.Tensor) -> float:
    """The definition: diag(U^T S U) - U^T diag(S) per merged unit, over its ordered pairs' count."""
    unmerge = torch.cat(correspondence.unmerge, dim=0).to(torch.float64)
    sim = similarity.to(torch.float64)
    totals = ((unmerge.T @ sim) * unmerge.T).sum(dim=1) - unmerge.T @ torch.diagonal(sim)
    counts = unmerge.sum(dim=0)
    pairs = counts * (counts - 1)
    merged = pairs > 0
    return float((totals[merged] / pairs[merged]).mean()) if bool(merged.any()) else 0.0


@settings(max_examples=60, deadline=None)
@given(
    models=st.integers(1, 4),
    units=st.integers(1, 40),
    merged_ratio=st.floats(0.05, 1.0),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_pair_score_equals_the_dense_definition(
    models: int, units: int, merged_ratio: float, weighted: bool, seed: int
) -> None:
    """Any assignment of units to merged units (align, zip, reduced, singletons), 0/1 or weighted unmerge."""
    g = torch.Generator().manual_seed(seed)
    width = max(1, round(units * merged_ratio))
    ids = torch.randint(0, width, (models * units,), generator=g)
    values = torch.rand(models * units, generator=g) + 0.5 if weighted else torch.ones(models * units)
    unmerge = torch.zeros(models * units, width)
    unmerge[torch.arange(models * units), ids] = values
    parts = list(unmerge.split(units))
    correspondence = Correspondence(merge=parts, unmerge=parts)
    sim = torch.randn(models * units, models * units, generator=g)
    expected = _dense_pair_score(correspondence, sim + sim.T)
    assert iteration.pair_score(correspondence, sim + sim.T) == pytest.approx(expected, rel=1e-12, abs=1e-12)


# --------------------------------------------------------------------------- weight similarities
@pytest.mark.parametrize("chunk", [None, 64 * 700])  # one slice; slices of 512 columns (runs of 256)
@pytest.mark.parametrize("offset", [0.0, 1e3, 3e4])
def test_row_correlation_stays_within_1e_6_of_float64(offset: float, chunk: int | None) -> None:
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(64, 20_000, generator=generator)
    mixing = torch.randn(64, 64, generator=generator) * 0.3 + torch.eye(64)
    scales = torch.rand(64, 1, generator=generator) * 10 + 0.01
    x = ((mixing @ base) * scales + offset).to(torch.float32)  # wide, correlated rows, far from zero
    x[7] = torch.relu(x[7] - offset) + offset  # half the columns one constant value
    x[11] = offset + 2.0  # constant rows: correlate 0, their diagonal too
    x[12] = 0.0
    got = row_correlation(x, chunk_elements=chunk)
    expected = _exact(x)
    assert (got - expected).abs().max() <= 1e-6
    assert torch.equal(got, got.T)
    for row in (11, 12):
        assert not got[row].any() and not got[:, row].any()


def test_row_correlation_computes_beyond_float32_in_float64() -> None:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(40, 3000, generator=generator)
    x[2] *= 1e25  # finite float32, its products are not
    signs = torch.rand(3000, generator=generator) < 0.1
    x[3] = torch.where(signs, 3.3e38, -3.3e38) + x[3] * 1e30  # finite, but not once centred (mean ~ -2.6e38)
    got = row_correlation(x, chunk_elements=40 * 300)
    assert torch.isfinite(got).all()
    assert (got - _exact(x)).abs().max() <= 1e-6


def _correspondence(mode: str, models: int, n: int, width: int, g: torch.Generator) -> Correspondence:
    """Random align (a permutation per model) or zip (any merged unit per unit) correspondence."""
    unmerges = []
    for _ in range(models):
        labels = torch.randperm(n, generator=g) if mode == "align" else torch.randint(0, width, (n,), generator=g)
        unmerge = torch.zeros(n, width if mode == "zip" else n)
        unmerge[torch.arange(n), labels] = 1.0
        unmerges.append(unmerge)
    stacked = torch.cat(unmerges)
    merge = list((stacked / stacked.sum(dim=0).clamp_min(1.0)).split(n))
    index = [u.argmax(dim=0) for u in unmerges] if mode == "align" else None
    return Correspondence(merge=merge, unmerge=unmerges, index=index)


@settings(max_examples=80, deadline=None)
@given(
    mode=st.sampled_from(["align", "zip"]),
    models=st.integers(1, 3),
    num_blocks=st.integers(1, 3),
    block_size=st.integers(1, 6),
    merged_blocks=st.integers(1, 3),
    merged_block_size=st.integers(1, 8),
    expand=st.integers(1, 3),
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    axis_position=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_axes_mapped_by_index_equal_the_dense_product(
    mode: str,
    models: int,
    num_blocks: int,
    block_size: int,
    merged_blocks: int,
    merged_block_size: int,
    expand: int,
    shape: list[int],
    axis_position: int,
    seed: int,
) -> None:
    """Exactly for permutations (a gather), within float rounding for zip's means."""
    g = torch.Generator().manual_seed(seed)
    n = num_blocks * block_size
    width = n if mode == "align" else merged_blocks * merged_block_size
    correspondence = _correspondence(mode, models, n, width, g)
    blocks = num_blocks if mode == "align" else merged_blocks
    axis = min(axis_position, len(shape))
    sizes = list(shape)
    sizes.insert(axis, 2 + n * expand + 3)  # the group's segment between two of groups without one (sorted)
    tensor = torch.randn(*sizes, generator=g) * 10

    def mapped(values: torch.Tensor, mapping: torch.Tensor | UnitMap) -> torch.Tensor:
        return _map_axis(
            values, axis, [(0, 2, None), (2, 2 + n * expand, mapping), (2 + n * expand, sizes[axis], None)]
        )

    for model in range(models):
        unit_map = correspondence.merged_map(model)
        assert unit_map is not None and (unit_map.gather_only or mode == "zip")  # align: a gather
        dense = expand_matrix(correspondence.to_merged(model), num_blocks, blocks, expand)
        got, want = mapped(tensor, unit_map.expanded(num_blocks, blocks, expand)), mapped(tensor, dense)
        assert got.shape == want.shape
        if unit_map.gather_only:
            assert torch.equal(got, want)
        else:  # rounding of sums of a few products: relative to the sum of their magnitudes
            assert bool(((got - want).abs() <= 1e-6 * mapped(tensor.abs(), dense.abs()) + 1e-30).all())


def test_a_map_with_several_non_zeros_in_a_row_stays_dense() -> None:
    matrix = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
    assert UnitMap.from_matrix(matrix) is None
    one_hot = torch.tensor([[0.0, 0.5], [0.0, 0.0], [0.25, 0.0]])  # an empty row: weight 0
    unit_map = UnitMap.from_matrix(one_hot)
    assert unit_map is not None and not unit_map.gather_only
    tensor = torch.randn(4, 3)
    assert torch.equal(unit_map.apply(tensor, 1), tensor @ one_hot)
    deep = torch.zeros(20, 2)  # one merged unit of 19 units: beyond the gathers, an index_add_
    deep[:19, 0], deep[19, 1] = 1 / 19, 1.0
    deep_map = UnitMap.from_matrix(deep)
    assert deep_map is not None and deep_map.sources.shape[0] == 19
    values = torch.randn(3, 20)
    torch.testing.assert_close(deep_map.apply(values, 1), values @ deep, rtol=1e-6, atol=1e-6)


def _float64_row_correlation(features: torch.Tensor, chunk_elements: int | None = None) -> torch.Tensor:
    return _exact(features)


def _matching(mode: str, activations: bool) -> tuple[list[dict[str, torch.Tensor]], Any, Any, Any]:
    networks, inputs = _networks(5)
    spec = perm_spec(RESNET)
    states = [{k: v.detach().clone() for k, v in n.state_dict().items()} for n in networks]
    sims = activation_correlations(networks, spec, [inputs]) if activations else None
    params = MethodSpec(name="mudsc", params={"mode": mode, "beta": 0.5}).typed_params().to_mudsc()
    return states, spec, params, sims


def _assert_same_outcome(fast: Any, slow: Any) -> None:
    assert fast.objective_per_sweep == pytest.approx(slow.objective_per_sweep, rel=1e-6, abs=1e-9)
    for group, correspondence in fast.correspondences.items():
        for a, b in zip(correspondence.unmerge, slow.correspondences[group].unmerge, strict=True):
            assert torch.equal(a, b), group


@pytest.mark.parametrize("mode", ["align", "zip"])
@pytest.mark.parametrize("activations", [True, False])
def test_axes_mapped_by_index_give_the_same_matching(
    mode: str, activations: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other groups' axes mapped by index against dense (n, m) matrix products, from the first sweep on."""
    states, spec, params, sims = _matching(mode, activations)
    fast = find_correspondences(states, spec, params, sims)
    monkeypatch.setattr(Correspondence, "merged_map", lambda self, model: None)
    _assert_same_outcome(fast, find_correspondences(states, spec, params, sims))


# Zip on weights alone is left out: this net's weight similarities are dominated by entries every unit shares
# (BatchNorm scales of 1), its greedy choices by gaps of ~1e-6 between them (within float32 GEMMs' rounding).
@pytest.mark.parametrize("mode,activations", [("align", True), ("align", False), ("zip", True)])
def test_fast_weight_similarities_give_the_same_matching(
    mode: str, activations: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Float32 GEMMs and maps by index against float64 correlations of features mapped by dense matmuls."""
    states, spec, params, sims = _matching(mode, activations)
    fast = find_correspondences(states, spec, params, sims)
    monkeypatch.setattr(similarity_module, "row_correlation", _float64_row_correlation)
    monkeypatch.setattr(Correspondence, "merged_map", lambda self, model: None)  # dense (n, m) products
    _assert_same_outcome(fast, find_correspondences(states, spec, params, sims))


def test_weight_similarities_of_a_traced_net_stay_near_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every group, features mapped by sorting (no correspondence yet): worst measured 1.1e-6 (shared entries)."""
    states, spec, _params, _sims = _matching("zip", False)
    fast = {g: iteration.weight_similarity(states, spec, g, {}) for g in spec.group_order()}
    monkeypatch.setattr(similarity_module, "row_correlation", _float64_row_correlation)
    for group, similarity in fast.items():
        assert (similarity - iteration.weight_similarity(states, spec, group, {})).abs().max() <= 2e-6, group
