"""Checkpoint I/O: round trips, HF layouts, and every malformed file failing as invalid_checkpoint."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from mudsc_core.errors import InvalidCheckpoint
from mudsc_core.io import (
    INDEX_NAME,
    ShardWriter,
    load_state_dict,
    open_checkpoint,
    plan_shards,
    save_state_dict,
)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 4, generator=g),
        "layer.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "position_ids": torch.arange(6),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
    }


def _write_raw(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_single_file_round_trip_readable_by_safetensors(tmp_path: Path) -> None:
    state = _state()
    files = save_state_dict(state, tmp_path / "out", "float32")
    assert files == ["model.safetensors"]
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert loaded["layer.bias"].dtype == torch.float32  # float tensors in the asked dtype
    assert loaded["position_ids"].dtype == torch.int64 and loaded["mask"].dtype == torch.bool  # others kept
    assert_close(loaded["embed.weight"], state["embed.weight"])
    ours = load_state_dict(tmp_path / "out")
    assert set(ours) == set(state) and ours["empty"].shape == (0, 3)


def test_sharded_write_has_hf_names_and_index(tmp_path: Path) -> None:
    state = _state()
    files = save_state_dict(state, tmp_path / "out", "bfloat16", shard_size_bytes=100)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in state.values()
    )
    ckpt = open_checkpoint(tmp_path / "out")
    assert ckpt.dtype("embed.weight") == torch.bfloat16
    assert_close(ckpt.get("embed.weight"), state["embed.weight"].to(torch.bfloat16))


def test_unplanned_writer_spools_and_matches(tmp_path: Path) -> None:
    state = _state()
    writer = ShardWriter(tmp_path / "out", "float16", shard_size_bytes=64)
    for name, tensor in state.items():
        writer.add(name, tensor)
    files = writer.close()
    assert INDEX_NAME in files and not list((tmp_path / "out").glob(".spool-*"))
    loaded = load_state_dict(tmp_path / "out")
    assert_close(loaded["embed.weight"], state["embed.weight"].half())
    assert torch.equal(loaded["position_ids"], state["position_ids"])


def test_hf_folder_with_config_and_safetensors_shards(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    save_state_dict(_state(), folder, shard_size_bytes=100)
    (folder / "config.json").write_text("{}")
    ckpt = open_checkpoint(folder)
    assert ckpt.config_path == folder / "config.json"
    assert ckpt.shape("embed.weight") == (10, 4) and len(ckpt) == 5


def test_plan_shards_follows_hf_rule() -> None:
    assert plan_shards([("a", 60), ("b", 60), ("c", 10), ("d", 200)], 100) == [["a"], ["b", "c"], ["d"]]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"PK\x03\x04 not safetensors at all"), "not a valid safetensors"),
        (lambda p: p.write_bytes(b"\x01\x02"), "too short"),
        (
            lambda p: _write_raw(
                p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, length=2**40
            ),
            "header length",
        ),
        (lambda p: _write_raw(p, b"{not json"), "not valid UTF-8 JSON"),
        (lambda p: _write_raw(p, b"[1, 2]"), "not a JSON object"),
        (
            lambda p: _write_raw(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
            "truncated",
        ),
        (
            lambda p: _write_raw(
                p,
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            "overlap",
        ),
        (
            lambda p: _write_raw(p, {"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
            "unknown dtype",
        ),
        (lambda p: _write_raw(p, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "needs 12"),
        (
            lambda p: _write_raw(p, {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
            "non-negative integers",
        ),
    ],
)
def test_malformed_files_raise_invalid_checkpoint_naming_the_file(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(InvalidCheckpoint, match=message) as info:
        open_checkpoint(path)
    assert "bad.safetensors" in info.value.message and info.value.code == "invalid_checkpoint"


def test_truncated_real_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InvalidCheckpoint, match="truncated"):
        open_checkpoint(path)


def test_missing_shard_and_hostile_shard_names(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    save_state_dict(_state(), folder, shard_size_bytes=100)
    index = json.loads((folder / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    (folder / shards[1]).unlink()
    with pytest.raises(InvalidCheckpoint, match="missing"):
        open_checkpoint(folder)
    index["weight_map"]["embed.weight"] = "../../etc/passwd.safetensors"
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(InvalidCheckpoint, match="plain .safetensors file name"):
        open_checkpoint(folder)


def test_folder_without_weights_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidCheckpoint, match="no model.safetensors"):
        open_checkpoint(tmp_path / "empty")
    with pytest.raises(InvalidCheckpoint, match="no such checkpoint"):
        open_checkpoint(tmp_path / "nope.safetensors")


def test_nan_in_float_tensor_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"ok": torch.ones(2), "broken.weight": torch.tensor([1.0, float("nan")])}, path)
    with pytest.raises(InvalidCheckpoint, match="broken.weight"):
        load_state_dict(path)
    with pytest.raises(InvalidCheckpoint, match="broken.weight"):
        open_checkpoint(path).get_float32("broken.weight")


def test_get_returns_owned_writable_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(3)}, path)
    ckpt = open_checkpoint(path)
    first = ckpt.get("w")
    first.add_(1)  # must not affect the file or a second read
    assert_close(ckpt.get("w"), torch.ones(3))
