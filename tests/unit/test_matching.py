"""Tests of the matchers (docs/design/MUDSC.md §3): align, greedy zip (fast == reference), block structure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mudsc_core.errors import InvalidCalibration
from mudsc_core.permutation.matching import InvalidMatchInput, Match, align_match, zip_match, zip_match_reference

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- helpers
def correlation(acts: np.ndarray) -> torch.Tensor:
    """(units, units) float32 correlation of (samples, units) activations; dead units give 0 rows."""
    centred = acts - acts.mean(axis=0)
    std = centred.std(axis=0)
    alive = std > 0
    z = np.where(alive, centred / np.where(alive, std, 1.0), 0.0)
    return torch.from_numpy(z.T @ z / acts.shape[0]).float()


def random_similarity(
    seed: int, num_models: int, n: int, dead: float = 0.15, decimals: int | None = None
) -> torch.Tensor:
    """Correlation of ReLU low-rank + noise activations, some units dead; rounding makes ties."""
    rng = np.random.default_rng(seed)
    samples, units = 48, num_models * n
    acts = np.maximum(
        rng.normal(size=(samples, 3)) @ rng.normal(size=(3, units)) + rng.normal(size=(samples, units)), 0
    )
    acts[:, rng.random(units) < dead] = 0.0
    sim = correlation(acts)
    return sim if decimals is None else torch.round(sim, decimals=decimals)


def permuted_models(seed: int, n: int, perm: np.ndarray, noise: float = 0.05) -> torch.Tensor:
    """Similarity of model 0 (features X) and model 1 whose unit k is a noisy copy of X[:, perm[k]]."""
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.normal(size=(400, n)) + rng.normal(size=(400, 1)), 0)
    y = x[:, perm] + noise * rng.normal(size=(400, n))
    return correlation(np.concatenate([x, y], axis=1))


def stacked(mats: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(mats, dim=0)


def assert_same_match(a: Match, b: Match) -> None:
    for x, y in zip(a.merge + a.unmerge, b.merge + b.unmerge, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert a.score == b.score


def assert_valid_zip(match: Match, num_models: int, n: int, width: int) -> None:
    unmerge, merge = stacked(match.unmerge), stacked(match.merge)
    assert unmerge.shape == (num_models * n, width) and merge.shape == unmerge.shape
    assert unmerge.dtype == torch.float32 and merge.dtype == torch.float32
    assert set(unmerge.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(unmerge.sum(1), torch.ones(num_models * n))  # every unit exactly once
    assert (unmerge.sum(0) >= 1).all()  # every merged unit has a constituent
    torch.testing.assert_close(merge.sum(0), torch.ones(width))
    torch.testing.assert_close(merge, unmerge / unmerge.sum(0, keepdim=True))
    assert math.isfinite(match.score)


# --------------------------------------------------------------------------- align
@FAST
@given(seed=st.integers(0, 2**31), num_models=st.sampled_from([1, 2, 3]), n=st.integers(1, 10))
def test_align_gives_permutations(seed: int, num_models: int, n: int) -> None:
    match = align_match(random_similarity(seed, num_models, n), num_models)
    assert match.block_pairing is None and match.index is not None
    torch.testing.assert_close(match.index[0], torch.arange(n))
    for unmerge, merge, index in zip(match.unmerge, match.merge, match.index, strict=True):
        torch.testing.assert_close(unmerge.sum(0), torch.ones(n))
        torch.testing.assert_close(unmerge.sum(1), torch.ones(n))
        torch.testing.assert_close(merge, unmerge / num_models)
        torch.testing.assert_close(unmerge[index, torch.arange(n)], torch.ones(n))


@FAST
@given(seed=st.integers(0, 2**31), n=st.integers(2, 24))
def test_align_recovers_a_permutation(seed: int, n: int) -> None:
    perm = np.random.default_rng(seed).permutation(n)
    match = align_match(permuted_models(seed, n, perm), 2)
    # model 1's unit k copies model 0's unit perm[k], so merged unit j takes unit argsort(perm)[j]
    torch.testing.assert_close(match.index[1], torch.from_numpy(np.argsort(perm)))
    assert match.score > 0.9


def test_align_score_is_mean_pair_similarity() -> None:
    sim = torch.tensor([[1.0, 0.0, 0.2, 0.9], [0.0, 1.0, 0.7, 0.1], [0.2, 0.7, 1.0, 0.0], [0.9, 0.1, 0.0, 1.0]])
    match = align_match(sim, 2)
    torch.testing.assert_close(match.index[1], torch.tensor([1, 0]))
    assert match.score == pytest.approx((0.9 + 0.7) / 2)


# --------------------------------------------------------------------------- zip
def test_zip_known_answer() -> None:
    # a0-b1 0.9 and a1-b0 0.8 are the best pairs; same-model pairs are weak.
    sim = torch.tensor([[1.0, 0.1, 0.2, 0.9], [0.1, 1.0, 0.8, 0.3], [0.2, 0.8, 1.0, 0.0], [0.9, 0.3, 0.0, 1.0]])
    for matcher in (zip_match, zip_match_reference):
        match = matcher(sim, 2)
        torch.testing.assert_close(match.unmerge[0], torch.eye(2))
        torch.testing.assert_close(match.unmerge[1], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        torch.testing.assert_close(match.merge[1], torch.tensor([[0.0, 0.5], [0.5, 0.0]]))
        assert match.score == pytest.approx(0.85)
        assert match.index is None and match.block_pairing is None


def test_zip_tie_rule_on_dead_units() -> None:
    # All units dead: every similarity is exactly 0. Tie rule: (0, 1) first, a same-model
    # fusion that spends model 0's budget of 1 and closes its block; then (0, 2).
    sim = torch.zeros(4, 4)
    for matcher in (zip_match, zip_match_reference):
        match = matcher(sim, 2)
        torch.testing.assert_close(stacked(match.unmerge), torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1]]))
        assert match.score == 0.0


def test_zip_keeps_fusing_when_everything_is_closed() -> None:
    # budget 0 closes both models, alpha <= 0 closes each fused unit to its models: after one
    # fusion every pair is -inf, yet the target width 1 must still be reached.
    sim = random_similarity(3, 2, 3)
    for matcher in (zip_match, zip_match_reference):
        match = matcher(sim, 2, reduce=5 / 6, alpha=-1.0, budget=0.0)
        assert_valid_zip(match, 2, 3, 1)
    assert_same_match(zip_match(sim, 2, reduce=5 / 6, alpha=0.0, budget=0.0), match)


def test_zip_budget_zero_fuses_across_models_only() -> None:
    sim = random_similarity(11, 2, 12)
    match = zip_match(sim, 2, budget=0.0)
    # width n, n cross-model fusions possible, none within a model: a permutation
    torch.testing.assert_close(match.unmerge[0].sum(0), torch.ones(12))
    torch.testing.assert_close(match.unmerge[1].sum(0), torch.ones(12))


@FAST
@given(
    seed=st.integers(0, 2**31),
    num_models=st.sampled_from([1, 2, 3]),
    n=st.integers(1, 10),
    reduce=st.one_of(st.none(), st.floats(0.0, 0.95)),
)
def test_zip_width_and_structure(seed: int, num_models: int, n: int, reduce: float | None) -> None:
    num_units = num_models * n
    r = 1 - 1 / num_models if reduce is None else reduce
    width = round(num_units * (1 - r))
    if width < 1:
        with pytest.raises(InvalidMatchInput):
            zip_match(random_similarity(seed, num_models, n), num_models, reduce=reduce)
        return
    match = zip_match(random_similarity(seed, num_models, n), num_models, reduce=reduce)
    assert_valid_zip(match, num_models, n, width)
    if reduce is None:
        assert width == n


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    num_models=st.sampled_from([2, 3]),
    n=st.integers(1, 12),
    reduce=st.one_of(st.none(), st.floats(0.0, 0.9)),
    alpha=st.sampled_from([0.5, 1.0, 0.25, 2.0, 0.0, -1.0]),
    budget=st.sampled_from([0.0, 0.5, 1.0]),
    dead=st.sampled_from([0.0, 0.3, 1.0]),
    decimals=st.sampled_from([None, 1, 0]),
)
def test_zip_fast_equals_reference(
    seed: int,
    num_models: int,
    n: int,
    reduce: float | None,
    alpha: float,
    budget: float,
    dead: float,
    decimals: int | None,
) -> None:
    sim = random_similarity(seed, num_models, n, dead=dead, decimals=decimals)
    if round(num_models * n * (1 - (1 - 1 / num_models if reduce is None else reduce))) < 1:
        return
    kwargs = dict(reduce=reduce, alpha=alpha, budget=budget)
    fast, reference = zip_match(sim, num_models, **kwargs), zip_match_reference(sim, num_models, **kwargs)
    assert_same_match(fast, reference)


def test_zip_fast_equals_reference_larger() -> None:
    for seed, n in [(0, 60), (1, 80)]:
        for kwargs in (dict(), dict(alpha=0.0, budget=0.5), dict(reduce=0.7, budget=0.0)):
            sim = random_similarity(seed, 2, n, decimals=2)
            assert_same_match(zip_match(sim, 2, **kwargs), zip_match_reference(sim, 2, **kwargs))


def test_zip_score_is_mean_pair_similarity() -> None:
    sim = torch.tensor([[1.0, 0.5, 0.4], [0.5, 1.0, 0.3], [0.4, 0.3, 1.0]])
    match = zip_match(sim, 1, reduce=2 / 3, budget=10.0)  # all three units in one
    assert match.score == pytest.approx((0.5 + 0.4 + 0.3) / 3)
    assert zip_match(sim, 1).score == 0.0  # nothing fused


# --------------------------------------------------------------------------- block structure
def block_models(seed: int, blocks: int, size: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Model 1 = model 0 with its blocks permuted by ``block_perm`` and units inside each block shuffled."""
    rng = np.random.default_rng(seed)
    block_perm = rng.permutation(blocks)
    perm = np.concatenate([block_perm[b] * size + rng.permutation(size) for b in range(blocks)])
    return permuted_models(seed, blocks * size, perm), perm, block_perm


@FAST
@given(seed=st.integers(0, 2**31), blocks=st.integers(2, 4), size=st.integers(2, 6))
def test_group_align_recovers_block_and_unit_permutation(seed: int, blocks: int, size: int) -> None:
    sim, perm, block_perm = block_models(seed, blocks, size)
    match = align_match(sim, 2, num_blocks=blocks)
    # model 1's block b holds model 0's block block_perm[b]: merged block g takes argsort(block_perm)[g]
    torch.testing.assert_close(
        match.block_pairing, torch.from_numpy(np.stack([np.arange(blocks), np.argsort(block_perm)]))
    )
    torch.testing.assert_close(match.index[1], torch.from_numpy(np.argsort(perm)))


@FAST
@given(seed=st.integers(0, 2**31), num_models=st.sampled_from([2, 3]), blocks=st.integers(2, 4), size=st.integers(1, 5))
def test_group_align_keeps_blocks_whole_and_reuses_pairing(seed: int, num_models: int, blocks: int, size: int) -> None:
    n = blocks * size
    sim = random_similarity(seed, num_models, n)
    rng = np.random.default_rng(seed)
    given_pairing = torch.from_numpy(
        np.stack([np.arange(blocks)] + [rng.permutation(blocks) for _ in range(num_models - 1)])
    )
    before = given_pairing.clone()
    for pairing in (None, given_pairing):
        match = align_match(sim, num_models, num_blocks=blocks, block_pairing=pairing)
        assert match.block_pairing.shape == (num_models, blocks)
        if pairing is not None:
            torch.testing.assert_close(match.block_pairing, given_pairing)
        for model in range(num_models):
            for g in range(blocks):
                sources = match.index[model][g * size : (g + 1) * size] // size
                assert (sources == match.block_pairing[model, g]).all()
    torch.testing.assert_close(given_pairing, before)


@FAST
@given(
    seed=st.integers(0, 2**31),
    num_models=st.sampled_from([2, 3]),
    blocks=st.integers(2, 3),
    size=st.integers(1, 6),
    alpha=st.sampled_from([0.5, 0.0]),
    use_given=st.booleans(),
)
def test_group_zip_keeps_blocks_whole(
    seed: int, num_models: int, blocks: int, size: int, alpha: float, use_given: bool
) -> None:
    n = blocks * size
    sim = random_similarity(seed, num_models, n, decimals=1)
    rng = np.random.default_rng(seed)
    given_pairing = torch.from_numpy(
        np.stack([np.arange(blocks)] + [rng.permutation(blocks) for _ in range(num_models - 1)])
    )
    match = zip_match(
        sim, num_models, alpha=alpha, num_blocks=blocks, block_pairing=given_pairing if use_given else None
    )
    assert_valid_zip(match, num_models, n, n)
    pairing = match.block_pairing
    if use_given:
        torch.testing.assert_close(pairing, given_pairing)
    else:
        torch.testing.assert_close(pairing, align_match(sim, num_models, num_blocks=blocks).block_pairing)
    for g in range(blocks):
        units = torch.cat([model * n + pairing[model, g] * size + torch.arange(size) for model in range(num_models)])
        columns = slice(g * size, (g + 1) * size)
        block_unmerge = stacked(match.unmerge)[units]
        # the paired block set fills merged block g exactly, and nothing else
        torch.testing.assert_close(block_unmerge[:, columns].sum(1), torch.ones(units.numel()))
        reference = zip_match_reference(sim[units][:, units], num_models, alpha=alpha)
        torch.testing.assert_close(block_unmerge[:, columns], stacked(reference.unmerge), rtol=0, atol=0)


def test_group_zip_width_must_split_into_blocks() -> None:
    with pytest.raises(InvalidMatchInput):
        zip_match(random_similarity(0, 2, 4), 2, reduce=0.625, num_blocks=2)  # width 3


# --------------------------------------------------------------------------- inputs
def test_inputs_not_mutated() -> None:
    sim = random_similarity(5, 2, 6, decimals=1).double()  # float64: conversion would not copy
    before = sim.clone()
    pairing = torch.tensor([[0, 1], [1, 0]])
    pairing_before = pairing.clone()
    align_match(sim, 2)
    align_match(sim, 2, num_blocks=2, block_pairing=pairing)
    zip_match(sim, 2, alpha=0.0, budget=0.0)
    zip_match(sim, 2, num_blocks=2, block_pairing=pairing)
    zip_match_reference(sim, 2)
    torch.testing.assert_close(sim, before, rtol=0, atol=0)
    torch.testing.assert_close(pairing, pairing_before)


@pytest.mark.parametrize(
    "call",
    [
        lambda: zip_match(torch.zeros(4, 3), 2),
        lambda: zip_match(torch.zeros(5, 5), 2),
        lambda: align_match(torch.zeros(4, 4), 0),
        lambda: zip_match(torch.zeros(4, 4), 2, reduce=1.0),
        lambda: zip_match(torch.zeros(4, 4), 2, budget=-1.0),
        lambda: align_match(torch.zeros(6, 6), 2, num_blocks=2),
        lambda: align_match(torch.zeros(8, 8), 2, num_blocks=2, block_pairing=torch.tensor([[1, 0], [0, 1]])),
        lambda: align_match(torch.zeros(8, 8), 2, num_blocks=2, block_pairing=torch.tensor([[0, 1], [1, 1]])),
        lambda: zip_match(torch.zeros(8, 8), 2, num_blocks=2, block_pairing=torch.tensor([[0, 1]])),
    ],
)
def test_bad_inputs_raise_value_errors(call) -> None:
    with pytest.raises(InvalidMatchInput) as info:
        call()
    assert isinstance(info.value, ValueError)


def test_non_finite_similarity_is_a_calibration_error() -> None:
    sim = torch.zeros(4, 4)
    sim[0, 1] = sim[1, 0] = float("nan")
    with pytest.raises(InvalidCalibration):
        zip_match(sim, 2)
