"""The PEFT LoRA adapter folder format (torch-free): what an adapter folder holds and how it fits a base.

One set of rules, used by the API's submission check (an S3 listing and headers), the worker's
download plan (the same listing) and the core's reader (:mod:`mudsc_core.lora`, a local folder).

- An adapter folder holds :data:`CONFIG_NAME` (a JSON object of at most :data:`MAX_CONFIG_BYTES`)
  and :data:`WEIGHTS_NAME`; nothing else is fetched or read.
- The config must be a plain LoRA: ``peft_type`` ``"LORA"``, an integer ``r`` >= 1, a positive
  ``lora_alpha``, ``target_modules`` (a list of module names or a regular expression), optionally
  ``use_rslora`` (scale ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``). Refused (each named):
  ``use_dora``, ``fan_in_fan_out``, ``bias`` other than ``"none"``, ``lora_bias``, ``modules_to_save``,
  ``rank_pattern`` / ``alpha_pattern``, ``layer_replication``, ``trainable_token_indices`` and
  ``target_parameters``.
- Every weight is one half of a pair ``<prefix><module>.lora_A.weight`` (r, in) /
  ``<prefix><module>.lora_B.weight`` (out, r) (``.lora_A.<adapter>.weight`` is accepted too);
  ``<prefix>`` is PEFT's ``base_model.model.``. The pair adapts the base's 2-D ``<module>.weight``
  of shape (out, in), found as named or with a leading ``model.`` added or removed. Embedding
  adapters (``lora_embedding_*``), DoRA magnitudes, biases and any other tensor are refused, as is
  a module the config's ``target_modules`` does not name, and a listed target the base lacks.

Failures raise :class:`~mudsc_core.errors.InvalidCheckpoint` (a missing file:
:class:`~mudsc_core.errors.ObjectNotFound`) whose message names the file or tensor; callers prefix
the location (an S3 URI or a local path).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mudsc_core.errors import InvalidCheckpoint, ObjectNotFound
from mudsc_core.formats import json_limits

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FILES = (CONFIG_NAME, WEIGHTS_NAME)
MAX_CONFIG_BYTES = 1024 * 1024
PEFT_PREFIX = "base_model.model."
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<half>[AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")
# Keys whose presence (with a non-empty value) means something this reader does not apply.
_REFUSED: dict[str, str] = {
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "rank_pattern": "rank_pattern (per-module ranks) is not supported",
    "alpha_pattern": "alpha_pattern (per-module alphas) is not supported",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "target_parameters": "target_parameters (LoRA on parameters) is not supported",
}


@dataclass(frozen=True)
class AdapterConfig:
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str  # module names, or one regular expression (PEFT's full match)

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def targets(self, module: str) -> bool:
        """Whether the config's ``target_modules`` names ``module`` (a dotted module path), as PEFT matches."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module) is not None
        return any(module == t or module.endswith("." + t) for t in self.target_modules)


@dataclass(frozen=True)
class LoraPair:
    """One adapted base tensor: ``base + scale * B @ A``."""

    base: str  # the base tensor's name
    a: str  # the adapter's lora_A tensor (r, in)
    b: str  # the adapter's lora_B tensor (out, r)


def files_to_fetch(sizes: Mapping[str, int]) -> list[str]:
    """The files of an adapter folder listed with their sizes that are read (both must be there)."""
    for name in FILES:
        if name not in sizes:
            raise ObjectNotFound(
                f"{name} not found (a PEFT LoRA adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
    if sizes[CONFIG_NAME] > MAX_CONFIG_BYTES:
        raise InvalidCheckpoint(
            f"{CONFIG_NAME} is {sizes[CONFIG_NAME]} bytes, more than the {MAX_CONFIG_BYTES} allowed"
        )
    return list(FILES)


def _fail(detail: str) -> InvalidCheckpoint:
    return InvalidCheckpoint(f"{CONFIG_NAME}: {detail}")


def parse_config(raw: bytes) -> AdapterConfig:
    """The adapter config, validated (the rules above)."""
    try:
        data: Any = json_limits.loads(raw, max_bytes=MAX_CONFIG_BYTES, max_depth=16, what="adapter config")
    except json_limits.UntrustedJsonError as exc:
        raise _fail(str(exc)) from None
    if not isinstance(data, dict):
        raise _fail("not a JSON object")
    peft_type = data.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _fail(f"peft_type {str(peft_type)[:40]!r} is not supported (only LORA adapters)")
    r = data.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= 1_000_000:
        raise _fail("r must be an integer >= 1")
    alpha = data.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise _fail("lora_alpha must be a positive number")
    if data.get("use_dora"):
        raise _fail("use_dora: DoRA adapters are not supported")
    if data.get("fan_in_fan_out"):
        raise _fail("fan_in_fan_out: transposed (Conv1D) adapters are not supported")
    if data.get("bias", "none") != "none":
        raise _fail(f"bias {str(data.get('bias'))[:40]!r} is not supported (only 'none')")
    if data.get("lora_bias"):
        raise _fail("lora_bias is not supported")
    for key, why in _REFUSED.items():
        if data.get(key):
            raise _fail(why)
    use_rslora = data.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise _fail("use_rslora must be true or false")
    targets = data.get("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise _fail(f"target_modules is not a valid regular expression: {exc}") from None
        target_modules: tuple[str, ...] | str = targets
    elif isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        target_modules = tuple(targets)
    else:
        raise _fail("target_modules must be a non-empty list of module names or a regular expression")
    return AdapterConfig(r=r, lora_alpha=float(alpha), use_rslora=use_rslora, target_modules=target_modules)


def _base_name(module: str, base_shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    stripped = module.removeprefix(PEFT_PREFIX)
    candidates = [stripped + ".weight"]
    candidates.append(
        stripped.removeprefix("model.") + ".weight" if stripped.startswith("model.") else f"model.{stripped}.weight"
    )
    return next((c for c in candidates if c in base_shapes), None)


def pair_tensors(
    adapter: Mapping[str, tuple[str, tuple[int, ...]]],
    base_shapes: Mapping[str, tuple[int, ...]],
    config: AdapterConfig,
) -> list[LoraPair]:
    """The adapted base tensors of an adapter (tensor name -> (safetensors dtype, shape)), checked against the base."""
    halves: dict[str, dict[str, str]] = {}
    for name in adapter:
        if "lora_embedding_" in name:
            raise InvalidCheckpoint(f"{WEIGHTS_NAME}: tensor {name!r} is an embedding adapter, which is not supported")
        if "lora_magnitude_vector" in name:
            raise InvalidCheckpoint(f"{WEIGHTS_NAME}: tensor {name!r} is a DoRA magnitude, which is not supported")
        match = _PAIR.match(name)
        if match is None:
            raise InvalidCheckpoint(
                f"{WEIGHTS_NAME}: tensor {name!r} is not a LoRA weight (<module>.lora_A.weight / .lora_B.weight)"
            )
        dtype = adapter[name][0]
        if dtype not in FLOAT_DTYPES:
            raise InvalidCheckpoint(
                f"{WEIGHTS_NAME}: tensor {name!r} has dtype {dtype}; LoRA weights are floating point"
            )
        halves.setdefault(match["module"], {})[match["half"]] = name
    if not halves:
        raise InvalidCheckpoint(f"{WEIGHTS_NAME}: holds no LoRA weights")
    pairs: list[LoraPair] = []
    seen: set[str] = set()
    for module, half in halves.items():
        for needed, other in (("A", "B"), ("B", "A")):
            if needed not in half:
                raise InvalidCheckpoint(
                    f"{WEIGHTS_NAME}: tensor {half[other]!r} has no lora_{needed} half (expected {module}.lora_{needed}.weight)"
                )
        a, b = half["A"], half["B"]
        target = module.removeprefix(PEFT_PREFIX)
        if not config.targets(target):
            raise InvalidCheckpoint(
                f"{WEIGHTS_NAME}: tensor {a!r} adapts module {target!r}, which {CONFIG_NAME}'s target_modules does not name"
            )
        base = _base_name(module, base_shapes)
        if base is None:
            raise InvalidCheckpoint(
                f"{WEIGHTS_NAME}: tensor {a!r} adapts {target}.weight, which the base does not have"
            )
        shape_a, shape_b, shape_w = adapter[a][1], adapter[b][1], base_shapes[base]
        if len(shape_w) != 2:
            raise InvalidCheckpoint(
                f"{WEIGHTS_NAME}: tensor {a!r} adapts base tensor {base!r} of shape {list(shape_w)}, not a linear layer"
            )
        out_features, in_features = shape_w
        if shape_a != (config.r, in_features):
            raise InvalidCheckpoint(
                f"{WEIGHTS_NAME}: tensor {a!r} has shape {list(shape_a)}, expected [{config.r}, {in_features}] "
                f"(r = {config.r}; base tensor {base!r} is {list(shape_w)})"
            )
        if shape_b != (out_features, config.r):
            raise InvalidCheckpoint(
                f"{WEIGHTS_NAME}: tensor {b!r} has shape {list(shape_b)}, expected [{out_features}, {config.r}] "
                f"(r = {config.r}; base tensor {base!r} is {list(shape_w)})"
            )
        if base in seen:
            raise InvalidCheckpoint(f"{WEIGHTS_NAME}: tensor {a!r} adapts base tensor {base!r} a second time")
        seen.add(base)
        pairs.append(LoraPair(base=base, a=a, b=b))
    if not isinstance(config.target_modules, str):
        modules = {n.removesuffix(".weight") for n, s in base_shapes.items() if n.endswith(".weight")}
        for target in config.target_modules:
            if not any(m == target or m.endswith("." + target) for m in modules):
                raise InvalidCheckpoint(f"{CONFIG_NAME}: target module {target!r} is absent from the base")
    return pairs
