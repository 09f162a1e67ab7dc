"""The core's public entry points stay where integrations and benchmarks outside the repository import them."""

from __future__ import annotations

import inspect

import mudsc_core
from mudsc_core import build_model, merge, merge_checkpoints, merge_files
from mudsc_core.matching import align_match, zip_match
from mudsc_core.permutation import matching
from mudsc_core.same_base import stream


def test_entry_points_resolve_to_their_implementations() -> None:
    assert merge is mudsc_core.permutation.merge.merge
    assert merge_files is mudsc_core.files.merge_files
    assert merge_checkpoints is stream.merge_checkpoints
    assert build_model is mudsc_core.architectures.build_model
    assert align_match is matching.align_match and zip_match is matching.zip_match


def test_merge_checkpoints_keeps_its_signature() -> None:
    """The parameters callers pass today keep their names and positions; additions are optional keywords."""
    signature = list(inspect.signature(merge_checkpoints).parameters.values())
    today = [
        "method_name",
        "params",
        "models",
        "base",
        "weights",
        "out_dir",
        "dtype",
        "shard_size_bytes",
        "spec_json",
        "progress",
    ]
    assert [p.name for p in signature[: len(today)]] == today
    assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in signature[len(today) :])


def test_every_registered_implementation_imports() -> None:
    from mudsc_core.schema import METHODS

    for info in METHODS.values():
        assert callable(info.load()), info.name
