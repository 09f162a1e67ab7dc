"""Real task vectors (digits MLP, bench/task_vectors.py): merging beats the base on every task."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import task_vectors as tv  # noqa: E402


@pytest.mark.slow
def test_task_arithmetic_and_ties_beat_the_base_on_every_task(tmp_path: Path) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bed = tv.build(seed=0)
        base = tv.accuracies(bed, bed.base)
        for method in ("task_arithmetic", "ties"):
            state, params = tv.merge(bed, method, tmp_path)
            merged = tv.accuracies(bed, state)
            worse = {t: (merged[t], base[t]) for t in tv.TASKS if merged[t] <= base[t]}
            assert not worse, f"{method} {params}: not above the base on {worse}"
    finally:
        torch.set_num_threads(threads)
