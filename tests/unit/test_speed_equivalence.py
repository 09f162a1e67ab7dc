"""The fast paths of MuDSC (issue 12) give the results of the straightforward computations.

- activation correlations: float32 GEMMs on shifted activations, summed in float64, stay within 1e-6
  of a float64 computation on ReLU outputs of a conv net and on badly centred data;
- weight similarities rebuilt only where a dependency changed: the same matching as rebuilding all;
- the pair score of a matching read from its members' entries equals the dense U^T S U definition.
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
from mudsc_core.permutation.iteration import find_correspondences
from mudsc_core.permutation.similarity import (
    CorrelationAccumulator,
    Correspondence,
    HookTaps,
    _site_features,
    activation_correlations,
    covariance_to_correlation,
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
