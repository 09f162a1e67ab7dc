"""The one set of Hugging Face folder rules (mudsc_core.formats.hf_folder), used by API, worker and reader."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mudsc_core.errors import InvalidCheckpoint, ObjectNotFound
from mudsc_core.formats import hf_folder

SHARDS = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}


def test_index_names_the_weight_files_in_first_mention_order() -> None:
    weight_map = hf_folder.parse_index(json.dumps({"metadata": {}, "weight_map": SHARDS}).encode())
    names = {*SHARDS.values(), hf_folder.INDEX_NAME, "config.json", "extra.safetensors"}
    assert hf_folder.weight_files(names, weight_map) == list(SHARDS.values())


def test_a_shard_the_index_names_must_exist() -> None:
    with pytest.raises(ObjectNotFound, match="model-00002-of-00002.safetensors"):
        hf_folder.weight_files({"model-00001-of-00002.safetensors"}, SHARDS)


def test_without_an_index_one_weight_file() -> None:
    assert hf_folder.weight_files({"model.safetensors", "other.safetensors"}, None) == ["model.safetensors"]
    assert hf_folder.weight_files({"pytorch_model.safetensors", "config.json"}, None) == ["pytorch_model.safetensors"]
    with pytest.raises(InvalidCheckpoint, match="2 .safetensors files"):
        hf_folder.weight_files({"a.safetensors", "b.safetensors"}, None)
    with pytest.raises(InvalidCheckpoint, match="no .safetensors files"):
        hf_folder.weight_files({"config.json", "pytorch_model.bin"}, None)


def test_files_to_fetch_takes_weights_and_small_sidecars_only() -> None:
    names = {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer.model",
        "README.md",
        "vocab.txt",
        "chat_template.jinja",
        "generation_config.json",
        "pytorch_model.bin",
        "modeling_evil.py",
        ".hidden.json",
        "other.safetensors",
        "optimizer.pt",
        "training_args.json",
        "notes.txt",
    }
    assert hf_folder.files_to_fetch(dict.fromkeys(names, 10), None) == [
        "model.safetensors",
        "README.md",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer.model",
        "vocab.txt",
    ]
    with pytest.raises(InvalidCheckpoint, match="tokenizer.json is"):
        hf_folder.files_to_fetch({"model.safetensors": 10, "tokenizer.json": hf_folder.MAX_SIDECAR_BYTES + 1}, None)


@pytest.mark.parametrize(
    "shard",
    [
        "../x.safetensors",
        "/etc/passwd.safetensors",
        "sub/x.safetensors",
        ".hidden.safetensors",
        "x.bin",
        "x.safetensors/",
    ],
)
def test_index_refuses_shard_names_that_are_not_plain_files(shard: str) -> None:
    with pytest.raises(InvalidCheckpoint, match="plain .safetensors file name"):
        hf_folder.parse_index(json.dumps({"weight_map": {"w": shard}}).encode())


def test_index_refuses_deep_nesting_and_oversize() -> None:
    with pytest.raises(InvalidCheckpoint):
        hf_folder.parse_index(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(InvalidCheckpoint, match="more than the"):
        hf_folder.parse_index(b" " * (hf_folder.MAX_INDEX_BYTES + 1))


json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(document=st.one_of(json_values, st.dictionaries(st.just("weight_map"), json_values)), raw=st.binary(max_size=64))
def test_any_index_document_is_accepted_or_refused_as_invalid_checkpoint(document: Any, raw: bytes) -> None:
    for body in (json.dumps(document).encode(), raw):
        try:
            weight_map = hf_folder.parse_index(body)
        except InvalidCheckpoint:
            continue
        assert weight_map and all(hf_folder.is_shard_name(v) for v in weight_map.values())
