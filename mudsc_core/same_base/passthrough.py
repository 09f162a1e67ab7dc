"""``passthrough`` with slices: layer ranges of several models stacked into one model, streamed tensor by tensor.

The job's ``slices`` list the output's layers in order: slice ``i`` with source ``(model m, layer_range
[start, end))`` gives the next ``end - start`` output layers, output layer ``k`` being layer
``start + j`` of model ``m``, every tensor of that layer copied unchanged and renamed to layer ``k``
(the layer index rule of :func:`mudsc_core.schema.parameters.layer_index`: ``layers.{i}.``,
``h.{i}.``, ``layer.{i}.``, ``blocks.{i}.``). Tensors outside the layers follow mergekit: the
embeddings (``embed``, ``wte``, ``wpe``... in the name) come from the first slice's model, everything
else (final norm, ``lm_head``) from the last slice's model. ``config.json`` is the first slice's
model's, its layer count (``num_hidden_layers``, ``n_layer``, ``num_layers``, ``n_layers``, whichever
it has) set to the new depth, a per-layer ``layer_types`` list remapped the same way, and its dtype
set by :func:`mudsc_core.output.write_sidecars`.

Memory: the output layout is planned from the headers first (a
:class:`~mudsc_core.io.PlannedShardWriter`), then one tensor at a time is read and written.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mudsc_core.errors import InvalidParameters
from mudsc_core.io import OUTPUT_DTYPES, Checkpoint, PlannedShardWriter, open_checkpoint
from mudsc_core.output import staged_folder, write_sidecars
from mudsc_core.progress import Progress
from mudsc_core.same_base.base import SinglePass
from mudsc_core.same_base.stream import model_card
from mudsc_core.schema.job import LayerSlice
from mudsc_core.schema.parameters import LAYER_PATTERNS, TensorValues, layer_count, layer_index
from mudsc_core.schema.same_base_params import PassthroughParams

# Config keys that hold a model's layer count (the first a config has is set; all present are).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_EMBEDDING = re.compile(r"(?:^|[._])(?:embed\w*|wte|wpe|tok_embeddings|word_embeddings|position_embeddings)(?:[._]|$)")


class Passthrough(SinglePass):
    """The per-tensor rule: the one input unchanged (what each tensor of a slice gets)."""

    needs_base = False

    @classmethod
    def from_params(cls, params: PassthroughParams) -> Passthrough:
        return cls()

    def merge(
        self,
        name: str,
        inputs: Iterable[torch.Tensor],
        weights: Sequence[float],
        model_ids: Sequence[int],
        values: TensorValues | None = None,
    ) -> torch.Tensor:
        tensors = list(inputs)
        if len(tensors) != 1:
            raise ValueError(f"passthrough takes one input per tensor, got {len(tensors)} for {name!r}")
        return tensors[0]


def renamed(tensor_name: str, layer: int) -> str:
    """``tensor_name`` with its layer index (the one :func:`layer_index` reads) replaced by ``layer``."""
    for pattern in LAYER_PATTERNS:
        match = pattern.search(tensor_name)
        if match is not None:
            return tensor_name[: match.start(1)] + str(layer) + tensor_name[match.end(1) :]
    raise ValueError(f"tensor {tensor_name!r} is in no layer")


def is_embedding(tensor_name: str) -> bool:
    return _EMBEDDING.search(tensor_name) is not None


@dataclass(frozen=True)
class _Copy:
    out_name: str
    model: int
    name: str


def plan_slices(slices: Sequence[LayerSlice], checkpoints: Sequence[Checkpoint]) -> list[_Copy]:
    """Every output tensor and where it comes from, in output order (embeddings, layers, the rest)."""
    layers_of = [_layers(c) for c in checkpoints]
    first, last = slices[0].sources[0].model, slices[-1].sources[0].model
    plan = [_Copy(n, first, n) for n in checkpoints[first].keys() if layer_index(n) is None and is_embedding(n)]
    depth = 0
    for i, layer_slice in enumerate(slices):
        source = layer_slice.sources[0]
        start, end = source.layer_range
        count = len(layers_of[source.model])
        if end > count:
            raise InvalidParameters(
                f"slices[{i}]: layer_range [{start}, {end}] is beyond models[{source.model}]'s {count} layers "
                f"({checkpoints[source.model].path.name})"
            )
        for layer in range(start, end):
            plan += [_Copy(renamed(n, depth), source.model, n) for n in layers_of[source.model][layer]]
            depth += 1
    plan += [_Copy(n, last, n) for n in checkpoints[last].keys() if layer_index(n) is None and not is_embedding(n)]
    return plan


def _layers(checkpoint: Checkpoint) -> list[list[str]]:
    names = checkpoint.keys()
    layers: list[list[str]] = [[] for _ in range(layer_count(names))]
    for name in names:
        index = layer_index(name)
        if index is not None:
            layers[index].append(name)
    return layers


def merge_slices(
    slices: Sequence[LayerSlice],
    models: Sequence[Path | Checkpoint],
    out_dir: Path,
    *,
    dtype: str,
    shard_size_bytes: int,
    spec_json: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Stack the slices' layer ranges into ``out_dir`` (weights, config, spec, card); return the report."""
    started = time.perf_counter()
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(OUTPUT_DTYPES)}")
    if not slices:
        raise InvalidParameters("passthrough needs at least one slice")
    checkpoints = [m if isinstance(m, Checkpoint) else open_checkpoint(Path(m)) for m in models]
    for i, layer_slice in enumerate(slices):
        if len(layer_slice.sources) != 1 or layer_slice.sources[0].model >= len(checkpoints):
            raise InvalidParameters(f"slices[{i}]: give one source naming one of the {len(checkpoints)} models")
    plan = plan_slices(slices, checkpoints)
    depth = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in slices)
    layout = [(c.out_name, checkpoints[c.model].dtype(c.name), checkpoints[c.model].shape(c.name)) for c in plan]

    read_s = write_s = 0.0
    with staged_folder(Path(out_dir)) as (partial, files):
        writer = PlannedShardWriter(partial, dtype, shard_size_bytes, layout)
        try:
            for step, entry in enumerate(plan):
                if progress is not None:
                    progress("merging", step / max(len(plan), 1), entry.out_name)
                source = checkpoints[entry.model]
                t0 = time.perf_counter()
                tensor = (
                    source.get_float32(entry.name)
                    if source.dtype(entry.name).is_floating_point
                    else source.get(entry.name)
                )
                t1 = time.perf_counter()
                writer.add(entry.out_name, tensor)
                del tensor
                read_s += t1 - t0
                write_s += time.perf_counter() - t1
        except BaseException:
            writer.abort()
            raise
        files += writer.close()
        if progress is not None:
            progress("merging", 1.0, "written")
        names = [c.path for c in checkpoints]
        spec = spec_json if spec_json is not None else _default_spec(slices, names, dtype, shard_size_bytes)
        notes = [
            f"{len(slices)} slices stacked into {depth} layers; embeddings from models[{slices[0].sources[0].model}], "
            f"the other tensors outside the layers from models[{slices[-1].sources[0].model}]"
        ]
        config_source = _config(slices, checkpoints, depth, partial)
        files += write_sidecars(
            partial,
            config_source=config_source,
            dtype=dtype,
            spec=spec,
            card=model_card(
                "passthrough", PassthroughParams(), names, None, [1.0] * len(names), dtype, len(plan), notes, spec
            ),
        )
    return {
        "method": "passthrough",
        "tensors": len(plan),
        "layers": depth,
        "files": files,
        "metrics": {"read_s": read_s, "write_s": write_s, "total_s": time.perf_counter() - started},
        "notes": notes,
        "params": {},
    }


def _config(slices: Sequence[LayerSlice], checkpoints: Sequence[Checkpoint], depth: int, folder: Path) -> Path | None:
    """The first slice's model's config with the new depth, written into ``folder`` (None without a config)."""
    first = slices[0].sources[0].model
    source = checkpoints[first].config_path or next((c.config_path for c in checkpoints if c.config_path), None)
    if source is None:
        return None
    try:
        config = json.loads(source.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return source  # not JSON: copied as it is
    if not isinstance(config, dict):
        return source
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            config[key] = depth
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = _layer_types(slices, checkpoints, config["layer_types"])
    target = folder / ".source-config.json"
    target.write_text(json.dumps(config), encoding="utf-8")
    return target


def _layer_types(slices: Sequence[LayerSlice], checkpoints: Sequence[Checkpoint], fallback: list[Any]) -> list[Any]:
    """A per-layer list (``layer_types``) remapped as the layers are: each from its own model's config."""
    out: list[Any] = []
    for layer_slice in slices:
        source = layer_slice.sources[0]
        path = checkpoints[source.model].config_path
        own: Any = fallback
        if path is not None:
            try:
                own = json.loads(path.read_text(encoding="utf-8")).get("layer_types", fallback)
            except (UnicodeDecodeError, ValueError, RecursionError, AttributeError):
                own = fallback
        for layer in range(*source.layer_range):
            out.append(own[layer] if isinstance(own, list) and layer < len(own) else (fallback or [None])[-1])
    return out


def _default_spec(
    slices: Sequence[LayerSlice], models: Sequence[Path], dtype: str, shard_size_bytes: int
) -> dict[str, Any]:
    return {
        "method": {"name": "passthrough", "params": {}},
        "models": [{"uri": Path(m).name, "weight": 1.0, "parameters": {}} for m in models],
        "base_model": None,
        "slices": [s.model_dump(mode="json") for s in slices],
        "output": {"dtype": dtype, "shard_size_bytes": shard_size_bytes},
    }
