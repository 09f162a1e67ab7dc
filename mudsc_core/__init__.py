"""mudsc_core: the pure merge library.

Importing this package (or ``mudsc_core.schema``) does not import torch: the API process
uses the schema without it. The torch-backed entry points are resolved lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = ["merge", "build_model", "MergeResult", "merge_files", "merge_checkpoints"]

_LAZY = {
    "merge": ("mudsc_core.permutation.merge", "merge"),
    "MergeResult": ("mudsc_core.permutation.merge", "MergeResult"),
    "merge_files": ("mudsc_core.files", "merge_files"),
    "merge_checkpoints": ("mudsc_core.same_base.stream", "merge_checkpoints"),
    "build_model": ("mudsc_core.architectures", "build_model"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'mudsc_core' has no attribute {name!r}")
