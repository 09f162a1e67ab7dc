"""Transformer test bed (tests/transformer_testbed.py): BERT, GPT-2 and ViT pairs trained from two seeds on
the digits, merged with every permutation method, scored on held-out digits.

What holds at this size (2 layers, width 64; docs/mudsc_transformers.md has the table over 3 seed pairs):
plain averaging collapses to near chance; the best matching method lands well above it but, unlike the
small CNNs of the digits bed, no method comes close to the endpoints: on average they close a quarter to a
half of the gap, and on some seed pairs single methods do no better than averaging.
Every margin below holds, with slack, on each of seed pairs (0,1), (2,3), (4,5), (6,7), (8,9) (the quoted
minima are over those 5 pairs); the test runs seed pair (0, 1) only: one pair of each family trains and
merges in about 95 s of CPU on one thread.
"""

from __future__ import annotations

import pytest
import torch

from tests import transformer_testbed as tt

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

SEEDS = (0, 1)
CHANCE = 1 / tt.CLASSES
# Lowest test accuracy of a trained model, per family (measured minima over 10 models: 0.670, 0.843, 0.952).
ENDPOINT_FLOOR = {"bert": 0.60, "gpt2": 0.75, "vit": 0.90}
TEXT = ("bert", "gpt2")
ZIP = ("weight_zip", "zipit", "mudsc zip")
# Activation-only methods on GPT-2: the derived spec gives its attention and MLP groups no activation site
# (GPT-2's Conv1D layers), so the library refuses them; MuDSC there matches those groups in weight space.
NO_SITE = {("gpt2", "activation_align"), ("gpt2", "zipit")}


@pytest.fixture(scope="module")
def data() -> tt.Digits:
    return tt.load_digits()


@pytest.fixture(scope="module")
def runs(data: tt.Digits) -> dict[str, tt.PairRun]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; these models are tiny
    try:
        return {family: tt.run_pair(family, data, SEEDS) for family in tt.FAMILIES}
    finally:
        torch.set_num_threads(threads)


def _describe(run: tt.PairRun) -> str:
    merged = ", ".join(f"{label} {acc:.3f}" for label, acc in run.merged.items())
    return f"{run.family} {run.seeds}: models {run.models}; {merged}; failed {sorted(run.failed)}"


@pytest.mark.parametrize("family", tt.FAMILIES)
def test_endpoints_are_well_above_chance(runs: dict[str, tt.PairRun], family: str) -> None:
    run = runs[family]
    assert min(run.models) > ENDPOINT_FLOOR[family], _describe(run)


@pytest.mark.parametrize("family", tt.FAMILIES)
def test_plain_averaging_collapses(runs: dict[str, tt.PairRun], family: str) -> None:
    """Measured 0.10-0.32 against endpoints of 0.67-0.98 (gap >= 0.55)."""
    run = runs[family]
    average = run.merged["weight_average"]
    assert average < 0.40, _describe(run)
    assert average < run.endpoint - 0.40, _describe(run)


@pytest.mark.parametrize("family", tt.FAMILIES)
def test_every_method_runs_or_is_refused_for_lack_of_activation_sites(runs: dict[str, tt.PairRun], family: str) -> None:
    run = runs[family]
    for label, error in run.failed.items():
        assert (family, label) in NO_SITE, error
        assert error.startswith("SpecError") and "no activation site" in error, error
    assert set(run.merged) | set(run.failed) == {label for label, _, _ in tt.METHODS}
    assert {"weight_average", "git_rebasin", "weight_zip", "mudsc align", "mudsc zip"} <= set(run.merged)


@pytest.mark.parametrize("family", tt.FAMILIES)
def test_matching_recovers_part_of_the_gap(runs: dict[str, tt.PairRun], family: str) -> None:
    """The best matching method beats averaging (measured by >= 0.07, ViT (4,5); >= 0.17 elsewhere); none
    falls far below it (the worst: ViT (4,5), mudsc zip 0.08 under averaging)."""
    run = runs[family]
    average = run.merged["weight_average"]
    matched = {label: acc for label, acc in run.merged.items() if label != "weight_average"}
    assert max(matched.values()) > average + 0.03, _describe(run)
    assert min(matched.values()) > average - 0.10, _describe(run)


@pytest.mark.parametrize("family", tt.FAMILIES)
def test_zip_methods_stay_above_chance(runs: dict[str, tt.PairRun], family: str) -> None:
    """Measured minima: weight_zip 0.285, mudsc zip 0.217 (chance 0.10)."""
    run = runs[family]
    assert run.merged["weight_zip"] > CHANCE + 0.15, _describe(run)
    assert run.merged["mudsc zip"] > CHANCE + 0.08, _describe(run)


@pytest.mark.parametrize("label", ZIP)
@pytest.mark.parametrize("family", TEXT)
def test_text_transformers_zip_methods_beat_averaging(runs: dict[str, tt.PairRun], family: str, label: str) -> None:
    """BERT and GPT-2: every zip method beats averaging (measured by >= 0.074, BERT (6,7) zipit)."""
    run = runs[family]
    if label not in run.merged:
        assert (family, label) in NO_SITE, run.failed
        return
    assert run.merged[label] > run.merged["weight_average"] + 0.05, _describe(run)


@pytest.mark.parametrize("family", tt.FAMILIES)
def test_repair_lifts_mudsc_zip_to_a_good_part_of_the_gap(runs: dict[str, tt.PairRun], family: str) -> None:
    """MuDSC zip + REPAIR closes more than 0.15 of the gap on every family (measured 0.22-0.84 over pairs (0,1)
    .. (8,9), the lowest BERT (6,7); 0.61 / 0.57 / 0.67 for BERT / GPT-2 / ViT on (0,1)) and every repair site
    (each producing Linear/Conv1D/LayerNorm) ends at the interpolated std."""
    run = runs[family]
    assert run.gap_closed("mudsc zip + repair") > 0.15, _describe(run)
    repaired = run.reports["mudsc zip + repair"]["repair"]["groups"]
    assert repaired and all(g["std_ratio_after"] == pytest.approx(1.0, abs=0.02) for g in repaired.values())


@pytest.mark.parametrize("family", tt.FAMILIES)
def test_reports(runs: dict[str, tt.PairRun], family: str) -> None:
    run = runs[family]
    for label, report in run.reports.items():
        assert report["spec"]["capture"] == "export", label
        assert report["spec"]["self_check"]["max_rel_error"] < 1e-4, label
        assert report["heads"] == "shared"
        assert report["bn_reset"] is False  # LayerNorm only
        assert report["matching"] is (label != "weight_average")
    assert run.reports["git_rebasin"]["similarity_space"] == "weight"
    assert run.reports["mudsc zip"]["similarity_space"] == "dual"
    assert run.reports["mudsc zip"]["beta"] == 0.5
    if "zipit" in run.reports:
        assert run.reports["zipit"]["similarity_space"] == "activation"
