"""Permutation specs derived by tracing, checked against the hand-written specs and by permuting outputs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mudsc_core.architectures import build_model, perm_spec
from mudsc_core.errors import MergeError, UnsupportedArchitecture
from mudsc_core.permutation.similarity import activation_correlations
from mudsc_core.permutation.spec import PermSpec
from mudsc_core.permutation.trace import TraceResult, self_check, trace_spec

Entry = tuple[str, int, int, str]  # (param, axis, segment index, role)
Traced = dict[str, tuple[nn.Module, PermSpec, tuple[Tensor, ...], TraceResult]]

ARCHITECTURES: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "mlp": ({"name": "mlp", "config": {"input_dim": 16, "hidden": [12, 10, 8], "num_classes": 5}}, (4, 16)),
    "mlp-image": ({"name": "mlp", "config": {"input_dim": 64, "hidden": [12], "num_classes": 5}}, (4, 1, 8, 8)),
    "vgg-bn": ({"name": "vgg", "config": {"layers": [8, "M", 12, 12, "M", 16], "num_classes": 5}}, (2, 3, 8, 8)),
    "vgg-plain": (
        {"name": "vgg", "config": {"layers": [8, "M", 12], "num_classes": 5, "batch_norm": False}},
        (2, 3, 8, 8),
    ),
    "resnet-bn": ({"name": "resnet", "config": {"depth": 14, "width": 1, "num_classes": 5}}, (2, 3, 8, 8)),
    "resnet-gn": (
        {"name": "resnet", "config": {"depth": 8, "width": 1, "num_classes": 5, "norm": "group", "groups": 4}},
        (2, 3, 8, 8),
    ),
    "vit": (
        {
            "name": "vit",
            "config": {"image_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 4, "num_classes": 5},
        },
        (2, 3, 8, 8),
    ),
    "vit-nobias": (
        {
            "name": "vit",
            "config": {
                "image_size": 8,
                "patch_size": 2,
                "embed_dim": 12,
                "depth": 1,
                "num_heads": 3,
                "num_classes": 5,
                "qkv_bias": False,
            },
        },
        (2, 3, 8, 8),
    ),
}


# --------------------------------------------------------------------------- helpers
def _entries(spec: PermSpec) -> dict[str, frozenset[Entry]]:
    """Each group as the set of (param, axis, segment, role) entries it indexes (names do not matter)."""
    found: dict[str, set[Entry]] = {g: set() for g in spec.groups}
    for param, axes in spec.axes.items():
        for axis, axis_spec in enumerate(axes):
            for k, seg in enumerate(axis_spec or ()):
                found[seg.group].add((param, axis, k, seg.role))
    return {g: frozenset(e) for g, e in found.items()}


def _canonical(spec: PermSpec) -> dict[frozenset[Entry], tuple[int, int, frozenset[Entry] | None]]:
    """Partition of entries into groups, with size, num_blocks and the tie (as its entry set)."""
    entries = _entries(spec)
    out = {}
    for name, group in spec.groups.items():
        tie = entries[spec.block_tie_root(name)] if group.block_tie is not None else None
        out[entries[name]] = (group.size, group.num_blocks, tie)
    return out


def _rename(derived: PermSpec, oracle: PermSpec) -> dict[str, str]:
    """Derived group name -> oracle group name, matched by their entry sets."""
    by_entries = {e: name for name, e in _entries(oracle).items()}
    return {name: by_entries[e] for name, e in _entries(derived).items() if e in by_entries}


def _build(key: str) -> tuple[nn.Module, PermSpec, tuple[Tensor, ...]]:
    torch.manual_seed(0)
    arch, shape = ARCHITECTURES[key]
    model = build_model(arch)
    _randomize_norms(model)
    return model, perm_spec(arch), (torch.randn(*shape),)


def _randomize_norms(model: nn.Module) -> None:
    """Default norm parameters/statistics are permutation-invariant constants; make them informative."""
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                continue
            for name, tensor in module.state_dict(keep_vars=True).items():
                if name in ("weight", "running_var"):
                    tensor.uniform_(0.5, 1.5)
                elif name in ("bias", "running_mean"):
                    tensor.normal_(0, 0.1)


@pytest.fixture(scope="module")
def traced() -> Traced:
    out = {}
    for key in ARCHITECTURES:
        model, oracle, inputs = _build(key)
        out[key] = (model, oracle, inputs, trace_spec(model, inputs))
    return out


# --------------------------------------------------------------------------- built-in architectures
@pytest.mark.parametrize("key", list(ARCHITECTURES))
def test_derived_spec_equals_hand_written(traced: Traced, key: str) -> None:
    """Same partition of (param, axis, segment, role) entries, sizes, blocks and ties as the oracle."""
    _model, oracle, _inputs, result = traced[key]
    derived = result.spec
    assert _canonical(derived) == _canonical(oracle)
    assert set(derived.head_params) == set(oracle.head_params)
    assert derived.excluded == oracle.excluded
    assert set(derived.axes) == set(oracle.axes)
    # Unit-free axes agree too (None in both), so the specs move exactly the same entries.
    for param, axes in oracle.axes.items():
        assert [a is None for a in derived.axes[param]] == [a is None for a in axes], param
    names = _rename(derived, oracle)
    assert [names[g] for g in derived.group_order()] == list(oracle.group_order())


@pytest.mark.parametrize("key", list(ARCHITECTURES))
def test_derived_sites_observe_the_oracles_activations(traced: Traced, key: str) -> None:
    """Every derived site sees the same tensor as the hand-written one (same correlation matrix).

    The module named may differ where one tensor is visible at several hooks: a ResNet stage's
    stream is observed at the next stage's conv1 input (the oracle: the stage's last block output),
    the last stage's at the pool input; the tensor is the same.
    """
    model, oracle, inputs, result = traced[key]
    model.eval()
    names = _rename(result.spec, oracle)
    ours = activation_correlations([model], result.spec, [inputs[0]])
    theirs = activation_correlations([model], oracle, [inputs[0]])
    assert set(ours) == set(result.spec.groups)
    for group, corr in ours.items():
        torch.testing.assert_close(corr, theirs[names[group]], msg=f"{key}: site of {group}")


@pytest.mark.parametrize("key", list(ARCHITECTURES))
def test_outputs_unchanged_under_derived_permutations(traced: Traced, key: str) -> None:
    model, _oracle, inputs, result = traced[key]
    error = self_check(model, result.spec, inputs, trials=2)
    assert error < 1e-5


@pytest.mark.parametrize("key", ["mlp", "vgg-bn", "resnet-bn", "vit"])
def test_spec_missing_a_parameter_fails_self_check(traced: Traced, key: str) -> None:
    """Remove one weight's axis from its group: the check must fail and name the group and parameters."""
    model, _oracle, inputs, result = traced[key]
    spec = result.spec
    group = spec.group_order()[-1]
    param, axis = next((p, a) for p, a, *_ in spec.entries(group) if p.endswith("weight"))
    broken_axes = dict(spec.axes)
    broken_axes[param] = tuple(None if i == axis else s for i, s in enumerate(spec.axes[param]))
    broken = dataclasses.replace(spec, axes=broken_axes)
    with pytest.raises(UnsupportedArchitecture) as info:
        self_check(model, broken, inputs)
    assert info.value.code == "unsupported_architecture"
    assert isinstance(info.value, MergeError)
    assert repr(group) in info.value.message


def test_summary_reports_groups_pins_and_time(traced: Traced) -> None:
    _model, _oracle, _inputs, result = traced["vit"]
    assert result.seconds > 0
    free = {g.name: g for g in result.free_groups}
    assert set(free) == set(result.spec.groups)
    assert sorted(g.num_blocks for g in free.values()) == [1, 1, 1, 4, 4, 4, 4]
    assert result.pinned_by["model input"] > 0 and result.pinned_by["model output"] > 0
    pinned = {g.name: g for g in result.pinned_groups}
    assert "model output" in pinned["head.weight[0]"].reasons
    assert "integer index" in pinned["pos_embed[1]"].reasons  # the token axis: cls token picked by h[:, 0]


# --------------------------------------------------------------------------- hand-made transformer
class Attention(nn.Module):
    """Multi-head attention written out: separate q/k/v, view + transpose, matmul, softmax."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        head_dim = dim // self.heads
        q = self.q(x).view(batch, tokens, self.heads, head_dim).transpose(1, 2)
        k = self.k(x).view(batch, tokens, self.heads, head_dim).transpose(1, 2)
        v = self.v(x).view(batch, tokens, self.heads, head_dim).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
        y = att.softmax(dim=-1) @ v  # (B, H, T, d)
        return self.o(y.transpose(1, 2).reshape(batch, tokens, dim))


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class TinyLM(nn.Module):
    """Token + position embedding, one pre-LN block (LayerNorm before attention, RMSNorm before MLP)."""

    def __init__(self, vocab: int = 30, dim: int = 16, heads: int = 4, tokens: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(tokens, dim) * 0.1)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = RMSNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 3 * dim), nn.Linear(3 * dim, dim)
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        h = h + self.attn(self.ln1(h))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(self.ln_f(h))


def test_handmade_transformer_heads_become_blocks() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    inputs = {"ids": torch.randint(0, 30, (2, 6))}
    result = trace_spec(model, inputs)
    spec = result.spec
    groups = {name: (g.size, g.num_blocks, g.block_tie) for name, g in spec.groups.items()}
    # stream, qk (4 heads), v (4 heads, tied to qk), MLP hidden.
    assert groups == {
        "embed": (16, 1, None),
        "attn.q": (16, 4, None),
        "attn.v": (16, 4, "attn.q"),
        "fc1": (48, 1, None),
    }
    entries = _entries(spec)
    assert entries["attn.q"] == {
        ("attn.q.weight", 0, 0, "out"),
        ("attn.q.bias", 0, 0, "out"),
        ("attn.k.weight", 0, 0, "out"),
        ("attn.k.bias", 0, 0, "out"),
    }
    assert entries["attn.v"] == {
        ("attn.v.weight", 0, 0, "out"),
        ("attn.v.bias", 0, 0, "out"),
        ("attn.o.weight", 1, 0, "in"),
    }
    assert ("ln2.weight", 0, 0, "out") in entries["embed"] and ("pos", 1, 0, "out") in entries["embed"]
    assert spec.axes["embed.weight"][0] is None and spec.axes["pos"][0] is None  # vocabulary and positions
    assert set(spec.head_params) == {"head.weight", "head.bias"}
    assert spec.groups["attn.v"].activation is not None and spec.groups["attn.v"].activation.module == "attn.o"
    assert self_check(model, spec, inputs) < 1e-5


# --------------------------------------------------------------------------- pinning and failures
class CumsumMLP(nn.Module):
    """An op the tracer has no rule for (cumsum over features) pins the units it touches, safely."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.fc1, self.head = nn.Linear(6, 8), nn.Linear(8, 7), nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cumsum(F.relu(self.fc0(x)), dim=-1)
        return self.head(F.relu(self.fc1(h)))


def test_unknown_op_pins_its_units() -> None:
    torch.manual_seed(0)
    model = CumsumMLP()
    inputs = (torch.randn(4, 6),)
    result = trace_spec(model, inputs)
    assert list(result.spec.groups) == ["fc1"]
    assert result.pinned_by["cumsum: no rule"] >= 8
    pinned = {g.name: g for g in result.pinned_groups}
    assert any("cumsum" in r for r in pinned["fc0.weight[0]"].reasons)
    assert self_check(model, result.spec, inputs) < 1e-5


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_is_unsupported() -> None:
    with pytest.raises(UnsupportedArchitecture) as info:
        trace_spec(DataDependent(), (torch.randn(2, 4),))
    assert "torch.fx" in info.value.message


@pytest.mark.parametrize("inputs", [{"nope": torch.randn(2, 4)}, (torch.randn(2, 5),), [torch.randn(2, 4)]])
def test_unsupported_inputs_are_unsupported(inputs: Mapping[str, Tensor] | tuple[Tensor, ...]) -> None:
    with pytest.raises(UnsupportedArchitecture):
        trace_spec(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), inputs)


# --------------------------------------------------------------------------- assorted op patterns
class FusedChunkAttention(nn.Module):
    """Fused qkv split with chunk, heads via reshape/permute, F.scaled_dot_product_attention."""

    def __init__(self, dim: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.inp, self.qkv, self.o = nn.Linear(5, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)  # fx unpacks a chunk of 3, not a generator over it

        def heads(t: Tensor) -> Tensor:
            return t.reshape(batch, tokens, self.heads, -1).permute(0, 2, 1, 3)

        q, k, v = heads(q), heads(k), heads(v)
        y = F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).flatten(2)
        return self.head(F.relu(self.o(y)).mean(1))


class Inception(nn.Module):
    """Two branches concatenated on channels: the consumer's input axis has one segment per branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(10, 5, 1)
        self.head = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        return self.head(F.adaptive_avg_pool2d(F.relu(self.c(x)), 1).flatten(1))


class Depthwise(nn.Module):
    """Depthwise conv ties in/out channels one to one; a grouped conv (5 channels per group) is pinned:
    per-group permutations of its inputs would need a different column order in every group."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 10, 1)
        self.g, self.head = nn.Conv2d(10, 12, 3, padding=1, groups=2), nn.Linear(12, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.dw(F.relu(self.bn(self.c1(x)))))
        x = F.relu(self.g(F.relu(self.pw(x))))
        return self.head(x.mean((2, 3)))


class TorchMHA(nn.Module):
    """nn.MultiheadAttention has no rule: everything it touches is pinned, the rest stays free."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mha = nn.Linear(5, 12), nn.MultiheadAttention(12, 3, batch_first=True)
        self.fc, self.head = nn.Linear(12, 7), nn.Linear(7, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        x = x + self.mha(x, x, x)[0]
        return self.head(F.relu(self.fc(x)))


def test_fused_qkv_chunk_gives_tied_head_groups() -> None:
    torch.manual_seed(0)
    model, inputs = FusedChunkAttention(), (torch.randn(2, 5, 5),)
    spec = trace_spec(model, inputs).spec
    assert {n: (g.size, g.num_blocks, g.block_tie) for n, g in spec.groups.items()} == {
        "inp": (12, 1, None),
        "qkv": (12, 3, None),
        "qkv.1": (12, 3, "qkv"),
        "o": (12, 1, None),
    }
    assert [s.group for s in spec.axes["qkv.weight"][0] or ()] == ["qkv", "qkv", "qkv.1"]
    assert self_check(model, spec, inputs) < 1e-5


def test_cat_gives_segments_in_the_consumer() -> None:
    torch.manual_seed(0)
    model, inputs = Inception(), (torch.randn(2, 3, 8, 8),)
    spec = trace_spec(model, inputs).spec
    assert [(s.group, s.length, s.role) for s in spec.axes["c.weight"][1] or ()] == [("a", 4, "in"), ("b", 6, "in")]
    assert self_check(model, spec, inputs) < 1e-5


def test_depthwise_joins_and_grouped_conv_pins() -> None:
    torch.manual_seed(0)
    model, inputs = Depthwise(), (torch.randn(2, 3, 8, 8),)
    _randomize_norms(model)
    result = trace_spec(model, inputs)
    assert list(result.spec.groups) == ["c1"]
    assert {p for p, *_ in result.spec.entries("c1")} >= {"dw.weight", "dw.bias", "pw.weight", "bn.running_var"}
    pinned = {g.name: g for g in result.pinned_groups}
    assert "within-block units used outside their blocks" in pinned["g.weight[1]"].reasons
    assert self_check(model, result.spec, inputs) < 1e-5


def test_unknown_module_pins_what_it_touches() -> None:
    torch.manual_seed(0)
    model, inputs = TorchMHA(), (torch.randn(2, 5, 5),)
    result = trace_spec(model, inputs)
    assert list(result.spec.groups) == ["fc"]
    assert any("MultiheadAttention" in reason for reason in result.pinned_by)
    assert self_check(model, result.spec, inputs) < 1e-5


def test_self_check_of_another_models_spec_is_a_merge_error(traced: Traced) -> None:
    model, _oracle, inputs, _result = traced["mlp"]
    with pytest.raises(MergeError):
        self_check(model, traced["vgg-bn"][3].spec, inputs)
