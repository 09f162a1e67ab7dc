"""Row-block merging of large tensors (``mudsc_core.same_base.blocks``): bit for bit the whole-tensor merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mudsc_core.errors import InvalidCheckpoint
from mudsc_core.io import load_state_dict, open_checkpoint, save_state_dict
from mudsc_core.same_base import blocks
from mudsc_core.same_base.stream import build_merger, merge_checkpoints
from mudsc_core.schema.methods import METHODS


def _checkpoints(tmp_path: Path, dtype: torch.dtype = torch.float32, ties: bool = True) -> tuple[Path, list[Path]]:
    """A base and two models; with ``ties`` the task vectors take few distinct magnitudes (exactly
    representable, so many entries equal each top-k threshold)."""
    g = torch.Generator().manual_seed(3)
    shapes = {"embed.weight": (37, 24), "head.weight": (41, 3, 8), "layer.weight": (8, 8), "norm.weight": (24,)}
    base = {n: torch.randint(-8, 8, s, generator=g).to(torch.float32) / 4 for n, s in shapes.items()}
    base["position_ids"] = torch.arange(7)
    save_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}, tmp_path / "base")
    paths = []
    for i in range(2):
        state = {}
        for name, value in base.items():
            if not value.is_floating_point():
                state[name] = value
                continue
            if ties:
                delta = torch.randint(-3, 4, value.shape, generator=g).to(torch.float32) / 8
            else:
                delta = torch.randn(value.shape, generator=g) * 0.1
            state[name] = (value + delta).to(dtype)
        save_state_dict(state, tmp_path / f"m{i}", shard_size_bytes=2000)
        paths.append(tmp_path / f"m{i}")
    return tmp_path / "base", paths


def _merge(method: str, params: dict, base: Path, models: list[Path], out: Path, **kw: object) -> dict:
    return merge_checkpoints(
        method, params, models, base, [1.0, 0.7], out, dtype="float32", shard_size_bytes=1 << 30, **kw
    )


CASES = [
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.5, "topk_scope": "model"}),
    ("dare_ties", {"density": 0.4, "seed": 5}),
    ("dare_ties", {"density": 0.4, "rescale": False}),
    ("dare_linear", {"density": 0.6}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
    ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.05}),
    ("della", {"density": 0.5, "epsilon": 0.1}),
    ("della_linear", {"density": 0.5, "epsilon": 0.2}),
    ("task_arithmetic", {}),
    ("task_arithmetic", {"scaling_factor": 0.6}),
]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32) if tensor.dtype == torch.float32 else tensor


@pytest.mark.parametrize("ties", [True, False], ids=["ties_at_threshold", "distinct"])
@pytest.mark.parametrize(("method", "params"), CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_blocked_merge_equals_whole_tensor_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, params: dict, ties: bool
) -> None:
    base, models = _checkpoints(tmp_path, ties=ties)
    whole = _merge(method, params, base, models, tmp_path / "whole")
    calls: list[str] = []
    original = blocks.merge_blocked

    def counting(*args: object, **kw: object) -> torch.Tensor:
        calls.append(str(args[1]))
        return original(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(blocks, "merge_blocked", counting)
    monkeypatch.setattr(blocks, "BLOCK_ABOVE_BYTES", 0)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 50)  # two or three rows a block
    blocked = _merge(method, params, base, models, tmp_path / "blocked")
    assert sorted(calls) == ["embed.weight", "head.weight", "layer.weight"]  # 1-D tensors stay whole
    a, b = load_state_dict(tmp_path / "whole"), load_state_dict(tmp_path / "blocked")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(_bits(a[name]), _bits(b[name])), name
    # the report's statistics: the same sample, norms up to rounding
    for row_a, row_b in zip(whole["tensor_stats"], blocked["tensor_stats"]):
        assert row_a["name"] == row_b["name"] and row_a["numel"] == row_b["numel"]
        assert row_a["sign_conflict"] == row_b["sign_conflict"] and row_a["kept"] == row_b["kept"]
        assert row_b["task_vector_norms"] == pytest.approx(row_a["task_vector_norms"], rel=1e-5)
        assert row_b["merged_norm"] == pytest.approx(row_a["merged_norm"], rel=1e-5, abs=1e-6)
    assert whole["notes"] == blocked["notes"]


def test_blocked_ties_keeps_exactly_k_with_ties_lowest_index_first(tmp_path: Path, monkeypatch) -> None:
    """All magnitudes equal: TIES keeps the first int(density * n) entries of each task vector."""
    base = {"w": torch.zeros(10, 10)}
    save_state_dict(base, tmp_path / "base")
    for i in range(2):
        save_state_dict({"w": torch.full((10, 10), 1.0)}, tmp_path / f"m{i}")
    monkeypatch.setattr(blocks, "BLOCK_ABOVE_BYTES", 0)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 30)
    _merge("ties", {"density": 0.37}, tmp_path / "base", [tmp_path / "m0", tmp_path / "m1"], tmp_path / "o")
    merged = load_state_dict(tmp_path / "o")["w"].reshape(-1)
    assert torch.equal(merged[:37], torch.ones(37)) and torch.count_nonzero(merged[37:]) == 0


def test_bfloat16_checkpoints_block_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, models = _checkpoints(tmp_path, dtype=torch.bfloat16)
    _merge("ties", {"density": 0.3}, base, models, tmp_path / "whole")
    monkeypatch.setattr(blocks, "BLOCK_ABOVE_BYTES", 0)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 40)
    _merge("ties", {"density": 0.3}, base, models, tmp_path / "blocked")
    a, b = load_state_dict(tmp_path / "whole"), load_state_dict(tmp_path / "blocked")
    assert all(torch.equal(_bits(a[n]), _bits(b[n])) for n in a)


def test_nan_in_a_block_fails_naming_tensor_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, models = _checkpoints(tmp_path)
    state = load_state_dict(models[1])
    state["embed.weight"][30, 3] = float("nan")
    (tmp_path / "bad").mkdir()
    save_file(state, str(tmp_path / "bad" / "model.safetensors"))  # our writer refuses NaN
    monkeypatch.setattr(blocks, "BLOCK_ABOVE_BYTES", 0)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 50)
    with pytest.raises(InvalidCheckpoint, match="embed.weight.*NaN"):
        _merge("ties", {"density": 0.3}, base, [models[0], tmp_path / "bad"], tmp_path / "o")


def test_which_configurations_and_tensors_are_blocked(tmp_path: Path) -> None:
    def merger(method: str, **params: object) -> object:
        return build_merger(method, METHODS[method].params.model_validate(params))

    assert blocks.supports_blocks(merger("ties"))
    assert blocks.supports_blocks(merger("task_arithmetic"))
    assert blocks.supports_blocks(merger("dare_ties"))  # keep_probability: elementwise
    assert blocks.supports_blocks(merger("breadcrumbs_ties"))
    assert not blocks.supports_blocks(merger("ties", rescale=True))  # an L1 norm over the whole tensor
    assert not blocks.supports_blocks(merger("dare_ties", rescale_rule="l1_norm"))
    assert not blocks.supports_blocks(merger("slerp"))
    base, _ = _checkpoints(tmp_path)
    ckpt = open_checkpoint(base)
    big = (blocks.BLOCK_ABOVE_BYTES // 4 // 1024 + 1, 1024)
    assert blocks.wants_blocks(big, [ckpt]) and not blocks.wants_blocks((big[0] * 1024,), [ckpt])
    assert not blocks.wants_blocks((4, 4), [ckpt])


def test_row_blocks_cover_the_tensor() -> None:
    assert blocks.row_blocks((10, 3)) == [(0, 10)]
    ranges = blocks.row_blocks((blocks.BLOCK_ELEMENTS, 3))
    assert ranges[0][0] == 0 and ranges[-1][1] == blocks.BLOCK_ELEMENTS
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
