"""A Hugging Face model folder's ``config.json``: parsed as the untrusted document it is, and compared.

Torch-free: the API checks the configs of a transformers job's folders at submission with these rules,
the worker again before it builds the model (``mudsc_core.architectures.transformers``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mudsc_core.errors import ArchitectureMismatch, IncompatibleModels
from mudsc_core.formats import json_limits
from mudsc_core.formats.hf_folder import CONFIG_NAME, MAX_SIDECAR_BYTES

# Keys of config.json that describe where a checkpoint came from or how to run it, not the network.
BOOKKEEPING_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_commit_hash",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "use_cache",
        "id2label",
        "label2id",
        "finetuning_task",
        "problem_type",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
    }
)


def parse_config(raw: bytes, label: str) -> dict[str, Any]:
    """config.json's object (bounded in size and depth), else ``architecture_mismatch`` naming ``label``."""
    try:
        config = json_limits.loads(raw, max_bytes=MAX_SIDECAR_BYTES, what=f"{label}: {CONFIG_NAME}")
    except json_limits.UntrustedJsonError as exc:
        raise ArchitectureMismatch(str(exc)) from None
    if not isinstance(config, dict):
        raise ArchitectureMismatch(f"{label}: {CONFIG_NAME} is not a JSON object")
    return config


def _network_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in BOOKKEEPING_KEYS}


def _label_count(config: Mapping[str, Any]) -> int | None:
    labels = config.get("id2label")
    return len(labels) if isinstance(labels, dict) else None


def agree(configs: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> None:
    """Every config describes the network of the first (bookkeeping keys aside; label names may differ, their
    count may not), else ``incompatible_models`` naming the model and the key.

    Only keys (and label counts) that both configs hold are compared: a key one config leaves out takes its
    class default, which only the config class knows (``save_pretrained`` of transformers 5 writes every
    default, a hub config of transformers 4 few of them). The worker compares the configs again with their
    defaults filled in (``mudsc_core.architectures.transformers.resolve``), so a left-out key whose default
    differs still fails.
    """
    reference = _network_keys(configs[0])
    for config, label in zip(configs[1:], labels[1:]):
        other = _network_keys(config)
        for key in sorted(set(reference) & set(other)):
            mine, theirs = other[key], reference[key]
            if mine != theirs:
                raise IncompatibleModels(
                    f"{label}: config.json key {key!r} is {_short(mine)}, {labels[0]} has {_short(theirs)}: "
                    "the models are not one architecture"
                )
        mine_count, theirs_count = _label_count(config), _label_count(configs[0])
        if mine_count is not None and theirs_count is not None and mine_count != theirs_count:
            raise IncompatibleModels(
                f"{label}: config.json has {mine_count} labels (id2label), {labels[0]} has {theirs_count}"
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
