"""The Hugging Face model folder format (torch-free): which files of a folder hold the weights.

One set of rules, used by every layer that meets a folder: the API's submission check (on an S3
listing), the worker's download plan (the same listing) and the core's reader (a local folder).

- With ``model.safetensors.index.json``: the weights are the shards its ``weight_map`` names
  (each a plain ``*.safetensors`` file name in the folder itself); the index is a JSON object of
  at most :data:`MAX_INDEX_BYTES` whose ``weight_map`` maps tensor names to shard names.
- Without an index: ``model.safetensors``, else the folder's only ``*.safetensors`` file; a
  folder with several shards and no index is refused (which tensor lives where is unknown).
- Besides the weights a folder may carry small sidecar files: the model config, the generation
  config, the tokenizer's files and chat template, the model card (:data:`SIDECARS`, a fixed
  allow-list, each at most :data:`MAX_SIDECAR_BYTES`). Nothing else (pickles, code, hidden files,
  sub-folders) is read. :data:`TOKENIZER_FILES` are the ones a merged model takes from its
  tokenizer source, so that ``AutoTokenizer.from_pretrained`` works on the result.

Failures raise :class:`~mudsc_core.errors.InvalidCheckpoint` or
:class:`~mudsc_core.errors.ObjectNotFound` (a shard the index names is absent), whose messages name
the file; callers prefix the location (an S3 URI or a local path).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from mudsc_core.errors import InvalidCheckpoint, ObjectNotFound
from mudsc_core.formats import json_limits

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MAX_INDEX_BYTES = 16 * 1024**2
MAX_FOLDER_OBJECTS = 10_000
GENERATION_CONFIG_NAME = "generation_config.json"
CARD_NAME = "README.md"
# What a tokenizer (fast or sentencepiece-based), its chat template and a processor save; never code.
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.jinja",
        "chat_template.json",
        "preprocessor_config.json",
        "processor_config.json",
    }
)
SIDECARS = frozenset({CONFIG_NAME, GENERATION_CONFIG_NAME, CARD_NAME, INDEX_NAME, *TOKENIZER_FILES})
MAX_SIDECAR_BYTES = 64 * 1024**2
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}\.safetensors$")


def is_shard_name(name: str) -> bool:
    """A plain ``*.safetensors`` file name inside the folder (no path, not hidden)."""
    return bool(_SHARD_NAME.match(name))


def is_sidecar_name(name: str) -> bool:
    """A small non-weight file worth carrying along (config, tokenizer, model card)."""
    return name in SIDECARS


def parse_index(raw: bytes) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of an index file, validated."""
    try:
        data: Any = json_limits.loads(raw, max_bytes=MAX_INDEX_BYTES, max_depth=8, what="index file")
    except json_limits.UntrustedJsonError as exc:
        raise InvalidCheckpoint(f"{INDEX_NAME}: {exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
    ):
        raise InvalidCheckpoint(
            f"{INDEX_NAME}: not a valid safetensors index (needs a weight_map of tensor name -> shard file)"
        )
    for shard in weight_map.values():
        if not is_shard_name(shard):
            raise InvalidCheckpoint(f"{INDEX_NAME}: shard name {shard!r} is not a plain .safetensors file name")
    return dict(weight_map)


def shards_of(weight_map: Mapping[str, str]) -> list[str]:
    """The distinct shard files an index names, in first-mention order."""
    return list(dict.fromkeys(weight_map.values()))


def weight_files(names: Collection[str], weight_map: Mapping[str, str] | None) -> list[str]:
    """The weight files of a folder holding ``names`` (plain file names), by the rules above.

    ``weight_map`` is the parsed index when the folder has one (``INDEX_NAME in names``).
    """
    if weight_map is not None:
        shards = shards_of(weight_map)
        for shard in shards:
            if shard not in names:
                raise ObjectNotFound(f"{shard}: shard named by {INDEX_NAME} not found")
        return shards
    if SINGLE_NAME in names:
        return [SINGLE_NAME]
    candidates = sorted(n for n in names if is_shard_name(n))
    if len(candidates) == 1:
        return candidates
    if not candidates:
        raise InvalidCheckpoint(f"model folder has no {SINGLE_NAME} or {INDEX_NAME} (no .safetensors files)")
    raise InvalidCheckpoint(
        f"model folder has no {SINGLE_NAME} or {INDEX_NAME} and {len(candidates)} "
        ".safetensors files (which tensor lives where is unknown)"
    )


def files_to_fetch(sizes: Mapping[str, int], weight_map: Mapping[str, str] | None) -> list[str]:
    """Everything worth downloading from a folder listed with its sizes: weight files, index and sidecars."""
    weights = weight_files(sizes, weight_map)
    sidecars = sorted(n for n in sizes if is_sidecar_name(n) and n not in weights)
    for name in sidecars:
        if sizes[name] > MAX_SIDECAR_BYTES:
            raise InvalidCheckpoint(
                f"{name} is {sizes[name]} bytes, more than the {MAX_SIDECAR_BYTES} a sidecar file may have"
            )
    return weights + sidecars
