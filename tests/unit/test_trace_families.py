"""Derived specs of the Hugging Face families beyond BERT / GPT-2 / Llama (issue 10, item 3).

RoBERTa, DistilBERT, Mistral, Qwen2, ViT, CLIP vision, ConvNeXt and ResNet, each a small random-init model
built from its config class (``bench.trace_families``: 2-3 layers, width 32-64, never downloaded; weights
perturbed so that biases, norm affines and BatchNorm statistics are not constants). For each: captured by
torch.export; the groups expected free (residual stream where no output pins it, attention q/k and v/o head
groups with their blocks, MLP inner groups, conv channel groups); tied embeddings in one group; what is
pinned and the reason the report gives; the self-check; and a permuted copy with the same outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pytest
import torch
from torch import Tensor, nn

from bench.trace_families import HEADS, HIDDEN, INNER, LAYERS, family
from mudsc_core.permutation.similarity import activation_correlations
from mudsc_core.permutation.spec import PermSpec, UnitGroup
from mudsc_core.permutation.trace import TraceResult, trace_spec
from mudsc_core.permutation.trace_build import TABLE_FIXED_REASON
from tests.trace_checks import (
    assert_check_passes,
    assert_permuted_copy_agrees,
    group_of,
    pin_reasons,
    segments,
)

transformers = pytest.importorskip("transformers")


def _traced(cls: str, **overrides: object) -> tuple[nn.Module, TraceResult, dict[str, Tensor]]:
    entry = family(cls)
    model = entry.build(**overrides)
    inputs = entry.example_inputs()
    result = trace_spec(model, inputs)
    assert result.capture == "export" and 0 < result.capture_seconds < result.seconds
    return model, result, inputs


# What may pin a parameter's axis in these families: pixels and token ids, outputs, vocabularies, kernel
# taps, the token axis of a position table (masks vary along it; eager attention adds its mask), rotary
# tables. Never an op without a rule: that would cost merge quality.
_HONEST_PINS = {
    "model input",
    "model output",
    "embedding vocabulary",
    "conv kernel",
    "conv spatial",
    "integer index",
    "attention mask",
    "elementwise add.Tensor with a non-parameter tensor",
    TABLE_FIXED_REASON,
}


def _verify(model: nn.Module, result: TraceResult, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    for space in result.pinned_groups:
        if space.size > 1:
            assert space.reasons and set(space.reasons) <= _HONEST_PINS, space
    assert_check_passes(model, result.spec, inputs)
    return assert_permuted_copy_agrees(model, result.spec, inputs)


def _attention(spec: PermSpec, q: str, k: str, v: str, o: str, *, bias: bool = True) -> tuple[str, str]:
    """q/k rows one group of HEADS blocks, v rows and o columns another, the two tied; returns (qk, vo)."""
    qk = group_of(spec, f"{q}.weight", 0)
    assert group_of(spec, f"{k}.weight", 0) == qk
    assert (spec.groups[qk].size, spec.groups[qk].num_blocks, spec.groups[qk].whole_blocks) == (HIDDEN, HEADS, False)
    vo = group_of(spec, f"{v}.weight", 0)
    assert group_of(spec, f"{o}.weight", 1) == vo and spec.groups[vo].num_blocks == HEADS
    assert spec.block_tie_root(vo) == spec.block_tie_root(qk)
    if bias:
        assert group_of(spec, f"{q}.bias", 0) == group_of(spec, f"{k}.bias", 0) == qk
        assert group_of(spec, f"{v}.bias", 0) == vo
    return qk, vo


def _mlp(spec: PermSpec, up: str, down: str, size: int = INNER, *, bias: bool = True) -> str:
    inner = group_of(spec, f"{up}.weight", 0)
    assert group_of(spec, f"{down}.weight", 1) == inner and spec.groups[inner].size == size
    if bias:
        assert group_of(spec, f"{up}.bias", 0) == inner
    return inner


def _one_group(spec: PermSpec, members: list[tuple[str, int]]) -> str:
    groups = {group_of(spec, param, axis) for param, axis in members}
    assert len(groups) == 1, groups
    return groups.pop()


# --------------------------------------------------------------------------- RoBERTa
def _roberta_layers(spec: PermSpec, prefix: str) -> list[tuple[str, int]]:
    """Checks every layer's heads and MLP; returns the layers' residual-stream members."""
    members: list[tuple[str, int]] = []
    for layer in range(LAYERS):
        p = f"{prefix}encoder.layer.{layer}."
        _attention(
            spec,
            p + "attention.self.query",
            p + "attention.self.key",
            p + "attention.self.value",
            p + "attention.output.dense",
        )
        _mlp(spec, p + "intermediate.dense", p + "output.dense")
        members += [
            (p + "attention.self.query.weight", 1),
            (p + "attention.self.value.weight", 1),
            (p + "attention.output.dense.weight", 0),
            (p + "attention.output.dense.bias", 0),
            (p + "attention.output.LayerNorm.weight", 0),
            (p + "intermediate.dense.weight", 1),
            (p + "output.dense.weight", 0),
            (p + "output.LayerNorm.bias", 0),
        ]
    return members


def _roberta_embeddings(prefix: str) -> list[tuple[str, int]]:
    e = f"{prefix}embeddings."
    return [
        (e + "word_embeddings.weight", 1),
        (e + "position_embeddings.weight", 1),
        (e + "token_type_embeddings.weight", 1),
        (e + "LayerNorm.weight", 0),
        (e + "LayerNorm.bias", 0),
    ]


def test_roberta_model_heads_and_mlp_free_residual_pinned_by_its_output() -> None:
    model, result, inputs = _traced("RobertaModel")
    spec = result.spec
    _roberta_layers(spec, "")
    assert len(spec.groups) == 3 * LAYERS
    # last_hidden_state and pooler_output are outputs (features): the stream and the pooler stay in place
    for param, axis in _roberta_embeddings(""):
        assert spec.axes[param][axis] is None
    assert pin_reasons(result, "embeddings.word_embeddings.weight[1]") == ("model output",)
    assert pin_reasons(result, "pooler.dense.weight[0]") == ("model output",)
    _verify(model, result, inputs)


def test_roberta_classifier_residual_stream_and_head_free() -> None:
    model, result, inputs = _traced("RobertaForSequenceClassification")
    spec = result.spec
    members = _roberta_embeddings("roberta.") + _roberta_layers(spec, "roberta.") + [("classifier.dense.weight", 1)]
    residual = _one_group(spec, members)
    assert spec.groups[residual].size == HIDDEN and spec.order[0] == residual
    head = _mlp(spec, "classifier.dense", "classifier.out_proj", HIDDEN)
    assert spec.axes["classifier.out_proj.weight"][0] is None  # the labels
    assert pin_reasons(result, "classifier.out_proj.weight[0]") == ("model output",)
    assert len(spec.groups) == 1 + 3 * LAYERS + 1 and head != residual
    _verify(model, result, inputs)


def test_roberta_masked_lm_decoder_stays_tied_to_the_word_embeddings() -> None:
    model, result, inputs = _traced("RobertaForMaskedLM")
    spec = result.spec
    assert model.lm_head.decoder.weight.data_ptr() == model.roberta.embeddings.word_embeddings.weight.data_ptr()
    members = _roberta_embeddings("roberta.") + _roberta_layers(spec, "roberta.")
    members += [("lm_head.dense.weight", 0), ("lm_head.dense.weight", 1), ("lm_head.layer_norm.weight", 0)]
    residual = _one_group(spec, members + [("lm_head.decoder.weight", 1)])
    assert spec.axes["lm_head.decoder.weight"][0] is None and spec.axes["lm_head.decoder.bias"][0] is None
    assert set(pin_reasons(result, "roberta.embeddings.word_embeddings.weight[0]")) == {
        "embedding vocabulary",
        "model output",
    }
    assert len(spec.groups) == 1 + 3 * LAYERS and spec.order[0] == residual
    moved = _verify(model, result, inputs)
    assert torch.equal(moved["lm_head.decoder.weight"], moved["roberta.embeddings.word_embeddings.weight"])


# --------------------------------------------------------------------------- DistilBERT
def _distilbert_layers(spec: PermSpec, prefix: str) -> list[tuple[str, int]]:
    members: list[tuple[str, int]] = []
    for layer in range(LAYERS):
        p = f"{prefix}transformer.layer.{layer}."
        a = p + "attention."
        _attention(spec, a + "q_lin", a + "k_lin", a + "v_lin", a + "out_lin")
        _mlp(spec, p + "ffn.lin1", p + "ffn.lin2")
        members += [
            (a + "q_lin.weight", 1),
            (a + "out_lin.weight", 0),
            (p + "sa_layer_norm.weight", 0),
            (p + "ffn.lin1.weight", 1),
            (p + "ffn.lin2.bias", 0),
            (p + "output_layer_norm.bias", 0),
        ]
    return members


def _distilbert_embeddings(prefix: str) -> list[tuple[str, int]]:
    e = f"{prefix}embeddings."
    return [(e + "word_embeddings.weight", 1), (e + "position_embeddings.weight", 1), (e + "LayerNorm.weight", 0)]


def test_distilbert_model_heads_and_mlp_free_residual_pinned_by_its_output() -> None:
    model, result, inputs = _traced("DistilBertModel")
    spec = result.spec
    _distilbert_layers(spec, "")
    assert len(spec.groups) == 3 * LAYERS
    assert all(spec.axes[param][axis] is None for param, axis in _distilbert_embeddings(""))
    assert pin_reasons(result, "embeddings.word_embeddings.weight[1]") == ("model output",)
    _verify(model, result, inputs)


def test_distilbert_classifier_residual_stream_and_pre_classifier_free() -> None:
    model, result, inputs = _traced("DistilBertForSequenceClassification")
    spec = result.spec
    members = _distilbert_embeddings("distilbert.") + _distilbert_layers(spec, "distilbert.")
    residual = _one_group(spec, members + [("pre_classifier.weight", 1)])
    head = _mlp(spec, "pre_classifier", "classifier", HIDDEN)
    assert head != residual and spec.axes["classifier.weight"][0] is None
    assert len(spec.groups) == 1 + 3 * LAYERS + 1
    _verify(model, result, inputs)


def test_distilbert_masked_lm_projector_stays_tied() -> None:
    model, result, inputs = _traced("DistilBertForMaskedLM")
    spec = result.spec
    assert model.vocab_projector.weight.data_ptr() == model.distilbert.embeddings.word_embeddings.weight.data_ptr()
    members = _distilbert_embeddings("distilbert.") + _distilbert_layers(spec, "distilbert.")
    members += [("vocab_transform.weight", 0), ("vocab_transform.weight", 1), ("vocab_layer_norm.weight", 0)]
    _one_group(spec, members + [("vocab_projector.weight", 1)])
    assert spec.axes["vocab_projector.weight"][0] is None
    assert len(spec.groups) == 1 + 3 * LAYERS
    moved = _verify(model, result, inputs)
    assert torch.equal(moved["vocab_projector.weight"], moved["distilbert.embeddings.word_embeddings.weight"])


# --------------------------------------------------------------------------- Mistral, Qwen2
def _gqa_decoder(spec: PermSpec, *, qkv_bias: bool) -> str:
    """Llama-shaped layers: residual stream, qk (2 kv heads, whole blocks: rotary; q rows twice: GQA), v/o, SwiGLU."""
    members: list[tuple[str, int]] = [("model.embed_tokens.weight", 1), ("model.norm.weight", 0), ("lm_head.weight", 1)]
    kv_heads, head_dim = 2, HIDDEN // HEADS
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        a = p + "self_attn."
        members += [
            (p + "input_layernorm.weight", 0),
            (p + "post_attention_layernorm.weight", 0),
            (a + "q_proj.weight", 1),
            (a + "k_proj.weight", 1),
            (a + "v_proj.weight", 1),
            (a + "o_proj.weight", 0),
            (p + "mlp.gate_proj.weight", 1),
            (p + "mlp.down_proj.weight", 0),
        ]
        (k,) = segments(spec, a + "k_proj.weight", 0)
        (q,) = segments(spec, a + "q_proj.weight", 0)
        qk = spec.groups[k.group]
        assert q.group == k.group and (qk.size, qk.num_blocks, qk.whole_blocks) == (kv_heads * head_dim, kv_heads, True)
        assert (k.expand, q.expand, q.length) == (1, HEADS // kv_heads, HIDDEN)
        (v,) = segments(spec, a + "v_proj.weight", 0)
        (o,) = segments(spec, a + "o_proj.weight", 1)
        vo = spec.groups[v.group]
        assert o.group == v.group and (vo.size, vo.num_blocks, vo.whole_blocks) == (
            kv_heads * head_dim,
            kv_heads,
            False,
        )
        assert o.expand == HEADS // kv_heads and spec.block_tie_root(v.group) == spec.block_tie_root(k.group)
        if qkv_bias:  # Qwen2: biased q, k, v
            assert (
                segments(spec, a + "q_proj.bias", 0)[0].group
                == segments(spec, a + "k_proj.bias", 0)[0].group
                == qk.name
            )
            assert segments(spec, a + "v_proj.bias", 0)[0].group == vo.name
        mlp = group_of(spec, p + "mlp.gate_proj.weight", 0)
        assert group_of(spec, p + "mlp.up_proj.weight", 0) == mlp == group_of(spec, p + "mlp.down_proj.weight", 1)
        assert spec.groups[mlp].size == INNER
    residual = _one_group(spec, members)
    assert spec.axes["lm_head.weight"][0] is None and len(spec.groups) == 1 + 3 * LAYERS
    return residual


def test_mistral_gqa_rotary_untied_head() -> None:
    model, result, inputs = _traced("MistralForCausalLM")
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    _gqa_decoder(result.spec, qkv_bias=False)
    assert pin_reasons(result, "lm_head.weight[0]") == ("model output",)
    _verify(model, result, inputs)


def test_qwen2_gqa_rotary_biased_qkv_tied_head() -> None:
    model, result, inputs = _traced("Qwen2ForCausalLM")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    _gqa_decoder(result.spec, qkv_bias=True)
    assert set(pin_reasons(result, "model.embed_tokens.weight[0]")) == {"embedding vocabulary", "model output"}
    moved = _verify(model, result, inputs)
    assert torch.equal(moved["lm_head.weight"], moved["model.embed_tokens.weight"])


# --------------------------------------------------------------------------- ViT, CLIP vision
def _vit_layers(spec: PermSpec, prefix: str) -> list[tuple[str, int]]:
    members: list[tuple[str, int]] = []
    for layer in range(LAYERS):
        p = f"{prefix}layers.{layer}."
        a = p + "attention."
        _attention(spec, a + "q_proj", a + "k_proj", a + "v_proj", a + "o_proj")
        _mlp(spec, p + "mlp.fc1", p + "mlp.fc2")
        members += [
            (p + "layernorm_before.weight", 0),
            (a + "q_proj.weight", 1),
            (a + "o_proj.bias", 0),
            (p + "layernorm_after.bias", 0),
            (p + "mlp.fc1.weight", 1),
            (p + "mlp.fc2.weight", 0),
        ]
    return members


def _vit_embeddings(prefix: str) -> list[tuple[str, int]]:
    e = f"{prefix}embeddings."
    # the class token is concatenated to the patches and the position embeddings added: both in the stream
    return [
        (e + "patch_embeddings.projection.weight", 0),
        (e + "patch_embeddings.projection.bias", 0),
        (e + "cls_token", 2),
        (e + "position_embeddings", 2),
    ]


def test_vit_model_heads_and_mlp_free_residual_pinned_by_its_output() -> None:
    model, result, inputs = _traced("ViTModel")
    spec = result.spec
    _vit_layers(spec, "")
    assert len(spec.groups) == 3 * LAYERS
    assert all(spec.axes[param][axis] is None for param, axis in _vit_embeddings(""))
    assert pin_reasons(result, "embeddings.patch_embeddings.projection.weight[0]") == ("model output",)
    assert pin_reasons(result, "pooler.dense.weight[0]") == ("model output",)
    _verify(model, result, inputs)


def test_vit_classifier_class_token_and_position_embeddings_join_the_stream() -> None:
    model, result, inputs = _traced("ViTForImageClassification")
    spec = result.spec
    members = _vit_embeddings("vit.") + _vit_layers(spec, "vit.")
    members += [("vit.layernorm.weight", 0), ("classifier.weight", 1)]
    residual = _one_group(spec, members)
    assert spec.order[0] == residual and len(spec.groups) == 1 + 3 * LAYERS
    # pixels and the token positions stay in place: the patch's input channels, the position table's token axis
    assert spec.axes["vit.embeddings.patch_embeddings.projection.weight"][1] is None
    assert spec.axes["vit.embeddings.position_embeddings"][1] is None
    assert spec.axes["classifier.weight"][0] is None
    _verify(model, result, inputs)


def _clip_layers(spec: PermSpec, prefix: str) -> list[tuple[str, int]]:
    members: list[tuple[str, int]] = []
    for layer in range(LAYERS):
        p = f"{prefix}encoder.layers.{layer}."
        a = p + "self_attn."
        _attention(spec, a + "q_proj", a + "k_proj", a + "v_proj", a + "out_proj")
        _mlp(spec, p + "mlp.fc1", p + "mlp.fc2")
        members += [(p + "layer_norm1.weight", 0), (a + "out_proj.weight", 0), (p + "mlp.fc2.bias", 0)]
    return members


def _clip_embeddings(prefix: str) -> list[tuple[str, int]]:
    e = f"{prefix}embeddings."
    return [
        (e + "patch_embedding.weight", 0),
        (e + "class_embedding", 0),
        (e + "position_embedding.weight", 1),
        (f"{prefix}pre_layrnorm.weight", 0),
        (f"{prefix}post_layernorm.weight", 0),
    ]


@pytest.mark.parametrize("cls", ["CLIPVisionModel", "CLIPVisionModelWithProjection"])
def test_clip_vision_heads_and_mlp_free_residual_pinned_by_its_outputs(cls: str) -> None:
    model, result, inputs = _traced(cls)
    spec = result.spec
    prefix = "vision_model." if cls.endswith("Projection") else ""
    _clip_layers(spec, prefix)
    assert len(spec.groups) == 3 * LAYERS
    # last_hidden_state is an output of both: the stream stays in place; so do the projected image embeds
    assert all(spec.axes[param][axis] is None for param, axis in _clip_embeddings(prefix))
    assert pin_reasons(result, f"{prefix}embeddings.patch_embedding.weight[0]") == ("model output",)
    if prefix:
        assert pin_reasons(result, "visual_projection.weight[0]") == ("model output",)
    _verify(model, result, inputs)


class _ImageEmbeds(nn.Module):
    """The projected image embedding alone (a zero-shot classifier's view): the stream is no output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).image_embeds  # type: ignore[no-any-return]


def test_clip_vision_stream_is_free_when_only_the_projection_is_an_output() -> None:
    entry = family("CLIPVisionModelWithProjection")
    model = _ImageEmbeds(entry.build()).eval()
    inputs = entry.example_inputs()
    result = trace_spec(model, inputs)
    assert result.capture == "export"
    spec = result.spec
    p = "model.vision_model."
    members = _clip_embeddings(p) + _clip_layers(spec, p) + [("model.visual_projection.weight", 1)]
    residual = _one_group(spec, members)
    assert spec.order[0] == residual and len(spec.groups) == 1 + 3 * LAYERS
    assert pin_reasons(result, "model.visual_projection.weight[0]") == ("model output",)
    moved = _verify(model, result, inputs)
    assert not torch.equal(moved[p + "pre_layrnorm.weight"], model.state_dict()[p + "pre_layrnorm.weight"])


# --------------------------------------------------------------------------- ConvNeXt
def _convnext_stage(spec: PermSpec, prefix: str, stage: int, depth: int, width: int) -> list[tuple[str, int]]:
    """Each block: depthwise conv, LayerNorm, layer scale on the stream; a 4x inner group between the pointwise convs."""
    members: list[tuple[str, int]] = []
    for layer in range(depth):
        p = f"{prefix}encoder.stages.{stage}.layers.{layer}."
        _mlp(spec, p + "pwconv1", p + "pwconv2", 4 * width)
        members += [
            (p + "dwconv.weight", 0),
            (p + "dwconv.bias", 0),
            (p + "layernorm.weight", 0),
            (p + "pwconv1.weight", 1),
            (p + "pwconv2.weight", 0),
            (p + "layer_scale_parameter", 0),
        ]
    return members


def _convnext_stem(prefix: str) -> list[tuple[str, int]]:
    # the stem's channels, stage 0's blocks and the LayerNorm before stage 1's downsampling conv
    e = f"{prefix}embeddings."
    return [
        (e + "patch_embeddings.weight", 0),
        (e + "layernorm.weight", 0),
        (f"{prefix}encoder.stages.1.downsampling_layer.0.weight", 0),
        (f"{prefix}encoder.stages.1.downsampling_layer.1.weight", 1),
    ]


def test_convnext_model_stage_channels_and_inner_groups_last_stage_pinned_by_its_output() -> None:
    model, result, inputs = _traced("ConvNextModel")
    spec = result.spec
    stage0 = _one_group(spec, _convnext_stem("") + _convnext_stage(spec, "", 0, 2, 32))
    assert spec.groups[stage0].size == 32
    _convnext_stage(spec, "", 1, 1, 64)
    # 4 free groups: stage 0's channels, 2 + 1 inner groups; stage 1's channels are the output's features
    assert len(spec.groups) == 4
    assert spec.axes["encoder.stages.1.downsampling_layer.1.weight"][0] is None
    assert spec.axes["encoder.stages.1.layers.0.dwconv.weight"][0] is None
    assert pin_reasons(result, "encoder.stages.1.downsampling_layer.1.weight[0]") == ("model output",)
    _verify(model, result, inputs)


def test_convnext_classifier_every_stage_free() -> None:
    model, result, inputs = _traced("ConvNextForImageClassification")
    spec = result.spec
    p = "convnext."
    stage0 = _one_group(spec, _convnext_stem(p) + _convnext_stage(spec, p, 0, 2, 32))
    stage1 = _one_group(
        spec,
        [(p + "encoder.stages.1.downsampling_layer.1.weight", 0), (p + "layernorm.weight", 0), ("classifier.weight", 1)]
        + _convnext_stage(spec, p, 1, 1, 64),
    )
    assert (spec.groups[stage0].size, spec.groups[stage1].size) == (32, 64)
    assert len(spec.groups) == 5 and spec.axes["classifier.weight"][0] is None
    _verify(model, result, inputs)


# --------------------------------------------------------------------------- ResNet (HF)
def _bn(prefix: str) -> list[tuple[str, int]]:
    return [(prefix + leaf, 0) for leaf in ("weight", "bias", "running_mean", "running_var")]


def test_resnet_model_basic_blocks_batchnorm_last_stage_pinned_by_its_output() -> None:
    model, result, inputs = _traced("ResNetModel")
    spec = result.spec
    s0, s1 = "encoder.stages.0.layers.", "encoder.stages.1.layers.0."
    # the stem's channels are stage 0's stream (identity shortcuts), read by stage 1's first conv and shortcut
    stem = [("embedder.embedder.convolution.weight", 0), *_bn("embedder.embedder.normalization.")]
    for layer in range(2):
        stem += [(f"{s0}{layer}.layer.0.convolution.weight", 1), (f"{s0}{layer}.layer.1.convolution.weight", 0)]
        stem += _bn(f"{s0}{layer}.layer.1.normalization.")
    stem += [(s1 + "layer.0.convolution.weight", 1), (s1 + "shortcut.convolution.weight", 1)]
    assert spec.groups[_one_group(spec, stem)].size == 32
    for block, width in ((f"{s0}0.", 32), (f"{s0}1.", 32), (s1, 64)):
        inner = _one_group(
            spec,
            [(block + "layer.0.convolution.weight", 0), (block + "layer.1.convolution.weight", 1)]
            + _bn(block + "layer.0.normalization."),
        )
        assert spec.groups[inner].size == width
    assert len(spec.groups) == 4
    assert pin_reasons(result, "encoder.stages.1.layers.0.layer.1.convolution.weight[0]") == ("model output",)
    assert "encoder.stages.1.layers.0.shortcut.normalization.num_batches_tracked" in spec.excluded
    _verify(model, result, inputs)


def test_resnet_classifier_bottlenecks_every_stage_free() -> None:
    model, result, inputs = _traced("ResNetForImageClassification")
    spec = result.spec
    s0, s1 = "resnet.encoder.stages.0.layers.", "resnet.encoder.stages.1.layers.0."
    stem = [("resnet.embedder.embedder.convolution.weight", 0), *_bn("resnet.embedder.embedder.normalization.")]
    for layer in range(2):
        stem += [(f"{s0}{layer}.layer.0.convolution.weight", 1), (f"{s0}{layer}.layer.2.convolution.weight", 0)]
    stem += [(s1 + "layer.0.convolution.weight", 1), (s1 + "shortcut.convolution.weight", 1)]
    _one_group(spec, stem)
    stage1 = [(s1 + "layer.2.convolution.weight", 0), (s1 + "shortcut.convolution.weight", 0)]
    stage1 += _bn(s1 + "shortcut.normalization.") + [("classifier.1.weight", 1)]
    assert spec.groups[_one_group(spec, stage1)].size == 64
    # bottlenecks: two inner groups of width / 4 each (reduction 4)
    for block, width in ((f"{s0}0.", 32), (f"{s0}1.", 32), (s1, 64)):
        for k in range(2):
            inner = _one_group(
                spec,
                [(f"{block}layer.{k}.convolution.weight", 0), (f"{block}layer.{k + 1}.convolution.weight", 1)]
                + _bn(f"{block}layer.{k}.normalization."),
            )
            assert spec.groups[inner].size == width // 4
    assert len(spec.groups) == 2 + 3 * 2 and spec.axes["classifier.1.weight"][0] is None
    _verify(model, result, inputs)


# --------------------------------------------------------------------------- variants real checkpoints use
@pytest.mark.parametrize("cls", ["RobertaForSequenceClassification", "ViTForImageClassification"])
def test_eager_attention_gives_the_spec_of_sdpa(cls: str) -> None:
    """``attn_implementation="eager"`` (matmul, softmax, matmul instead of one sdpa op): the same spec."""
    model, result, inputs = _traced(cls, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    _, sdpa, _ = _traced(cls)

    def structure(spec: PermSpec) -> dict[str, UnitGroup]:  # activation sites may differ: other ops
        return {name: dataclasses.replace(g, activation=None) for name, g in spec.groups.items()}

    assert structure(result.spec) == structure(sdpa.spec) and result.spec.axes == sdpa.spec.axes
    _verify(model, result, inputs)


def test_multi_query_attention_pins_qk_by_the_rotary_tables_and_frees_v() -> None:
    """One kv head: q/k dims are fixed by rotary and there is no head to move; v's dims move (o carries them 4x)."""
    model, result, inputs = _traced("Qwen2ForCausalLM", num_key_value_heads=1)
    spec = result.spec
    for layer in range(LAYERS):
        a = f"model.layers.{layer}.self_attn."
        assert spec.axes[a + "q_proj.weight"][0] is None and spec.axes[a + "k_proj.weight"][0] is None
        assert pin_reasons(result, a + "q_proj.weight[0]") == (TABLE_FIXED_REASON,)
        (v,) = segments(spec, a + "v_proj.weight", 0)
        (o,) = segments(spec, a + "o_proj.weight", 1)
        assert o.group == v.group and (spec.groups[v.group].size, o.expand) == (HIDDEN // HEADS, HEADS)
    assert len(spec.groups) == 1 + 2 * LAYERS
    _verify(model, result, inputs)


def test_head_dim_independent_of_hidden_size() -> None:
    """Mistral's ``head_dim`` (here 16 with hidden 32 and 4 heads: q has 64 rows)."""
    model, result, inputs = _traced("MistralForCausalLM", head_dim=16)
    spec = result.spec
    for layer in range(LAYERS):
        a = f"model.layers.{layer}.self_attn."
        (k,) = segments(spec, a + "k_proj.weight", 0)
        (q,) = segments(spec, a + "q_proj.weight", 0)
        qk = spec.groups[k.group]
        assert q.group == k.group and (qk.size, qk.num_blocks, qk.whole_blocks) == (32, 2, True)
        assert (q.length, q.expand) == (64, 2)
        (o,) = segments(spec, a + "o_proj.weight", 1)
        assert (spec.groups[o.group].size, o.length, o.expand) == (32, 64, 2)
    assert len(spec.groups) == 1 + 3 * LAYERS
    _verify(model, result, inputs)


@pytest.mark.parametrize(
    ("cls", "stream_param", "reads"),
    [
        ("MistralForCausalLM", "model.norm.weight", ["input_layernorm", "post_attention_layernorm"]),
        ("ViTForImageClassification", "vit.layernorm.weight", ["layernorm_before", "layernorm_after"]),
        ("RobertaForSequenceClassification", "roberta.embeddings.LayerNorm.weight", []),
        ("DistilBertForSequenceClassification", "distilbert.embeddings.LayerNorm.weight", []),
    ],
)
def test_pre_norm_stream_is_also_observed_at_its_norms_outputs(cls: str, stream_param: str, reads: list[str]) -> None:
    """A pre-norm stream (the residual goes around its norms: Mistral's RMSNorms, ViT's LayerNorms) is observed
    at its usual site and at every norm that hands it to a sublayer or the head; a post-norm stream (RoBERTa,
    DistilBERT: the norms' outputs are the stream itself) keeps its one site. The hooks see every site."""
    model, result, inputs = _traced(cls)
    spec = result.spec
    stream = spec.groups[group_of(spec, stream_param, 0)]
    assert stream.activation is not None
    layers = "model.layers" if cls.startswith("Mistral") else "vit.layers"
    final = "model.norm" if cls.startswith("Mistral") else "vit.layernorm"
    expected = [f"{layers}.{i}.{read}" for i in range(LAYERS) for read in reads] + ([final] if reads else [])
    assert [site.module for site in stream.extra_sites] == expected
    assert all(site.io == "output" for site in stream.extra_sites)
    for name, group in spec.groups.items():  # only the stream has extra sites
        assert not group.extra_sites or name == stream.name
    correlation = activation_correlations([model], spec, [inputs])[stream.name]
    assert correlation.shape == (stream.size, stream.size) and bool(torch.isfinite(correlation).all())
