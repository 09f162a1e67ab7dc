"""Rotary embeddings (heads moving only as whole blocks) and grouped-query attention (expanded segments).

A small Llama-style model written out in plain torch: RMSNorm, q/k/v/o projections without bias,
rotary embeddings (precomputed cos/sin buffers or computed from positions, ``rotate_half`` by
slicing and cat), causal softmax attention, a SwiGLU MLP, a residual stream, an embedding and an
LM head; optionally with fewer kv heads than q heads (kv repeated by expand + reshape or by
``repeat_interleave``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mudsc_core.errors import ArchitectureMismatch, SpecError
from mudsc_core.permutation.iteration import build_merged_state, find_correspondences
from mudsc_core.permutation.matching import MATCHERS, align_match, zip_match
from mudsc_core.permutation.permute import (
    block_permutation,
    expand_index,
    expand_matrix,
    invert_permutation,
    permute_state_dict,
    random_permutations,
)
from mudsc_core.permutation.similarity import activation_correlations, row_correlation
from mudsc_core.permutation.spec import PermSpec, Segment, UnitGroup, validate_state_dict
from mudsc_core.permutation.trace import self_check, trace_spec
from mudsc_core.permutation.trace_build import ROTARY_REASON
from mudsc_core.schema.permutation_params import MudscParams

VOCAB, DIM, TOKENS = 29, 16, 6


# --------------------------------------------------------------------------- the model
def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, rotary: str | None, repeat: str) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.rotary, self.repeat = rotary, repeat
        d = self.head_dim
        self.q_proj = nn.Linear(dim, heads * d, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * d, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * d, bias=False)
        self.o_proj = nn.Linear(heads * d, dim, bias=False)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        freqs = torch.arange(32).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # (32, d)
        self.register_buffer("cos_table", emb.cos(), persistent=False)
        self.register_buffer("sin_table", emb.sin(), persistent=False)

    def _tables(self, x: Tensor, tokens: int) -> tuple[Tensor, Tensor]:
        if self.rotary == "buffer":
            return self.cos_table.narrow(0, 0, tokens), self.sin_table.narrow(0, 0, tokens)
        positions = torch.arange(tokens, device=x.device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def _repeat(self, t: Tensor) -> Tensor:
        r = self.heads // self.kv_heads
        if r == 1:
            return t
        if self.repeat == "interleave":
            return t.repeat_interleave(r, dim=1)
        batch, kv, tokens, d = t.shape
        return t[:, :, None].expand(batch, kv, r, tokens, d).reshape(batch, kv * r, tokens, d)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(batch, tokens, self.heads, d).transpose(1, 2)
        k = self.k_proj(x).view(batch, tokens, self.kv_heads, d).transpose(1, 2)
        v = self.v_proj(x).view(batch, tokens, self.kv_heads, d).transpose(1, 2)
        if self.rotary is not None:
            cos, sin = self._tables(x, tokens)
            cos, sin = cos[None, None], sin[None, None]  # (1, 1, T, d): broadcast over batch and heads
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        k, v = self._repeat(k), self._repeat(v)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d)
        causal = torch.ones((tokens, tokens), dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf"))
        y = att.softmax(dim=-1) @ v  # (B, H, T, d)
        return self.o_proj(y.transpose(1, 2).reshape(batch, tokens, self.heads * d))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, rotary: str | None, repeat: str) -> None:
        super().__init__()
        self.input_norm = RMSNorm(dim)
        self.attn = Attention(dim, heads, kv_heads, rotary, repeat)
        self.post_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, 24)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.input_norm(h))
        return h + self.mlp(self.post_norm(h))


class TinyLlama(nn.Module):
    def __init__(
        self, heads: int = 4, kv_heads: int = 4, rotary: str | None = "buffer", repeat: str = "expand", depth: int = 2
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block(DIM, heads, kv_heads, rotary, repeat) for _ in range(depth)])
        self.norm = RMSNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


def _model(**kwargs: object) -> tuple[TinyLlama, dict[str, Tensor]]:
    torch.manual_seed(0)
    model = TinyLlama(**kwargs).eval()  # type: ignore[arg-type]
    return model, {"ids": torch.randint(0, VOCAB, (2, TOKENS))}


def _groups(spec: PermSpec) -> dict[str, tuple[int, int, str | None, bool]]:
    return {n: (g.size, g.num_blocks, g.block_tie, g.whole_blocks) for n, g in spec.groups.items()}


def _outputs(model: nn.Module, state: Mapping[str, Tensor], inputs: Mapping[str, Tensor]) -> Tensor:
    model.load_state_dict(state)
    with torch.no_grad():
        return model(**inputs)


def _recover(spec: PermSpec, state: dict[str, Tensor], mode: str, seed: int) -> dict[str, Tensor]:
    perms = random_permutations(spec, torch.Generator().manual_seed(seed))
    permuted = permute_state_dict(spec, state, perms)
    params = MudscParams(mode=mode, beta=1.0)  # type: ignore[arg-type]  # git_rebasin / weight_zip
    outcome = find_correspondences([state, permuted], spec, params, None)
    return build_merged_state([state, permuted], spec, outcome.correspondences)


# --------------------------------------------------------------------------- stage 1: rotary
ROTARY = ["buffer", "positions"]


@pytest.mark.parametrize("rotary", ROTARY)
def test_rotary_heads_are_whole_blocks(rotary: str) -> None:
    model, inputs = _model(rotary=rotary)
    result = trace_spec(model, inputs)
    spec = result.spec
    groups = _groups(spec)
    for layer in ("layers.0", "layers.1"):
        assert groups[f"{layer}.attn.q_proj"] == (16, 4, None, True)  # q/k: 4 heads moving as wholes
        assert groups[f"{layer}.attn.v_proj"] == (16, 4, f"{layer}.attn.q_proj", False)  # v: tied, free inside
        assert groups[f"{layer}.mlp.gate"] == (24, 1, None, False)
    assert groups["embed"] == (16, 1, None, False)
    assert len(groups) == 7
    qk = {(p, a) for p, a, *_ in spec.entries("layers.0.attn.q_proj")}
    assert qk == {("layers.0.attn.q_proj.weight", 0), ("layers.0.attn.k_proj.weight", 0)}
    assert ("layers.0.attn.o_proj.weight", 1) in {(p, a) for p, a, *_ in spec.entries("layers.0.attn.v_proj")}
    summary = {g.name: g for g in result.free_groups}
    assert ROTARY_REASON in summary["layers.0.attn.q_proj"].reasons
    assert any("non-parameter tensor" in reason for reason in result.pinned_by)
    error = self_check(model, spec, inputs, trials=3)
    print(f"self-check error ({rotary}): {error:.2e}")
    assert error < 1e-5


def test_without_rotary_heads_are_free_inside() -> None:
    model, inputs = _model(rotary=None)
    spec = trace_spec(model, inputs).spec
    assert _groups(spec)["layers.0.attn.q_proj"] == (16, 4, None, False)
    assert self_check(model, spec, inputs) < 1e-5


def test_random_whole_block_permutations_keep_units_in_blocks_and_outputs() -> None:
    model, inputs = _model(rotary="buffer")
    spec = trace_spec(model, inputs).spec
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _outputs(model, state, inputs)
    for seed in range(3):
        perms = random_permutations(spec, torch.Generator().manual_seed(seed))
        qk = perms["layers.0.attn.q_proj"].view(4, 4)
        assert torch.equal(qk - qk[:, :1], torch.arange(4).repeat(4, 1))  # identity inside every head
        assert torch.equal(qk[:, 0] % 4, torch.zeros(4, dtype=torch.long))
        v = perms["layers.0.attn.v_proj"].view(4, 4)
        assert torch.equal(v // 4, (qk // 4))  # v's heads follow q/k's
        actual = _outputs(model, permute_state_dict(spec, state, perms), inputs)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # A permutation inside a rotary head does change the outputs: the pin is real.
    inside = {"layers.0.attn.q_proj": block_permutation(torch.arange(4), torch.stack([torch.randperm(4)] * 4))}
    changed = _outputs(model, permute_state_dict(spec, state, inside), inputs)
    assert not torch.allclose(changed, expected, atol=1e-4)


@pytest.mark.parametrize("mode", ["align", "zip"])
@pytest.mark.parametrize("rotary", ROTARY)
def test_rotary_permuted_copy_is_recovered(mode: str, rotary: str) -> None:
    model, inputs = _model(rotary=rotary)
    spec = trace_spec(model, inputs).spec
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = _recover(spec, state, mode, seed=3)
    assert set(merged) == set(state)
    for name, tensor in state.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- stage 1: matchers
def _block_problem(num_blocks: int, size: int, shuffle_inside: bool, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Model 1's units are model 0's with blocks permuted (and, optionally, units shuffled inside blocks)."""
    gen = torch.Generator().manual_seed(seed)
    n = num_blocks * size
    features = torch.randn(n, 40, generator=gen, dtype=torch.float64)
    block_order = torch.randperm(num_blocks, generator=gen)
    within = torch.stack([torch.randperm(size, generator=gen) if shuffle_inside else torch.arange(size)] * num_blocks)
    perm = block_permutation(block_order, within)  # model 1 unit i = model 0 unit perm[i]
    noisy = features[perm] + (0.3 if shuffle_inside else 0.0) * torch.randn(n, 40, generator=gen, dtype=torch.float64)
    return row_correlation(torch.cat([features, noisy])), perm, block_order


@pytest.mark.parametrize("blocks,size", [(4, 3), (5, 2), (1, 4)])
def test_align_whole_blocks_recovers_block_permutation(blocks: int, size: int) -> None:
    sim, perm, _ = _block_problem(blocks, size, shuffle_inside=False)
    match = align_match(sim, 2, num_blocks=blocks, whole_blocks=True)
    assert match.index is not None
    assert torch.equal(match.index[1], invert_permutation(perm))  # merged unit j <- model 1 unit holding unit j
    assert torch.equal(match.index[0], torch.arange(blocks * size))
    if blocks > 1:
        assert match.block_pairing is not None and match.block_labels is not None
    unit_match = align_match(sim, 2, num_blocks=blocks)
    assert torch.equal(unit_match.index[1], match.index[1])  # type: ignore[index]


def test_align_whole_blocks_never_reorders_inside_blocks() -> None:
    blocks, size = 4, 5
    sim, perm, block_order = _block_problem(blocks, size, shuffle_inside=True)
    match = align_match(sim, 2, num_blocks=blocks, whole_blocks=True)
    assert match.index is not None
    source = match.index[1].view(blocks, size)
    assert torch.equal(source - source[:, :1], torch.arange(size).repeat(blocks, 1))
    assert torch.equal(source[:, 0] // size, invert_permutation(block_order))  # blocks still found
    free = align_match(sim, 2, num_blocks=blocks)  # the unit-level matcher does reorder
    assert free.index is not None and not torch.equal(free.index[1], match.index[1])
    # A given pairing is reused, identity inside.
    pairing = torch.stack([torch.arange(blocks), torch.tensor([3, 2, 1, 0])])
    given = align_match(sim, 2, num_blocks=blocks, block_pairing=pairing, whole_blocks=True)
    assert given.index is not None
    assert torch.equal(given.index[1], (torch.tensor([3, 2, 1, 0])[:, None] * size + torch.arange(size)).reshape(-1))


@pytest.mark.parametrize("shuffle_inside", [False, True])
def test_zip_whole_blocks_expands_block_labels(shuffle_inside: bool) -> None:
    blocks, size = 4, 3
    n = blocks * size
    sim, perm, block_order = _block_problem(blocks, size, shuffle_inside=shuffle_inside)
    match = zip_match(sim, 2, num_blocks=blocks, whole_blocks=True)
    assert match.block_labels is not None and match.merged_blocks == blocks
    labels = match.block_labels.numpy()
    unmerge = torch.cat(match.unmerge).numpy()  # (2n, m)
    unit_labels = unmerge.argmax(axis=1)
    for block in range(2 * blocks):
        model, b = divmod(block, blocks)
        units = model * n + b * size + np.arange(size)
        assert (unit_labels[units] == labels[block] * size + np.arange(size)).all()  # unit t -> label*d + t
    if not shuffle_inside:  # a permuted copy: every block zips with its copy
        for b in range(blocks):
            assert labels[b] == labels[blocks + int(invert_permutation(block_order)[b])]
        assert torch.equal(torch.from_numpy(unit_labels[n:]), unit_labels_of(perm, unit_labels[:n]))
    torch.testing.assert_close(torch.cat(match.merge).sum(dim=0), torch.ones(match.unmerge[0].shape[1]))


def unit_labels_of(perm: Tensor, labels0: np.ndarray) -> Tensor:
    return torch.from_numpy(labels0)[perm]


def test_zip_tied_group_zips_inside_the_roots_block_sets() -> None:
    """A group tied to a whole-block zip is zipped inside each merged block's set of blocks."""
    blocks, size = 3, 4
    sim, _, _ = _block_problem(blocks, size, shuffle_inside=False, seed=1)
    root = zip_match(sim, 2, num_blocks=blocks, whole_blocks=True)
    assert root.block_pairing is None and root.block_labels is not None
    other, _, _ = _block_problem(blocks, size, shuffle_inside=True, seed=2)
    tied = zip_match(other, 2, num_blocks=blocks, block_labels=root.block_labels)
    assert tied.merged_blocks == root.merged_blocks
    unit_labels = torch.cat(tied.unmerge).argmax(dim=1).view(2 * blocks, size)
    for block, label in enumerate(root.block_labels.tolist()):
        assert ((unit_labels[block] // size) == label).all()  # every unit stays in its block's merged block


def test_matchers_registry_passes_whole_blocks() -> None:
    sim, perm, _ = _block_problem(4, 3, shuffle_inside=True)
    params = MudscParams(mode="align", beta=1.0)
    match = MATCHERS["align"](sim, 2, params, num_blocks=4, block_pairing=None, whole_blocks=True)
    assert match.index is not None
    source = match.index[1].view(4, 3)
    assert torch.equal(source - source[:, :1], torch.arange(3).repeat(4, 1))
    zipped = MATCHERS["zip"](sim, 2, MudscParams(mode="zip"), num_blocks=4, block_pairing=None, whole_blocks=True)
    assert zipped.block_labels is not None


# --------------------------------------------------------------------------- stage 2: GQA
def test_expand_index_and_matrix_agree() -> None:
    perm = block_permutation(torch.tensor([1, 0]), torch.tensor([[2, 0, 1], [1, 2, 0]]))  # 2 blocks of 3
    index = expand_index(perm, 3, 2)
    assert sorted(index.tolist()) == list(range(12))
    matrix = torch.zeros(6, 6)
    matrix[perm, torch.arange(6)] = 1.0  # column j picks unit perm[j]
    expanded = expand_matrix(matrix, 2, 2, 2)
    x = torch.randn(5, 12)
    torch.testing.assert_close(x @ expanded, x[:, index])
    # Block j of the group appears twice in a row, each copy with the block's permutation.
    assert index.tolist() == [6 + 2, 6 + 0, 6 + 1, 9 + 2, 9 + 0, 9 + 1, 1, 2, 0, 4, 5, 3]


def test_spec_checks_expanded_segment_lengths() -> None:
    groups = {"kv": UnitGroup("kv", 6, num_blocks=2)}
    spec = PermSpec(groups, {"q": ((Segment("kv", 12, "out", 2),), None), "k": ((Segment("kv", 6),), None)})
    validate_state_dict(spec, {"q": torch.zeros(12, 3), "k": torch.zeros(6, 3)})
    with pytest.raises(ArchitectureMismatch):
        validate_state_dict(spec, {"q": torch.zeros(6, 3), "k": torch.zeros(6, 3)})
    perm = torch.tensor([3, 4, 5, 1, 2, 0])
    moved = permute_state_dict(spec, {"q": torch.arange(12.0)[:, None], "k": torch.arange(6.0)[:, None]}, {"kv": perm})
    assert moved["q"][:, 0].tolist() == [6, 7, 8, 9, 10, 11, 1, 2, 0, 4, 5, 3]
    bad = PermSpec(groups, {"q": ((Segment("kv", 6, "out", 2),), None)})
    with pytest.raises(SpecError):
        bad.check()


GQA = [("expand", None), ("interleave", None), ("expand", "buffer"), ("interleave", "positions")]


@pytest.mark.parametrize("repeat,rotary", GQA)
def test_gqa_spec_expands_q_and_o(repeat: str, rotary: str | None) -> None:
    model, inputs = _model(heads=4, kv_heads=2, rotary=rotary, repeat=repeat)
    result = trace_spec(model, inputs)
    spec = result.spec
    groups = _groups(spec)
    whole = rotary is not None
    assert groups["layers.0.attn.q_proj"] == (8, 2, None, whole)  # units: k's rows, 2 kv heads of 4 dims
    assert groups["layers.0.attn.v_proj"] == (8, 2, "layers.0.attn.q_proj", False)
    assert len(groups) == 7
    q_rows = spec.axes["layers.0.attn.q_proj.weight"][0]
    assert q_rows == (Segment("layers.0.attn.q_proj", 16, "out", 2),)
    assert spec.axes["layers.0.attn.k_proj.weight"][0] == (Segment("layers.0.attn.q_proj", 8, "out", 1),)
    assert spec.axes["layers.0.attn.o_proj.weight"][1] == (Segment("layers.0.attn.v_proj", 16, "in", 2),)
    error = self_check(model, spec, inputs, trials=3)
    print(f"self-check error (GQA {repeat}, rotary {rotary}): {error:.2e}")
    assert error < 1e-5


@pytest.mark.parametrize("mode", ["align", "zip"])
@pytest.mark.parametrize("repeat,rotary", GQA)
def test_gqa_permuted_copy_is_recovered(mode: str, repeat: str, rotary: str | None) -> None:
    model, inputs = _model(heads=4, kv_heads=2, rotary=rotary, repeat=repeat)
    spec = trace_spec(model, inputs).spec
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = _recover(spec, state, mode, seed=5)
    for name, tensor in state.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(_outputs(model, merged, inputs), _outputs(model, state, inputs))


def test_gqa_single_kv_head() -> None:
    """Multi-query attention (one kv head): the kv group has one block, repeated on q and o."""
    model, inputs = _model(heads=4, kv_heads=1, rotary=None)
    spec = trace_spec(model, inputs).spec
    assert _groups(spec)["layers.0.attn.q_proj"] == (4, 1, None, False)
    assert spec.axes["layers.0.attn.q_proj.weight"][0] == (Segment("layers.0.attn.q_proj", 16, "out", 4),)
    assert self_check(model, spec, inputs) < 1e-5
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = _recover(spec, state, "align", seed=1)
    for name, tensor in state.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- both: dual-space merging
@pytest.mark.parametrize("mode", ["align", "zip"])
@pytest.mark.parametrize("kv_heads,rotary", [(4, "buffer"), (2, "positions")])
def test_mudsc_merges_two_models_with_activations(mode: str, kv_heads: int, rotary: str) -> None:
    """Activation sites of whole-block and expanded groups, dual similarity, a loadable merged model."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(TinyLlama(heads=4, kv_heads=kv_heads, rotary=rotary).eval())
    inputs = {"ids": torch.randint(0, VOCAB, (2, TOKENS))}
    spec = trace_spec(models[0], inputs).spec
    calibration = [torch.randint(0, VOCAB, (4, TOKENS)) for _ in range(2)]
    sims = activation_correlations(models, spec, calibration)
    assert set(sims) == set(spec.groups)
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    params = MudscParams(mode=mode, beta=0.5, max_sweeps=3)  # type: ignore[arg-type]
    outcome = find_correspondences(states, spec, params, sims)
    qk = outcome.correspondences["layers.0.attn.q_proj"]
    if mode == "align":
        assert qk.index is not None
        source = qk.index[1].view(kv_heads, -1)
        assert torch.equal(source - source[:, :1], torch.arange(4).repeat(kv_heads, 1))  # whole heads
    merged = build_merged_state(states, spec, outcome.correspondences)
    target = TinyLlama(heads=4, kv_heads=kv_heads, rotary=rotary).eval()
    target.load_state_dict(merged)
    with torch.no_grad():
        assert torch.isfinite(target(**inputs)).all()
