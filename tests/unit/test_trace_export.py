"""The tracer's torch.export front end on small random-init Hugging Face transformers models.

torch.fx cannot capture transformers 5 models; ``trace_spec`` falls back to ``torch.export``
(ATen ops, parameters by state-dict name). Every model is built from a config (never downloaded).
For each: the capture used, the derived groups (residual stream, per-layer attention qk / v
head groups, MLP inner group, tied embedding and LM head), the self-check, and a permuted copy
that gives the same outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from mudsc_core.errors import UnsupportedArchitecture
from mudsc_core.permutation.spec import PermSpec
from mudsc_core.permutation.trace import TraceResult, self_check, trace_spec
from tests.trace_checks import assert_check_passes, assert_permuted_copy_agrees
from tests.trace_checks import group_of as _group_of
from tests.trace_checks import segments as _segments

transformers = pytest.importorskip("transformers")

VOCAB, TOKENS, LAYERS = 50, 6, 2


def _ids() -> dict[str, Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (2, TOKENS), generator=torch.Generator().manual_seed(1))}


def _bert(cls: str = "BertModel") -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
    )
    return getattr(transformers, cls)(config).eval()  # type: ignore[no-any-return]


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()  # type: ignore[no-any-return]


def _llama(tied: bool) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()  # type: ignore[no-any-return]


def _traced(build: Callable[[], nn.Module]) -> tuple[nn.Module, TraceResult]:
    torch.manual_seed(0)
    model = build()
    result = trace_spec(model, _ids())
    assert result.capture == "export"
    return model, result


def _assert_permuted_copy_agrees(model: nn.Module, spec: PermSpec) -> None:
    assert_permuted_copy_agrees(model, spec, _ids())


def _assert_check_passes(model: nn.Module, result: TraceResult) -> None:
    assert_check_passes(model, result.spec, _ids())


# --------------------------------------------------------------------------- BERT
def test_bert_model_heads_and_mlp_groups_residual_pinned_by_output() -> None:
    model, result = _traced(_bert)
    spec = result.spec
    for layer in range(LAYERS):
        p = f"encoder.layer.{layer}."
        qk = _group_of(spec, p + "attention.self.query.weight", 0)
        assert _group_of(spec, p + "attention.self.key.weight", 0) == qk
        assert (spec.groups[qk].size, spec.groups[qk].num_blocks, spec.groups[qk].whole_blocks) == (32, 4, False)
        v = _group_of(spec, p + "attention.self.value.weight", 0)
        assert _group_of(spec, p + "attention.output.dense.weight", 1) == v
        assert spec.groups[v].num_blocks == 4 and spec.block_tie_root(v) == spec.block_tie_root(qk)
        mlp = _group_of(spec, p + "intermediate.dense.weight", 0)
        assert _group_of(spec, p + "output.dense.weight", 1) == mlp and spec.groups[mlp].size == 64
    assert len(spec.groups) == 3 * LAYERS
    # last_hidden_state is an output of BertModel: the residual stream is pinned (TRACING.md, "Outputs")
    assert spec.axes["embeddings.word_embeddings.weight"][1] is None
    pinned = {g.name: g for g in result.pinned_groups}
    assert "model output" in pinned["embeddings.word_embeddings.weight[1]"].reasons
    # Sites in an ATen graph name the module each op belongs to (the owner of the weight it takes).
    inner = spec.groups[_group_of(spec, "encoder.layer.0.output.dense.weight", 1)].activation
    assert inner is not None and (inner.module, inner.io) == ("encoder.layer.0.output.dense", "input")
    assert all(g.activation is not None for g in spec.groups.values())
    _assert_check_passes(model, result)
    _assert_permuted_copy_agrees(model, spec)


def test_bert_classifier_residual_stream_is_one_group() -> None:
    model, result = _traced(lambda: _bert("BertForSequenceClassification"))
    spec = result.spec
    residual = _group_of(spec, "bert.embeddings.word_embeddings.weight", 1)
    members = [
        ("bert.embeddings.position_embeddings.weight", 1),
        ("bert.embeddings.token_type_embeddings.weight", 1),
        ("bert.embeddings.LayerNorm.weight", 0),
        ("bert.pooler.dense.weight", 1),
    ]
    for layer in range(LAYERS):
        p = f"bert.encoder.layer.{layer}."
        members += [
            (p + "attention.self.query.weight", 1),
            (p + "attention.output.dense.weight", 0),
            (p + "attention.output.LayerNorm.weight", 0),
            (p + "output.dense.weight", 0),
            (p + "output.LayerNorm.bias", 0),
        ]
    assert {_group_of(spec, param, axis) for param, axis in members} == {residual}
    assert _group_of(spec, "classifier.weight", 1) == _group_of(spec, "bert.pooler.dense.weight", 0)
    assert spec.axes["classifier.weight"][0] is None
    assert len(spec.groups) == 3 * LAYERS + 2
    _assert_check_passes(model, result)
    _assert_permuted_copy_agrees(model, spec)


# --------------------------------------------------------------------------- GPT-2
def test_gpt2_fused_qkv_segments_and_tied_head() -> None:
    model, result = _traced(_gpt2)
    spec = result.spec
    residual = _group_of(spec, "transformer.wte.weight", 1)
    assert _group_of(spec, "lm_head.weight", 1) == residual  # tied to the embedding
    assert _group_of(spec, "transformer.wpe.weight", 1) == residual
    assert _group_of(spec, "transformer.ln_f.weight", 0) == residual
    for layer in range(LAYERS):
        p = f"transformer.h.{layer}."
        # Conv1D weights are (in, out): c_attn's output axis is q | k | v, three segments
        q, k, v = _segments(spec, p + "attn.c_attn.weight", 1)
        assert q.group == k.group != v.group and (q.length, k.length, v.length) == (32, 32, 32)
        assert [s.group for s in _segments(spec, p + "attn.c_attn.bias", 0)] == [q.group, q.group, v.group]
        assert spec.groups[q.group].num_blocks == 4 and spec.groups[v.group].num_blocks == 4
        assert spec.block_tie_root(q.group) == spec.block_tie_root(v.group)
        assert _segments(spec, p + "attn.c_attn.weight", 0)[0].role == "in"
        assert _group_of(spec, p + "attn.c_attn.weight", 0) == residual
        assert _group_of(spec, p + "attn.c_proj.weight", 0) == v.group
        assert _group_of(spec, p + "attn.c_proj.weight", 1) == residual
        mlp = _group_of(spec, p + "mlp.c_fc.weight", 1)
        assert spec.groups[mlp].size == 128 and _group_of(spec, p + "mlp.c_proj.weight", 0) == mlp
        assert _group_of(spec, p + "mlp.c_proj.weight", 1) == residual
        assert _group_of(spec, p + "ln_1.weight", 0) == _group_of(spec, p + "ln_2.bias", 0) == residual
    assert len(spec.groups) == 1 + 3 * LAYERS
    assert spec.order[0] == residual
    _assert_check_passes(model, result)
    _assert_permuted_copy_agrees(model, spec)


# --------------------------------------------------------------------------- Llama
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_gqa_rotary_rmsnorm_swiglu(tied: bool) -> None:
    model, result = _traced(lambda: _llama(tied))
    spec = result.spec
    residual = _group_of(spec, "model.embed_tokens.weight", 1)
    assert _group_of(spec, "model.norm.weight", 0) == residual
    assert _group_of(spec, "lm_head.weight", 1) == residual and spec.axes["lm_head.weight"][0] is None
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        for param, axis in (
            ("input_layernorm.weight", 0),
            ("post_attention_layernorm.weight", 0),
            ("self_attn.q_proj.weight", 1),
            ("self_attn.o_proj.weight", 0),
            ("mlp.down_proj.weight", 0),
        ):
            assert _group_of(spec, p + param, axis) == residual
        # qk: the 2 kv heads as whole blocks (rotary); q's rows carry them expanded twice (GQA)
        (k,) = _segments(spec, p + "self_attn.k_proj.weight", 0)
        (q,) = _segments(spec, p + "self_attn.q_proj.weight", 0)
        qk = spec.groups[k.group]
        assert q.group == k.group and (qk.size, qk.num_blocks, qk.whole_blocks) == (16, 2, True)
        assert (k.expand, q.expand, q.length) == (1, 2, 32)
        (v,) = _segments(spec, p + "self_attn.v_proj.weight", 0)
        (o,) = _segments(spec, p + "self_attn.o_proj.weight", 1)
        group_v = spec.groups[v.group]
        assert o.group == v.group and (group_v.size, group_v.num_blocks, group_v.whole_blocks) == (16, 2, False)
        assert o.expand == 2 and spec.block_tie_root(v.group) == spec.block_tie_root(k.group)
        mlp = _group_of(spec, p + "mlp.gate_proj.weight", 0)
        assert _group_of(spec, p + "mlp.up_proj.weight", 0) == mlp == _group_of(spec, p + "mlp.down_proj.weight", 1)
        assert spec.groups[mlp].size == 64
    assert len(spec.groups) == 1 + 3 * LAYERS
    _assert_check_passes(model, result)
    _assert_permuted_copy_agrees(model, spec)


# --------------------------------------------------------------------------- front ends
def test_plain_modules_still_trace_with_fx() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    result = trace_spec(model, (torch.randn(3, 4),))
    assert result.capture == "fx" and list(result.spec.groups) == ["0"]
    assert result.spec.groups["0"].activation is not None


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_a_model_neither_front_end_captures_names_both() -> None:
    with pytest.raises(UnsupportedArchitecture) as info:
        trace_spec(_DataDependent(), (torch.randn(2, 4),))
    assert "torch.fx" in info.value.message and "torch.export" in info.value.message


class _ExportOnly(nn.Module):
    """fx cannot branch on a shape; export can (a conv stem with batch norm, depthwise conv, pooling, MLP)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = nn.functional.max_pool2d(torch.relu(self.dw(h)), 2)
        flat = self.pool(h).flatten(1)
        if flat.shape[-1] > 4:
            flat = flat * 2.0
        return self.head(torch.relu(self.fc(flat)))


def test_conv_batchnorm_pool_through_export() -> None:
    torch.manual_seed(0)
    model = _ExportOnly().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    inputs = (torch.randn(2, 3, 8, 8),)
    result = trace_spec(model, inputs)
    assert result.capture == "export"
    spec = result.spec
    conv = _group_of(spec, "conv.weight", 0)
    for param in ("bn.weight", "bn.running_mean", "dw.weight", "dw.bias"):
        assert _group_of(spec, param, 0) == conv
    assert _group_of(spec, "fc.weight", 1) == conv
    assert _group_of(spec, "head.weight", 1) == _group_of(spec, "fc.weight", 0)
    assert self_check(model, spec, inputs) < 1e-4
