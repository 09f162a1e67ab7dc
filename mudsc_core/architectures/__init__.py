"""Built-in architectures: torch modules and their permutation specs, looked up by name.

Each architecture module provides ``build(config) -> nn.Module`` and ``spec(config) -> PermSpec``
for its typed config (``mudsc_core.schema.architectures``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from mudsc_core.architectures import mlp, resnet, vgg, vit
from mudsc_core.errors import ArchitectureMismatch
from mudsc_core.permutation.spec import PermSpec, validate_state_dict
from mudsc_core.schema.job import ArchitectureSpec

_MODULES: dict[str, ModuleType] = {"mlp": mlp, "vgg": vgg, "resnet": resnet, "vit": vit}


def _resolve(architecture: ArchitectureSpec | Mapping[str, Any]) -> tuple[ModuleType, Any]:
    if not isinstance(architecture, ArchitectureSpec):
        architecture = ArchitectureSpec.model_validate(architecture)
    return _MODULES[architecture.name], architecture.typed_config()


def build_model(architecture: ArchitectureSpec | Mapping[str, Any]) -> nn.Module:
    """A fresh model with default initialisation, on CPU."""
    module, config = _resolve(architecture)
    builder: Callable[[Any], nn.Module] = module.build
    return builder(config)


def perm_spec(architecture: ArchitectureSpec | Mapping[str, Any]) -> PermSpec:
    module, config = _resolve(architecture)
    spec: Callable[[Any], PermSpec] = module.spec
    return spec(config)


def expected_shapes(architecture: ArchitectureSpec | Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shape of every state-dict entry, computed on the meta device (no memory is allocated)."""
    module, config = _resolve(architecture)
    with torch.device("meta"):
        model = module.build(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_checkpoint(architecture: ArchitectureSpec | Mapping[str, Any], state: Mapping[str, Tensor]) -> None:
    """Raise ArchitectureMismatch unless ``state`` has exactly the architecture's entries and shapes."""
    validate_state_dict(perm_spec(architecture), state)
    for name, shape in expected_shapes(architecture).items():
        if name not in state:
            continue  # only excluded entries (e.g. num_batches_tracked) may be absent
        actual = tuple(getattr(state[name], "shape", ()))
        if actual != shape:
            raise ArchitectureMismatch(
                f"{name}: checkpoint has shape {list(actual)}, the architecture expects {list(shape)}"
            )


__all__ = ["build_model", "perm_spec", "check_checkpoint", "expected_shapes"]
