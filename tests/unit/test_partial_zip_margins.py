"""Partial zip on the digits bed (issue 15 item 3): the margins of docs/mudsc_quality.md that hold across seeds.

VGG of bench/mudsc_digits.py, disjoint halves (0-4 / 5-9), the bench's protocol (``bench.mudsc_quality
.run_partial``): merging only the first conv and keeping the rest of each model separate is clearly better
than the full merge, close to the endpoints' ensemble, at less than twice one model's size. Measured on
seed pairs (0,1) (2,3) (4,5) (zipit / mudsc zip, joint test accuracy): depth 1 minus the full merge
+3.1/+1.8, +5.3/+5.3, +4.4/+5.6 points; depth 1 minus the ensemble -1.5/-0.2, +0.1/-0.8, +4.2/+3.7.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bench import mudsc_digits as md
from bench import mudsc_quality as mq
from bench import testbed as tb

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cell() -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = tb.load_digits_data()
        return mq.run_partial(["vgg"], [(0, 1)], md.EPOCHS, data)["vgg"]["disjoint"][0]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("label", [label for label, _, _ in mq.PARTIAL_METHODS])
def test_a_shallow_cut_beats_the_full_merge_and_nears_the_ensemble(cell: dict[str, Any], label: str) -> None:
    depths = sorted(cell["depths"], key=int)
    shallow, full = cell["depths"][depths[0]], cell["depths"][depths[-1]]
    assert int(depths[-1]) == full["groups"]  # the last valid cut is the whole model
    assert shallow[label] >= full[label] + 0.01, cell
    assert shallow[label] >= cell["endpoint"] - 0.03, cell
    assert 1.0 <= full["size"] < shallow["size"] < 2.0
