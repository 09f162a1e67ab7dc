"""The spec data model, its consistency checks, and random permutations / their application."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mudsc_core.architectures.builders import SpecBuilder
from mudsc_core.errors import ArchitectureMismatch, SpecError
from mudsc_core.permutation.permute import (
    block_permutation,
    identity_permutations,
    invert_permutation,
    permute_state_dict,
    random_permutations,
)
from mudsc_core.permutation.spec import PermSpec, Segment, UnitGroup, validate_state_dict


def _headed_spec(heads: int = 3, head_dim: int = 4) -> PermSpec:
    """A tiny attention-like spec: stream -> qk(+v tied) -> proj, plus a plain MLP group."""
    b = SpecBuilder()
    dim = heads * head_dim
    b.group("stream", dim)
    b.group("qk", dim, num_blocks=heads)
    b.group("v", dim, num_blocks=heads, block_tie="qk")
    b.group("hidden", 5)
    b.param("qkv.weight", b.segments(["qk", "qk", "v"], "out"), b.axis("stream", "in"))
    b.linear("proj", "stream", "v")
    b.linear("fc", "hidden", "stream")
    b.batchnorm("bn", "hidden")
    b.linear("head", None, "hidden")
    b.head("head.weight", "head.bias")
    return b.build()


def _state(spec: PermSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "qkv.weight": (36, 12),
        "proj.weight": (12, 12),
        "proj.bias": (12,),
        "fc.weight": (5, 12),
        "fc.bias": (5,),
        "bn.weight": (5,),
        "bn.bias": (5,),
        "bn.running_mean": (5,),
        "bn.running_var": (5,),
        "head.weight": (2, 5),
        "head.bias": (2,),
    }
    state = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    state["bn.num_batches_tracked"] = torch.tensor(3)
    return state


def test_entries_list_segments_with_offsets() -> None:
    spec = _headed_spec()
    assert list(spec.entries("qk")) == [("qkv.weight", 0, 0, 12, "out"), ("qkv.weight", 0, 12, 24, "out")]
    assert list(spec.entries("v")) == [("qkv.weight", 0, 24, 36, "out"), ("proj.weight", 1, 0, 12, "in")]
    assert spec.group_order() == ("stream", "qk", "v", "hidden")
    assert spec.excluded == frozenset({"bn.num_batches_tracked"})
    assert spec.block_tie_root("v") == "qk"


@pytest.mark.parametrize(
    ("groups", "axes", "extra", "message"),
    [
        ({"a": UnitGroup("a", 6, num_blocks=4)}, {}, {}, "not divisible"),
        ({"a": UnitGroup("a", 4, num_blocks=2, block_tie="b")}, {}, {}, "block_tie"),
        (
            {"a": UnitGroup("a", 4, num_blocks=2, block_tie="b"), "b": UnitGroup("b", 4, num_blocks=2, block_tie="a")},
            {},
            {},
            "cycle",
        ),
        ({"a": UnitGroup("a", 4)}, {"w": ((Segment("z", 4),),)}, {}, "unknown unit group"),
        ({"a": UnitGroup("a", 4)}, {"w": ((Segment("a", 3),),)}, {}, "length 3"),
        ({"a": UnitGroup("a", 4), "b": UnitGroup("b", 4)}, {}, {"order": ("a",)}, "order"),
        ({"a": UnitGroup("a", 4)}, {}, {"head_params": ("head.weight",)}, "head parameter"),
        ({"a": UnitGroup("a", 4)}, {"w": (None,)}, {"excluded": frozenset({"w"})}, "both excluded"),
        ({"a": UnitGroup("b", 4)}, {}, {}, "named"),
    ],
)
def test_check_rejects_inconsistent_specs(groups: dict, axes: dict, extra: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        PermSpec(groups=groups, axes=axes, **extra).check()


def test_builder_rejects_duplicates() -> None:
    b = SpecBuilder()
    b.group("a", 2)
    with pytest.raises(ValueError, match="twice"):
        b.group("a", 2)
    b.linear("fc", "a", None)
    with pytest.raises(ValueError, match="twice"):
        b.linear("fc", "a", None)
    with pytest.raises(ValueError, match="identity shortcut"):
        b.residual_block("blk", stream_in="a", stream_out="c", inner="a", norm="batch", shortcut=False)


def test_validate_state_dict_names_the_parameter() -> None:
    spec = _headed_spec()
    state = _state(spec)
    validate_state_dict(spec, state)
    validate_state_dict(spec, {k: v for k, v in state.items() if k != "bn.num_batches_tracked"})
    with pytest.raises(ArchitectureMismatch, match="missing parameter 'proj.bias'"):
        validate_state_dict(spec, {k: v for k, v in state.items() if k != "proj.bias"})
    with pytest.raises(ArchitectureMismatch, match="'extra'"):
        validate_state_dict(spec, {**state, "extra": torch.zeros(1)})
    with pytest.raises(ArchitectureMismatch, match="qkv.weight: axis 0 has 35"):
        validate_state_dict(spec, {**state, "qkv.weight": torch.zeros(35, 12)})
    with pytest.raises(ArchitectureMismatch, match="fc.bias: expected 1 dims"):
        validate_state_dict(spec, {**state, "fc.bias": torch.zeros(5, 1)})


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), heads=st.integers(1, 4), head_dim=st.integers(1, 4))
def test_random_permutations_respect_blocks_and_ties(seed: int, heads: int, head_dim: int) -> None:
    spec = _headed_spec(heads, head_dim)
    perms = random_permutations(spec, torch.Generator().manual_seed(seed))
    assert set(perms) == set(spec.groups)
    for name, perm in perms.items():
        group = spec.groups[name]
        assert perm.dtype == torch.int64
        assert torch.equal(perm.sort().values, torch.arange(group.size))
        source_block = (perm // group.block_size).view(group.num_blocks, group.block_size)  # (G, b)
        assert torch.equal(source_block, source_block[:, :1].expand_as(source_block))  # blocks move whole
    qk_blocks = perms["qk"].view(heads, head_dim)[:, 0] // head_dim
    v_blocks = perms["v"].view(heads, head_dim)[:, 0] // head_dim
    assert torch.equal(qk_blocks, v_blocks)


def test_random_permutations_are_reproducible_and_vary() -> None:
    spec = _headed_spec()
    a = random_permutations(spec, torch.Generator().manual_seed(3))
    b = random_permutations(spec, torch.Generator().manual_seed(3))
    c = random_permutations(spec, torch.Generator().manual_seed(4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_block_permutation_known_answer() -> None:
    perm = block_permutation(torch.tensor([1, 0]), torch.tensor([[1, 0, 2], [2, 1, 0]]))
    assert perm.tolist() == [4, 3, 5, 2, 1, 0]


def test_permute_state_dict_known_answer_and_no_mutation() -> None:
    spec = _headed_spec()
    state = _state(spec)
    originals = {k: v.clone() for k, v in state.items()}
    perms = {"hidden": torch.tensor([4, 0, 3, 1, 2])}
    out = permute_state_dict(spec, state, perms)
    assert all(torch.equal(state[k], originals[k]) for k in state)
    torch.testing.assert_close(out["fc.weight"], state["fc.weight"][perms["hidden"]])
    torch.testing.assert_close(out["bn.running_var"], state["bn.running_var"][perms["hidden"]])
    torch.testing.assert_close(out["head.weight"], state["head.weight"][:, perms["hidden"]])
    torch.testing.assert_close(out["qkv.weight"], state["qkv.weight"])  # groups absent: identity
    assert all(out[k].data_ptr() != state[k].data_ptr() for k in state)  # new tensors throughout

    v_perm = torch.tensor([1, 0, 3, 2, 9, 8, 11, 10, 5, 4, 7, 6])
    out = permute_state_dict(spec, state, {"v": v_perm})
    torch.testing.assert_close(out["qkv.weight"][24:], state["qkv.weight"][24:][v_perm])
    torch.testing.assert_close(out["qkv.weight"][:24], state["qkv.weight"][:24])
    torch.testing.assert_close(out["proj.weight"], state["proj.weight"][:, v_perm])


def test_inverse_permutation_round_trips() -> None:
    spec = _headed_spec()
    state = _state(spec)
    perms = random_permutations(spec, torch.Generator().manual_seed(11))
    there = permute_state_dict(spec, state, perms)
    back = permute_state_dict(spec, there, {k: invert_permutation(p) for k, p in perms.items()})
    for k in state:
        torch.testing.assert_close(back[k], state[k])
    same = permute_state_dict(spec, state, identity_permutations(spec))
    assert all(torch.equal(same[k], state[k]) for k in state)


@pytest.mark.parametrize(
    ("perms", "message"),
    [
        ({"nope": torch.arange(3)}, "unknown unit group"),
        ({"hidden": torch.arange(4)}, "shape"),
        ({"hidden": torch.arange(5.0)}, "integer"),
        ({"hidden": torch.tensor([0, 0, 1, 2, 3])}, "not a permutation"),
    ],
)
def test_permute_state_dict_rejects_bad_permutations(perms: dict, message: str) -> None:
    spec = _headed_spec()
    with pytest.raises(ValueError, match=message):
        permute_state_dict(spec, _state(spec), perms)
