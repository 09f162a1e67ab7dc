"""REPAIR (``repair: true`` on the permutation methods): merged units get their input models' statistics back.

On the digits MLP (no BatchNorm: nothing else undoes the variance collapse of averaging) every group's
merged pre-activation std comes back to the interpolated target (ratio 1 after, well below 1 before), and
plain weight averaging gains several points; on transformers every Linear/Conv1D/LayerNorm that produces a
group's units is a repair site (the residual stream at its projections and LayerNorms, q and k at each of
their projections, the segments of GPT-2's fused qkv), and groups carrying BatchNorm statistics are left to the
BatchNorm reset.
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
    assert not skipped
    # The residual stream at every LayerNorm and every projection writing into it (post-LN: the LayerNorms
    # make the stream), q and k at their own projections; in forward order.
    stream = repaired["bert.embeddings.word_embeddings"]["sites"]
    assert stream[0] == "bert.embeddings.LayerNorm" and "bert.encoder.layer.1.output.LayerNorm" in stream
    assert "bert.encoder.layer.0.attention.output.dense" in stream and "bert.encoder.layer.0.output.dense" in stream
    assert repaired["bert.encoder.layer.0.attention.self.query"]["sites"] == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.key",
    ]


def test_repair_folds_into_gpt2_conv1d_producers() -> None:
    """GPT-2's Conv1D stores its weight (in, out): producers are rescaled along their columns, the fused qkv
    projection segment by segment (q and k in the head's qk group, v in its v group)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=30, n_embd=32, n_layer=2, n_head=4, n_positions=16, num_labels=3, pad_token_id=0,
        bos_token_id=1, eos_token_id=1, architectures=["GPT2ForSequenceClassification"],
    )  # fmt: skip
    report = _zipit_with_repair(transformers.GPT2ForSequenceClassification, config, first_token=1)
    repaired = report["repair"]["groups"]
    assert {f"transformer.h.{i}.mlp.c_fc" for i in range(2)} <= set(repaired)
    assert not report["repair"]["skipped"]
    assert all(r["std_ratio_after"] == pytest.approx(1.0, abs=1e-3) for r in repaired.values())
    assert all(r["std_ratio_before"] != pytest.approx(1.0, abs=1e-3) for r in repaired.values())
    assert repaired["transformer.h.0.attn.c_attn"]["sites"] == [
        "transformer.h.0.attn.c_attn[0:32]",
        "transformer.h.0.attn.c_attn[32:64]",
    ]
    assert repaired["transformer.h.0.attn.c_attn.1"]["sites"] == ["transformer.h.0.attn.c_attn[64:96]"]
    stream = repaired["transformer.wte"]["sites"]
    assert stream[0] == "transformer.h.0.ln_1" and stream[-1] == "transformer.ln_f"
    assert "transformer.h.1.mlp.c_proj" in stream


def test_batchnorm_groups_are_left_to_the_reset() -> None:
    """A conv followed by BatchNorm is not rescaled (its statistics would go stale): reset_bn re-estimates them."""
    from mudsc_core.architectures import build_model, trace_architecture
    from mudsc_core.permutation.repair import producers
    from mudsc_core.schema import ArchitectureSpec

    arch = ArchitectureSpec.model_validate({"name": "vgg", "config": {"in_channels": 1, "layers": [8, "M", 12]}})
    spec = trace_architecture(arch).spec
    found, skipped = producers(spec, dict(build_model(arch).named_modules()))
    assert not found and skipped
    assert all("BatchNorm" in reason for reason in skipped.values())


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
