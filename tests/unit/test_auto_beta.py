"""``beta: "auto"``: candidates scored on held-out calibration inputs, without labels (mechanics).

Margins on trained models are in tests/unit/test_quality_margins.py; here: every grid value is a
candidate, the choice is the best-scoring one and is what the report says was used, the statistics come
from the calibration inputs that were not held out, too few inputs and no inputs are refused, and
separate heads (on their joint prediction) and transformers models (keyword calibration, padding) are scored.
"""

from __future__ import annotations

import pytest
import torch

from mudsc_core.architectures import build_model
from mudsc_core.errors import InvalidCalibration
from mudsc_core.permutation import auto_beta
from mudsc_core.permutation.merge import merge

MLP = {"name": "mlp", "config": {"input_dim": 16, "hidden": [32, 32], "num_classes": 5}}


def _states(arch: dict, seeds: tuple[int, ...] = (0, 1)) -> list[dict[str, torch.Tensor]]:
    states = []
    for seed in seeds:
        torch.manual_seed(seed)
        states.append(build_model(arch).state_dict())
    return states


def test_every_candidate_is_scored_and_the_best_one_is_used() -> None:
    calibration = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    result = merge(_states(MLP), MLP, {"name": "mudsc", "params": {"mode": "zip", "beta": "auto"}}, calibration)
    search = result.report["beta_search"]
    assert [c["beta"] for c in search["candidates"]] == list(auto_beta.GRID)
    best = max(search["candidates"], key=lambda c: (c["score"], -abs(c["beta"] - 0.5)))
    assert search["chosen"] == best["beta"] == result.report["metrics"]["beta_chosen"]
    assert search["held_out_samples"] == 16  # the last quarter
    assert result.report["params"]["beta"] == "auto"
    fixed = merge(
        _states(MLP), MLP, {"name": "mudsc", "params": {"mode": "zip", "beta": best["beta"]}}, calibration[:48]
    )
    for name, tensor in fixed.state_dict.items():  # the chosen candidate is the merge at that beta on the rest
        torch.testing.assert_close(result.state_dict[name], tensor, msg=name)


def test_auto_needs_enough_calibration_inputs() -> None:
    with pytest.raises(InvalidCalibration, match="calibration"):
        merge(_states(MLP), MLP, {"name": "mudsc", "params": {"beta": "auto"}})
    with pytest.raises(InvalidCalibration, match="at least 16"):
        merge(_states(MLP), MLP, {"name": "mudsc", "params": {"beta": "auto"}}, torch.randn(10, 16))


class _Fixed(torch.nn.Module):
    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


def test_separate_heads_are_scored_on_the_joint_prediction_of_the_concatenated_heads() -> None:
    """Each head matching its own model is not enough: heads offset against each other change the joint argmax."""
    g = torch.Generator().manual_seed(3)
    refs = [torch.randn(12, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    x = torch.zeros(12, 1)
    scorer = auto_beta.Scorer(
        [_Fixed(r) for r in refs], [x], lambda net, b: net(b), heads="separate", features=False, model_zero_order=False
    )
    exact = torch.cat(refs, dim=1)
    assert scorer(_Fixed(exact)) == pytest.approx(0.0, abs=1e-12)
    offset = torch.cat([refs[0] + 3.0, refs[1]], dim=1)  # each head's softmax unchanged, their balance not
    assert scorer(_Fixed(offset)) < -0.1
    target = exact.softmax(-1)
    expected = (target * (target.log() - offset.log_softmax(-1))).sum(-1).mean()
    assert scorer(_Fixed(offset)) == pytest.approx(-float(expected))


def test_separate_heads_are_scored() -> None:
    calibration = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    method = {"name": "mudsc", "params": {"mode": "align", "beta": "auto", "heads": "separate"}}
    search = merge(_states(MLP), MLP, method, calibration).report["beta_search"]
    assert len(search["candidates"]) == len(auto_beta.GRID) and all(c["score"] <= 0 for c in search["candidates"])


def test_a_transformers_model_is_scored_on_its_unpadded_tokens() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=30, n_embd=32, n_layer=1, n_head=4, n_positions=16, architectures=["GPT2LMHeadModel"]
    )
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append(transformers.GPT2LMHeadModel(config).state_dict())
    ids = torch.randint(0, 30, (32, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::2, 5:] = 0
    arch = {"name": "transformers", "config": config.to_dict()}
    report = merge(
        states, arch, {"name": "mudsc", "params": {"beta": "auto"}}, {"input_ids": ids, "attention_mask": mask}
    ).report
    assert report["beta_search"]["held_out_samples"] == 8 and report["beta"] == report["beta_search"]["chosen"]


def test_the_report_scores_the_final_matching_in_each_space() -> None:
    """The dual score is the beta mix of the per-space scores of the same matching (pair_score is linear)."""
    calibration = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    report = merge(_states(MLP), MLP, {"name": "mudsc", "params": {"mode": "align", "beta": 0.3}}, calibration).report
    for group in report["groups"].values():
        mixed = 0.3 * group["weight"] + 0.7 * group["activation"]
        assert group["mean_similarity"] == pytest.approx(mixed, abs=1e-5)
        assert 0.0 <= group["disagreement"] <= 1.0
    weight_only = merge(_states(MLP), MLP, {"name": "git_rebasin"}).report
    assert all(g["activation"] is None and g["disagreement"] is None for g in weight_only["groups"].values())
