"""Hugging Face transformers models, built from their ``config.json`` (random weights, never downloaded).

The class is the config's ``architectures[0]`` (``BertModel``, ``GPT2LMHeadModel``, ``LlamaForCausalLM``,
``ViTForImageClassification``, ``CLIPVisionModel``, ...), looked up in the installed ``transformers`` and
built with its own config class, weights left uninitialised (a checkpoint is loaded into it next). Its
permutation spec is derived by tracing (torch.export: ``mudsc_core.permutation.trace_export``).

What this module adds to the built-ins' interface (``build``, ``example_inputs``):

- :func:`resolve` reads every model folder's ``config.json`` and requires them to agree, bookkeeping keys
  aside (``mudsc_core.formats.hf_config``); a disagreement is ``incompatible_models`` naming the key;
- :func:`complete_state` fills the entries a ``save_pretrained`` checkpoint leaves out because they alias
  another (a tied LM head), so the spec sees every tensor; the merge drops them again on output;
- :func:`check_inputs` checks calibration tensors as the keywords of the model's forward (``input_ids``,
  ``attention_mask``, ``token_type_ids``, ``pixel_values``): names, sample counts, token ids in range.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mudsc_core.errors import ArchitectureMismatch, InvalidCalibration, UnsupportedArchitecture
from mudsc_core.formats.hf_config import agree, parse_config
from mudsc_core.formats.hf_folder import CONFIG_NAME
from mudsc_core.schema.architectures import TransformersConfig

_EXAMPLE_BATCH, _EXAMPLE_TOKENS, _EXAMPLE_IMAGE = 2, 8, 64
# Integer keywords with a bound read off the config: token ids, token types, positions.
_ID_BOUNDS = {"input_ids": "vocab_size", "token_type_ids": "type_vocab_size", "position_ids": "max_position_embeddings"}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the worker image installs it
        raise UnsupportedArchitecture("the transformers library is not installed on this worker") from exc
    return transformers


def _raw(config: TransformersConfig) -> dict[str, Any]:
    if not config.given:
        raise UnsupportedArchitecture("architecture transformers: no config (read it from the model folders first)")
    return config.as_dict()


@lru_cache(maxsize=64)
def _model_class(name: str, model_type: str) -> Any:
    transformers = _transformers()
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UnsupportedArchitecture(
            f"config.json architectures[0] is {name!r}: transformers {transformers.__version__} has no such model class"
        )
    config_type = getattr(getattr(cls, "config_class", None), "model_type", None)
    if config_type != model_type:
        raise UnsupportedArchitecture(
            f"config.json names model_type {model_type!r} but {name} takes configs of model_type {config_type!r}"
        )
    return cls


def model_class(config: TransformersConfig) -> Any:
    raw = _raw(config)
    return _model_class(raw["architectures"][0], raw["model_type"])


def hf_config(config: TransformersConfig) -> Any:
    """The transformers config object (``cls.config_class.from_dict``)."""
    raw = _raw(config)
    cls = model_class(config)
    try:
        return cls.config_class.from_dict({k: v for k, v in raw.items() if k not in ("dtype", "torch_dtype")})
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise UnsupportedArchitecture(f"config.json does not make a {cls.__name__} config: {exc}") from exc


def build(config: TransformersConfig) -> nn.Module:
    """The model in float32 on the current device, weights uninitialised (``no_init_weights``), eval mode."""
    from transformers.initialization import no_init_weights

    cls, made = model_class(config), hf_config(config)
    try:
        with no_init_weights():
            model = cls(made)
        model.tie_weights()  # post_init leaves it to the weight initialisation that no_init_weights skips
    except Exception as exc:  # a config the class rejects (sizes that do not divide, missing keys, ...)
        raise UnsupportedArchitecture(f"cannot build {cls.__name__} from config.json: {exc}") from exc
    return model.float().eval()  # type: ignore[no-any-return]


def example_inputs(config: TransformersConfig) -> dict[str, Tensor]:
    """A small batch for tracing: token ids for text models, pixels for vision models."""
    cls, made = model_class(config), hf_config(config)
    generator = torch.Generator().manual_seed(0)
    main = getattr(cls, "main_input_name", "input_ids")
    if main == "input_ids":
        vocab = int(getattr(made, "vocab_size", 2) or 2)
        tokens = min(_EXAMPLE_TOKENS, int(getattr(made, "max_position_embeddings", _EXAMPLE_TOKENS) or _EXAMPLE_TOKENS))
        return {"input_ids": torch.randint(0, vocab, (_EXAMPLE_BATCH, tokens), generator=generator)}
    if main == "pixel_values":
        size = getattr(made, "image_size", _EXAMPLE_IMAGE)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        channels = int(getattr(made, "num_channels", 3))
        return {"pixel_values": torch.randn(_EXAMPLE_BATCH, channels, height, width, generator=generator)}
    raise UnsupportedArchitecture(f"{cls.__name__}: no example inputs for its main input {main!r}")


# --------------------------------------------------------------------------- configs of the model folders
def read_config(folder: Path, label: str) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ArchitectureMismatch(f"{label}: the model folder has no {CONFIG_NAME} (architecture transformers)")
    return parse_config(path.read_bytes(), label)


def resolve(config: TransformersConfig, folders: Sequence[Path | None], labels: Sequence[str]) -> TransformersConfig:
    """The config to build from: the given one, else the first folder's; every folder's must agree with it."""
    found = [(read_config(f, label), label) for f, label in zip(folders, labels) if f is not None and f.is_dir()]
    configs = [c for c, _ in found]
    names = [label for _, label in found]
    if config.given:
        configs, names = [config.as_dict(), *configs], ["architecture.config", *names]
    if not configs:
        raise ArchitectureMismatch("architecture transformers needs a config: give Hugging Face model folders")
    agree([_with_defaults(c) for c in configs], names)
    try:
        return TransformersConfig.model_validate(configs[0])
    except ValueError as exc:
        raise ArchitectureMismatch(f"{names[0]}: {CONFIG_NAME} is not a transformers config: {exc}") from None


def _with_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """config.json as its config class reads it, every key it leaves out at the class default: folders saved by
    different transformers versions (a hub original, its copy saved by transformers 5) write different sets of
    defaults. A config that makes no config object is compared as it is (building it fails with its reason)."""
    try:
        made = hf_config(TransformersConfig.model_validate(raw))
    except (ValueError, UnsupportedArchitecture):  # pydantic's ValidationError is a ValueError
        return raw
    return dict(made.to_dict())


# --------------------------------------------------------------------------- checkpoints
def _ignored(cls: Any, name: str) -> bool:
    patterns = getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []
    return any(re.search(p, name) for p in patterns)


def complete_state(config: TransformersConfig, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], set[str]]:
    """The checkpoint with the entries a tied checkpoint omits filled in from their source, and their names.

    An entry the model does not have (and its class does not ignore) is ``architecture_mismatch``; so is a
    missing entry that aliases nothing.
    """
    cls = model_class(config)
    with torch.device("meta"):
        model = build(config)
    expected = model.state_dict(keep_vars=True)
    unexpected = sorted(k for k in state if k not in expected and not _ignored(cls, k))
    if unexpected:
        raise ArchitectureMismatch(
            f"tensor {unexpected[0]!r} is not an entry of {cls.__name__} built from config.json"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    tied = _aliases(expected)
    completed = {k: v for k, v in state.items() if k in expected}
    added = set()
    for name in expected:
        if name in completed:
            continue
        source = tied.get(name)
        if source is None:  # the checkpoint may hold the alias and omit the entry it aliases
            source = next((alias for alias, src in tied.items() if src == name and alias in completed), None)
        if source is not None and source in completed:
            completed[name] = completed[source]
            added.add(name)
            continue
        raise ArchitectureMismatch(f"checkpoint has no tensor {name!r}, which {cls.__name__} needs")
    return completed, added


def load_folder(config: TransformersConfig, folder: Path, label: str) -> dict[str, Tensor]:
    """A model folder's weights as the built model names them, loaded by transformers itself (its renames of
    older checkpoint names included), in float32. Every entry must come from the folder: a missing, unexpected
    or reshaped entry is ``architecture_mismatch`` (``from_pretrained`` would initialise it at random)."""
    cls = model_class(config)
    try:
        model, info = cls.from_pretrained(
            folder, config=hf_config(config), dtype=torch.float32, local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ArchitectureMismatch(f"{label}: transformers cannot load the folder as {cls.__name__}: {exc}") from exc
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        found = sorted(str(k) for k in info.get(kind) or ())
        if found:
            raise ArchitectureMismatch(
                f"{label}: loading as {cls.__name__} finds {kind.replace('_', ' ')}: {', '.join(found[:3])}"
                + (f" (and {len(found) - 3} more)" if len(found) > 3 else "")
            )
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def to_checkpoint(config: TransformersConfig, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The built model's state dict as ``save_pretrained`` would write it: tied aliases left out, entries under
    the checkpoint names transformers saves (its conversions reverted)."""
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        model = build(config)
    aliases = set(_aliases(model.state_dict(keep_vars=True)))
    kept = {name: tensor for name, tensor in state.items() if name not in aliases}
    return dict(revert_weight_conversion(model, kept))  # type: ignore[arg-type]  # build() makes a PreTrainedModel


def _aliases(expected: Mapping[str, Tensor]) -> dict[str, str]:
    """Entry -> the entry whose tensor it is, for every entry that shares another's (a tied LM head)."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, tensor in expected.items():
        owner = first.setdefault(id(tensor), name)
        if owner != name:
            tied[name] = owner
    return tied


# --------------------------------------------------------------------------- calibration inputs
def forward_keywords(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def check_inputs(config: TransformersConfig, inputs: Mapping[str, Tensor], model: nn.Module) -> None:
    """Calibration tensors as forward keywords: known names, the main input present, equal sample counts,
    integer ids inside their tables, masks of 0 and 1. Raises :class:`InvalidCalibration`."""
    cls, made = model_class(config), hf_config(config)
    keywords = forward_keywords(model)
    for name in inputs:
        if keywords and name not in keywords:
            raise InvalidCalibration(
                f"calibration tensor {name!r} is not an input of {cls.__name__}.forward "
                f"(it takes: {', '.join(sorted(k for k in keywords if k not in ('kwargs', 'args'))[:12])})"
            )
    main = getattr(cls, "main_input_name", "input_ids")
    if main not in inputs and "inputs_embeds" not in inputs:
        raise InvalidCalibration(f"the calibration file has no tensor {main!r}, the input {cls.__name__} needs")
    counts = {name: int(t.shape[0]) if t.ndim else 0 for name, t in inputs.items()}
    if len(set(counts.values())) > 1:
        raise InvalidCalibration(
            "calibration tensors have different sample counts: "
            + ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
        )
    for name, tensor in inputs.items():
        if tensor.ndim < 1 or tensor.shape[0] == 0:
            raise InvalidCalibration(f"calibration tensor {name!r} has no samples (shape {list(tensor.shape)})")
        if tensor.is_floating_point():
            if not bool(torch.isfinite(tensor).all()):
                raise InvalidCalibration(f"calibration tensor {name!r} contains NaN or Inf")
            continue
        if tensor.dtype == torch.bool or tensor.is_complex():
            if tensor.is_complex():
                raise InvalidCalibration(f"calibration tensor {name!r} is complex")
            continue
        bound_key = _ID_BOUNDS.get(name)
        bound = getattr(made, bound_key, None) if bound_key else None
        low, high = int(tensor.min()), int(tensor.max())
        if isinstance(bound, int) and (low < 0 or high >= bound):
            raise InvalidCalibration(
                f"calibration tensor {name!r} holds values {low}..{high}, outside 0..{bound - 1} ({bound_key})"
            )
        if name == "attention_mask" and (low < 0 or high > 1):
            raise InvalidCalibration(f"calibration tensor 'attention_mask' must hold 0 and 1, has {low}..{high}")
