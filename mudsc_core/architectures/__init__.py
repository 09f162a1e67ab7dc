"""Built-in architectures: torch modules looked up by name; their permutation specs are derived by tracing.

Each architecture module provides ``build(config) -> nn.Module`` and ``example_inputs(config)`` (a
small batch the tracer runs the model on) for its typed config (``mudsc_core.schema.architectures``),
and may provide ``infer_config(config, state) -> config`` to fill fields a checkpoint decides (the
CIFAR ResNet's shortcut kernel). The spec of every architecture comes from
:func:`mudsc_core.permutation.trace.trace_spec` on the built model; the hand-written ``spec(config)``
that some modules keep is the test oracle the derived spec is compared with (``oracle_spec``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import lru_cache
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from mudsc_core.architectures import mlp, resnet, torchvision_resnet, transformers, vgg, vit
from mudsc_core.errors import ArchitectureMismatch
from mudsc_core.permutation.spec import PermSpec, validate_state_dict
from mudsc_core.permutation.trace import Inputs, TraceResult, trace_spec
from mudsc_core.schema.job import ArchitectureSpec

_MODULES: dict[str, ModuleType] = {
    "mlp": mlp,
    "vgg": vgg,
    "resnet": resnet,
    "vit": vit,
    "torchvision_resnet": torchvision_resnet,
    "transformers": transformers,
}

ArchitectureLike = ArchitectureSpec | Mapping[str, Any]


def _spec_of(architecture: ArchitectureLike) -> ArchitectureSpec:
    if isinstance(architecture, ArchitectureSpec):
        return architecture
    return ArchitectureSpec.model_validate(architecture)


def _resolve(architecture: ArchitectureLike) -> tuple[ModuleType, Any]:
    arch = _spec_of(architecture)
    return _MODULES[arch.name], arch.typed_config()


def build_model(architecture: ArchitectureLike) -> nn.Module:
    """A fresh model with default initialisation, on CPU."""
    module, config = _resolve(architecture)
    builder: Callable[[Any], nn.Module] = module.build
    return builder(config)


def example_inputs(architecture: ArchitectureLike) -> Inputs:
    """A small batch of synthetic inputs (for tracing, and for the self-check when there is no calibration):
    positional tensors, or forward keywords (transformers models)."""
    module, config = _resolve(architecture)
    make: Callable[[Any], Inputs] = module.example_inputs
    return make(config)


def complete_state(architecture: ArchitectureLike, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], set[str]]:
    """The checkpoint with the entries its format omits filled in (a tied LM head), and their names."""
    module, config = _resolve(architecture)
    complete: Callable[[Any, Mapping[str, Tensor]], tuple[dict[str, Tensor], set[str]]] | None = getattr(
        module, "complete_state", None
    )
    if complete is None:
        return dict(state), set()
    return complete(config, state)


def infer_architecture(architecture: ArchitectureLike, state: Mapping[str, Any]) -> ArchitectureSpec:
    """The architecture with the config fields its module reads off a checkpoint filled in."""
    arch = _spec_of(architecture)
    infer: Callable[[dict[str, Any], Mapping[str, Any]], dict[str, Any]] | None = getattr(
        _MODULES[arch.name], "infer_config", None
    )
    if infer is None:
        return arch
    return ArchitectureSpec(name=arch.name, config=infer(dict(arch.config), state))


@lru_cache(maxsize=32)
def _traced(name: str, config_json: str, free_outputs: bool) -> TraceResult:
    arch = ArchitectureSpec(name=name, config=json.loads(config_json))
    model = build_model(arch).eval()
    return trace_spec(model, example_inputs(arch), free_outputs=free_outputs)


def trace_architecture(architecture: ArchitectureLike, *, free_outputs: bool = False) -> TraceResult:
    """The derived spec of an architecture and what the derivation found (cached per architecture, config and
    ``free_outputs``: outputs left free, for a features model merged by align; see ``trace_spec``)."""
    arch = _spec_of(architecture)
    return _traced(arch.name, json.dumps(arch.config, sort_keys=True), free_outputs)


def outputs_features(architecture: ArchitectureLike) -> bool:
    """True when the model's outputs are features, not logits (a transformers ``...Model`` encoder class)."""
    arch = _spec_of(architecture)
    if arch.name != "transformers":
        return False
    classes = arch.config.get("architectures") or [""]
    return "For" not in str(classes[0])


def perm_spec(architecture: ArchitectureLike) -> PermSpec:
    """The permutation spec of a built-in, derived by tracing its model."""
    return trace_architecture(architecture).spec


def oracle_spec(architecture: ArchitectureLike) -> PermSpec:
    """The hand-written spec a module keeps as the tracer's test oracle (not every module has one)."""
    module, config = _resolve(architecture)
    writer: Callable[[Any], PermSpec] = module.spec
    return writer(config)


def expected_shapes(architecture: ArchitectureLike) -> dict[str, tuple[int, ...]]:
    """Shape of every state-dict entry, computed on the meta device (no memory is allocated)."""
    module, config = _resolve(architecture)
    with torch.device("meta"):
        model = module.build(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_checkpoint(architecture: ArchitectureLike, state: Mapping[str, Tensor], spec: PermSpec | None = None) -> None:
    """Raise ArchitectureMismatch unless ``state`` has exactly the architecture's entries and shapes."""
    validate_state_dict(spec if spec is not None else perm_spec(architecture), state)
    for name, shape in expected_shapes(architecture).items():
        if name not in state:
            continue  # only excluded entries (e.g. num_batches_tracked) may be absent
        actual = tuple(getattr(state[name], "shape", ()))
        if actual != shape:
            raise ArchitectureMismatch(
                f"{name}: checkpoint has shape {list(actual)}, the architecture expects {list(shape)}"
            )


__all__ = [
    "build_model",
    "perm_spec",
    "oracle_spec",
    "trace_architecture",
    "example_inputs",
    "infer_architecture",
    "check_checkpoint",
    "complete_state",
    "outputs_features",
    "expected_shapes",
]
