"""Digits test bed (scikit-learn's bundled digits, no downloads): what must hold when merging.

Two small VGGs (BN) per seed pair (plus one ResNet-8 pair, same task), trained in seconds, on the same task (shared head)
and on disjoint label halves 0-4 / 5-9 (separate heads). Nothing is cached on disk. The
ranges quoted below were measured at this config on seed pairs (10,11), (12,13), (14,15),
(16,17); the test's own pairs (0,1), (2,3) pass with the same margins; the
full table (ResNet + VGG, 3 seed pairs, 20 epochs, beta sweep) is bench/mudsc_digits.py ->
docs/mudsc_digits.md.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from bench import mudsc_digits as md
from bench import testbed as tb

ARCH = {"name": "vgg", "config": {"in_channels": 1, "layers": [32, 32, "M", 64, 64], "num_classes": 10}}
EPOCHS = 10
SEED_PAIRS = ((0, 1), (2, 3))
MATCHING = ("git_rebasin", "activation_align", "zipit", "weight_zip", "mudsc align", "mudsc zip")
ZIP = ("zipit", "weight_zip", "mudsc zip")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data() -> tb.Digits:
    return tb.load_digits_data()


@pytest.fixture(scope="module")
def runs(data):
    """{setting: [(pair, rows)] per seed pair}; rows[(method label, reset_bn)] = scores + report."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; these models are tiny
    try:
        calibration = md.calibration_inputs(data)
        out = {}
        for setting in ("same", "disjoint"):
            out[setting] = []
            for seeds in SEED_PAIRS:
                pair = md.train_pair(ARCH, data, setting, seeds, EPOCHS)
                out[setting].append((pair, md.run_methods(pair, data, calibration)))
        return out
    finally:
        torch.set_num_threads(threads)


def _joint(rows, label, reset):
    return rows[(label, reset)]["joint"]


def _describe(runs, setting):
    lines = []
    for pair, rows in runs[setting]:
        lines.append(
            f"endpoint {pair.endpoint['joint']:.3f}: "
            + ", ".join(
                f"{label} {_joint(rows, label, False):.3f}->{_joint(rows, label, True):.3f}"
                for label, _, _ in md.METHODS
            )
        )
    return "\n".join(lines)


@pytest.mark.parametrize("setting", ["same", "disjoint"])
def test_endpoints_are_good(runs, setting):
    for pair, _ in runs[setting]:
        assert min(pair.endpoint_models) > 0.95, pair.endpoint_models
        assert pair.endpoint["joint"] > 0.93, pair.endpoint  # disjoint: ensemble of the two originals


@pytest.mark.parametrize("setting", ["same", "disjoint"])
def test_plain_averaging_collapses(runs, setting):
    # measured (this config, 4 seed pairs): 0.10-0.17 same task, 0.10-0.34 disjoint; endpoints >= 0.97
    for pair, rows in runs[setting]:
        average = _joint(rows, "weight_average", False)
        assert average < 0.5, _describe(runs, setting)
        assert average < pair.endpoint["joint"] - 0.4, _describe(runs, setting)


@pytest.mark.parametrize("label", MATCHING)
def test_same_task_matching_with_bn_reset_recovers_most_of_the_gap(runs, label):
    """Strict form: gap measured from plain averaging WITH BN reset (measured >= 0.81 over 4 seed pairs)."""
    for pair, rows in runs["same"]:
        gap = md.gap_closed(_joint(rows, label, True), _joint(rows, "weight_average", True), pair.endpoint["joint"])
        assert gap > 0.5, f"{label}: gap closed {gap:.2f}\n" + _describe(runs, "same")
        assert _joint(rows, label, True) > 0.9


@pytest.mark.parametrize("label", ZIP)
def test_disjoint_zip_methods_with_bn_reset_recover_most_of_the_gap(runs, label):
    """Zip (same-model fusions allowed) on disjoint tasks; strict form (measured >= 0.70 over 4 seed pairs)."""
    for pair, rows in runs["disjoint"]:
        gap = md.gap_closed(_joint(rows, label, True), _joint(rows, "weight_average", True), pair.endpoint["joint"])
        assert gap > 0.5, f"{label}: gap closed {gap:.2f}\n" + _describe(runs, "disjoint")


@pytest.mark.parametrize("label", ["activation_align", "mudsc align"])
def test_disjoint_align_methods_with_bn_reset_recover_most_of_the_gap_from_the_collapse(runs, label):
    """Align on disjoint tasks: gap measured from the collapsed (no-reset) average (measured >= 0.62).

    Measured from averaging WITH reset they close only 0.29-0.62 of the gap (one-to-one
    permutations cannot keep two unrelated feature sets; ZipIt! reports the same pattern).
    """
    for pair, rows in runs["disjoint"]:
        gap = md.gap_closed(_joint(rows, label, True), _joint(rows, "weight_average", False), pair.endpoint["joint"])
        assert gap > 0.5, f"{label}: gap closed {gap:.2f}\n" + _describe(runs, "disjoint")


def test_disjoint_tasks_need_zip_one_to_one_matching_only_beats_the_collapse(runs):
    """Measured (docs/mudsc_digits.md): on disjoint label halves Git Re-Basin closes only -0.46..0.39
    of the gap from the BN-reset average (0.41-0.74 from the collapsed one), as ZipIt! reports:
    a one-to-one matching cannot hold two unrelated feature sets. Zip-based MuDSC can."""
    for pair, rows in runs["disjoint"]:
        rebasin = _joint(rows, "git_rebasin", True)
        collapsed = _joint(rows, "weight_average", False)
        assert md.gap_closed(rebasin, collapsed, pair.endpoint["joint"]) > 0.3, _describe(runs, "disjoint")
    zip_mudsc = statistics.fmean(_joint(rows, "mudsc zip", True) for _, rows in runs["disjoint"])
    rebasin = statistics.fmean(_joint(rows, "git_rebasin", True) for _, rows in runs["disjoint"])
    assert zip_mudsc > rebasin + 0.1, _describe(runs, "disjoint")


@pytest.mark.parametrize("setting", ["same", "disjoint"])
@pytest.mark.parametrize("label", [m[0] for m in md.METHODS])
def test_bn_reset_improves_every_method(runs, setting, label):
    with_reset = [_joint(rows, label, True) for _, rows in runs[setting]]
    without = [_joint(rows, label, False) for _, rows in runs[setting]]
    for a, b in zip(with_reset, without):
        assert a >= b - 0.02, f"{label} {setting}: reset {with_reset} vs none {without}"
    assert statistics.fmean(with_reset) > statistics.fmean(without) + 0.02, (label, setting, with_reset, without)


@pytest.mark.parametrize("setting", ["same", "disjoint"])
def test_align_mudsc_is_at_least_as_good_as_weight_matching_on_average(runs, setting):
    """Dual space (beta 0.5) must not be worse than weight space alone (Git Re-Basin), both with BN reset."""
    mudsc = statistics.fmean(_joint(rows, "mudsc align", True) for _, rows in runs[setting])
    rebasin = statistics.fmean(_joint(rows, "git_rebasin", True) for _, rows in runs[setting])
    assert mudsc >= rebasin - 0.02, _describe(runs, setting)


@pytest.mark.parametrize("setting", ["same", "disjoint"])
def test_reports(runs, setting, data):
    heads = "shared" if setting == "same" else "separate"
    for _pair, rows in runs[setting]:
        for (label, reset), row in rows.items():
            report = row["report"]
            assert report["bn_reset"] is reset, (label, reset)
            assert report["heads"] == heads
            assert report["architecture"]["config"]["num_classes"] == 10
            assert report["matching"] is (label != "weight_average")
        assert rows[("activation_align", True)]["report"]["similarity_space"] == "activation"
        assert rows[("git_rebasin", True)]["report"]["similarity_space"] == "weight"
        assert rows[("mudsc zip", True)]["report"]["similarity_space"] == "dual"
        assert rows[("mudsc zip", True)]["report"]["beta"] == 0.5
    if setting == "disjoint":
        pair = runs[setting][0][0]
        assert pair.architecture["config"]["num_classes"] == 5
        result = md.merge_pair(pair, "mudsc", {"mode": "zip"}, md.calibration_inputs(data))
        merged_arch = result.report["architecture"]
        assert tb.logits(merged_arch, result.state_dict, data.x_test[:7]).shape == (7, 10)


def test_no_calibration_means_no_bn_reset(runs):
    pair = runs["same"][0][0]
    result = md.merge_pair(pair, "git_rebasin", {"reset_bn": True}, None)
    assert result.report["bn_reset"] is False
    assert result.report["weight_space_only"] is True


# --------------------------------------------------------------------------- a ResNet (same task, one seed pair)
RESNET = {"name": "resnet", "config": {"depth": 8, "width": 1, "num_classes": 10, "in_channels": 1}}


@pytest.fixture(scope="module")
def resnet_rows(data):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pair = md.train_pair(RESNET, data, "same", (0, 1), EPOCHS)
        return pair, md.run_methods(pair, data, md.calibration_inputs(data))
    finally:
        torch.set_num_threads(threads)


def test_resnet_same_task(resnet_rows):
    """Measured (seeds 0,1): endpoints 0.99; average 0.20 -> 0.54 with reset; git_rebasin 0.38 -> 0.75;
    activation_align 0.62 -> 0.94; zipit 0.79 -> 0.96; mudsc align 0.65 -> 0.92, zip 0.84 -> 0.97.

    Git Re-Basin (weight space only) closes most of the gap from the collapsed average but under
    half of it from the BN-reset average (0.47 here, 0.42 +- 0.12 on the bench's ResNet-8x2), so
    it gets the lenient form; every activation-informed method gets the strict one.
    """
    pair, rows = resnet_rows
    info = {k: (round(v["joint"], 3)) for k, v in rows.items()}
    endpoint = pair.endpoint["joint"]
    assert endpoint > 0.95
    collapsed, average = _joint(rows, "weight_average", False), _joint(rows, "weight_average", True)
    assert collapsed < 0.5, info
    for label in ("activation_align", "zipit", "mudsc align", "mudsc zip"):
        assert md.gap_closed(_joint(rows, label, True), average, endpoint) > 0.5, (label, info)
    assert md.gap_closed(_joint(rows, "git_rebasin", True), collapsed, endpoint) > 0.5, info
    assert _joint(rows, "git_rebasin", True) > average, info
    for label, _, _ in md.METHODS:
        assert _joint(rows, label, True) > _joint(rows, label, False), (label, info)
