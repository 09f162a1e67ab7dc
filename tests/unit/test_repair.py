"""REPAIR (``repair: true`` on the permutation methods): merged units get their input models' statistics back.

On the digits MLP (no BatchNorm: nothing else undoes the variance collapse of averaging) every group's
merged pre-activation std comes back to the interpolated target (ratio 1 after, well below 1 before), and
plain weight averaging gains several points; on a transformers BERT the groups with one producing Linear
are repaired and the others (the residual stream, q/k with two producers) are listed with the reason.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bench.testbed import accuracy, inputs_for, load_digits_data, train
from mudsc_core.errors import InvalidCalibration
from mudsc_core.permutation.merge import merge
from mudsc_core.schema import JobSpec

MLP = {"name": "mlp", "config": {"input_dim": 64, "hidden": [128, 128], "num_classes": 10}}


@pytest.fixture(scope="module")
def digits_pairs() -> list[tuple[list[dict[str, torch.Tensor]], torch.Tensor]]:
    data = load_digits_data()
    pairs = []
    for seeds in ((1, 2), (3, 4)):
        states = [train(MLP, data.x_train, data.y_train, seed=s, epochs=20) for s in seeds]
        pairs.append((states, inputs_for(MLP, data.x_train[:512])))
    return pairs


def test_repair_restores_the_statistics_and_lifts_weight_averaging(digits_pairs: list[Any]) -> None:
    data = load_digits_data()
    for states, calibration in digits_pairs:
        plain = merge(states, MLP, {"name": "weight_average"}, calibration)
        repaired = merge(states, MLP, {"name": "weight_average", "params": {"repair": True}}, calibration)
        ratios = repaired.report["metrics"]["repair_std_ratio"]
        assert set(ratios) == {"fc0", "fc1"} and plain.report["metrics"]["repair_std_ratio"] is None
        for before, after in ratios.values():
            assert before < 0.8 and after == pytest.approx(1.0, abs=1e-3)  # collapse measured, then undone
        gain = accuracy(MLP, repaired.state_dict, data.x_test, data.y_test) - accuracy(
            MLP, plain.state_dict, data.x_test, data.y_test
        )
        assert gain > 0.03  # measured 6.7 and 4.1 points
        aligned = merge(states, MLP, {"name": "git_rebasin", "params": {"repair": True}}, calibration)
        assert accuracy(MLP, aligned.state_dict, data.x_test, data.y_test) > 0.96


def _zipit_with_repair(model_class: Any, config: Any, first_token: int) -> dict[str, Any]:
    """The report of zipit + REPAIR on two random-init models of a transformers class (token ids from
    ``first_token`` up to the vocabulary)."""
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append(model_class(config).state_dict())
    ids = torch.randint(first_token, config.vocab_size, (16, 8), generator=torch.Generator().manual_seed(0))
    calibration = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    arch = {"name": "transformers", "config": config.to_dict()}
    report: dict[str, Any] = merge(states, arch, {"name": "zipit", "params": {"repair": True}}, calibration).report
    return report


def test_repair_on_a_transformer_names_what_it_left_alone() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
        architectures=["BertForSequenceClassification"],
    )
    report = _zipit_with_repair(transformers.BertForSequenceClassification, config, first_token=0)
    repaired, skipped = report["repair"]["groups"], report["repair"]["skipped"]
    assert {"bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.attention.self.value"} <= set(repaired)
    assert all(r["mean_shifted"] and r["std_ratio_after"] == pytest.approx(1.0, abs=1e-3) for r in repaired.values())
    assert "producing weights" in skipped["bert.embeddings.word_embeddings"]
    assert "producing weights" in skipped["bert.encoder.layer.0.attention.self.query"]


def test_repair_folds_into_gpt2_conv1d_producers() -> None:
    """GPT-2's Conv1D stores its weight (in, out): the MLP's producer is rescaled along its columns."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=30, n_embd=32, n_layer=2, n_head=4, n_positions=16, num_labels=3, pad_token_id=0,
        bos_token_id=1, eos_token_id=1, architectures=["GPT2ForSequenceClassification"],
    )  # fmt: skip
    report = _zipit_with_repair(transformers.GPT2ForSequenceClassification, config, first_token=1)
    repaired = report["repair"]["groups"]
    assert set(repaired) == {f"transformer.h.{i}.mlp.c_fc" for i in range(2)}
    assert all(r["std_ratio_after"] == pytest.approx(1.0, abs=1e-3) for r in repaired.values())
    assert all(r["std_ratio_before"] != pytest.approx(1.0, abs=1e-3) for r in repaired.values())


def test_repair_needs_calibration() -> None:
    with pytest.raises(InvalidCalibration, match="calibration"):
        merge([{}, {}], MLP, {"name": "weight_average", "params": {"repair": True}})
    with pytest.raises(ValueError, match="calibration"):
        JobSpec.model_validate(
            {
                "method": {"name": "zipit", "params": {"repair": True}},
                "models": [{"uri": "s3://models/a.safetensors"}, {"uri": "s3://models/b.safetensors"}],
                "architecture": MLP,
            }
        )
