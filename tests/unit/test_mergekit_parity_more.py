"""Parity with mergekit for nuslerp, karcher, sce and nearswap (the helpers of ``test_mergekit_parity``).

The same YAML through mergekit's ``run_merge`` and through our core (``from_mergekit`` then
``merge_files``) on the tiny float32 Llama: equal to 1e-5 (max abs difference over every tensor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("mergekit.merge")

from tests.unit.test_mergekit_parity import (  # noqa: E402
    LAYER_GRADIENT,
    TOL,
    URI,
    _max_diff,
    _models,
    _run_both,
    folders,
)

__all__ = ["folders"]  # the fixture (module scope): the tiny Llama's base and fine-tunes

CASES: dict[str, dict[str, Any]] = {
    "nuslerp": {"merge_method": "nuslerp", "models": _models({"weight": 1.0}, {"weight": LAYER_GRADIENT})},
    "nuslerp_rows": {
        "merge_method": "nuslerp",
        "models": _models({"weight": 0.7}, {"weight": 0.4}),
        "parameters": {"nuslerp_flatten": False},
    },
    "nuslerp_row_wise": {
        "merge_method": "nuslerp",
        "models": _models({"weight": 2.0}, {"weight": 1.0}),
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    },
    "karcher": {"merge_method": "karcher", "models": _models({}, {}, {})},
    "karcher_short": {
        "merge_method": "karcher",
        "models": _models({}, {}),
        "parameters": {"max_iter": 2, "tol": 1e-4},
    },
    "sce": {"merge_method": "sce", "base_model": URI["base"], "models": _models({}, {}, {})},
    "sce_select": {
        "merge_method": "sce",
        "base_model": URI["base"],
        "models": _models({}, {}, {}),
        "parameters": {"select_topk": 0.3, "int8_mask": True},
    },
    "sce_select_gradient": {
        "merge_method": "sce",
        "base_model": URI["base"],
        "models": _models({}, {}),
        "parameters": {"select_topk": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}]},
    },
    "nearswap": {
        "merge_method": "nearswap",
        "base_model": URI["a"],
        "models": [{"model": URI["a"]}, {"model": URI["b"]}],
        "parameters": {"t": 0.01},
    },
    "nearswap_gradient": {
        "merge_method": "nearswap",
        "base_model": URI["b"],
        "models": [{"model": URI["c"]}],
        "parameters": {"t": [0.005, 0.05]},
    },
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_new_methods_equal_mergekit(name: str, folders: dict[str, Path], tmp_path: Path) -> None:
    ours, theirs = _run_both(CASES[name], folders, tmp_path)
    gap = _max_diff(ours, theirs)
    print(f"parity {name}: max |ours - mergekit| = {gap:.3g}")
    assert gap <= TOL, f"{name}: {gap}"
