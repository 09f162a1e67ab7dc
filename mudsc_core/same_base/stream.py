"""Streaming same-base merges: plan per tensor, then read, merge and write one tensor at a time.

``merge_checkpoints`` reads checkpoints through :mod:`mudsc_core.io` (validated headers,
positioned reads into owned buffers), computes in float32 and writes the requested dtype
through a :class:`~mudsc_core.io.PlannedShardWriter`. A tensor is merged whole, holding
about N + 3 times its size: the base tensor (which becomes the output in place), the previous
output still being written by the write-behind thread, the N task vectors a sign rule needs,
and one block-sized temporary; methods without a sign rule hold fewer. Tensors above
``blocks.BLOCK_ABOVE_BYTES`` (the embedding, the LM head) are merged by the task-arithmetic
family in row blocks instead (:mod:`mudsc_core.same_base.blocks`, bit for bit the same
result): only their output buffer is tensor-sized, so the peak is about one largest tensor
plus N + 3 times the largest tensor merged whole, plus a constant (configurations that rescale
by a whole-tensor L1 norm, checkpoint views such as LoRA, and other methods merge every tensor
whole). Inputs are read into buffers reused from tensor to tensor (fresh memory would be
page-faulted in for every tensor, which costs more than reading it), and task_arithmetic-style
merges accumulate in place into them, allocating nothing per tensor. The whole-model TIES
variant reads everything twice (a histogram pass for each model's threshold, then the merge);
per-tensor TIES and breadcrumbs read a blocked tensor's base and models once more per model
(to find each model's threshold) before merging it.

Defined behaviour for awkward inputs (also listed in the report's ``notes``):

- a shape mismatch between any two checkpoints fails with ``incompatible_models`` naming the
  tensor; so does a tensor that is floating point in one checkpoint and not in another;
- non-float tensors (integer buffers, masks) are copied unchanged, dtype kept, from the base
  (or the first model that has them); they are never converted to the output dtype;
- a float tensor missing from some models is merged over the models that have it (their
  weights only); one in the base but in no model is the base's; one missing from the base
  (methods with a base) is the normalised weighted mean of the models that have it;
- NaN or Inf in a float tensor fails with ``invalid_checkpoint`` naming tensor and file.

The output folder gets the weights (``model.safetensors`` or shards above
``shard_size_bytes`` plus ``model.safetensors.index.json``), ``config.json`` copied from the
base (or the first model), ``spec.json`` and a model card ``README.md``. Files are written
under ``out_dir/.partial-*`` and moved into place only when everything succeeded; on any
failure (cancellation included) the partial folder is removed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mudsc_core.errors import IncompatibleModels, InvalidParameters
from mudsc_core.io import OUTPUT_DTYPES, Checkpoint, PlannedShardWriter, open_checkpoint
from mudsc_core.output import staged_folder, write_sidecars
from mudsc_core.progress import Progress
from mudsc_core.same_base import blocks
from mudsc_core.same_base.base import FirstPass, Merger, MergerFactory
from mudsc_core.same_base.task_arithmetic import TaskArithmeticFamily, linear
from mudsc_core.same_base.tensor_stats import TaskVectorStats
from mudsc_core.schema._base import Frozen
from mudsc_core.schema.mergekit import to_mergekit
from mudsc_core.schema.methods import METHODS, MethodInfo
from mudsc_core.schema.parameters import (
    ParameterResolver,
    ParameterValue,
    dump_value,
    layer_count,
    validate_model_parameters,
)
from mudsc_core.schema.same_base_params import TensorParams

logger = logging.getLogger(__name__)


def same_base_method(method_name: str) -> MethodInfo:
    info = METHODS.get(method_name)
    if info is None or info.family != "same_base":
        raise ValueError(f"unknown same-base method {method_name!r}")
    return info


def build_merger(method_name: str, params: Frozen) -> Merger:
    """The merger of a registered same-base method: its registry entry's factory applied to its params."""
    factory: MergerFactory = same_base_method(method_name).load()
    return factory(params)


@dataclass
class TensorPlan:
    name: str
    action: str  # "merge" | "copy" | "mean" (float tensor absent from the base)
    shape: tuple[int, ...]
    dtype: torch.dtype  # as stored in the source
    holders: list[int]  # indices of the models that have it
    source: Checkpoint | None = None  # for "copy"


class _ReadBuffers:
    """Reusable read buffers, one per input slot (slot 0: the base, slot 1 + i: model i).

    Every tensor is read into the front of its slot's buffer, allocated once at the largest
    size the plan reads. A fresh allocation per tensor would be page-faulted in on first
    touch, which costs more than the read itself; the reused pages stay resident. Slot 0
    (which becomes the output) alternates between two buffers from step to step, so that the
    previous step's output can still be being written; the model slots have one each. A
    tensor read into a slot is valid until the next read into that slot's buffer. ``model_nbytes``:
    the model slots' size where it is smaller (tensors merged in row blocks are never read whole).
    """

    def __init__(self, largest_nbytes: int, model_nbytes: int | None = None) -> None:
        self._size = largest_nbytes
        self._model_size = largest_nbytes if model_nbytes is None else model_nbytes
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}
        self._step = 0

    def next_step(self, *, first_base_buffer: bool = False) -> None:
        """Go on to the next tensor; ``first_base_buffer``: its base slot is the first buffer (the caller
        has waited for the previous write), so that the second buffer's pages are only ever touched by
        tensors smaller than the largest."""
        self._step = (self._step + 2 - self._step % 2) if first_base_buffer else self._step + 1

    def is_large(self, nbytes: int) -> bool:
        """A tensor above half the largest: it reuses the first base buffer instead of alternating."""
        return 2 * nbytes > self._size

    def __call__(self, slot: int) -> torch.Tensor:
        key = (slot, self._step % 2 if slot == 0 else 0)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(self._size if slot == 0 else self._model_size, dtype=torch.uint8)
        return self._buffers[key]

    def in_model_slot(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives in a model slot's buffer (reused by the very next step)."""
        ptr = tensor.untyped_storage().data_ptr()
        return any(
            slot != 0 and buffer.untyped_storage().data_ptr() == ptr for (slot, _), buffer in self._buffers.items()
        )


def _write(writer: PlannedShardWriter, name: str, tensor: torch.Tensor, timer: _Timer) -> None:
    t0 = time.perf_counter()
    writer.add(name, tensor)
    timer.add("write_s", t0)


@dataclass
class _Timer:
    # write_s: spent writing (on the write thread); write_wait_s: the merge waited for writes
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("read_s", "compute_s", "write_s", "write_wait_s"), 0.0)
    )

    def add(self, key: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[key] += now - since
        return now


def merge_checkpoints(
    method_name: str,
    params: Frozen | Mapping[str, Any],
    models: Sequence[Path | Checkpoint],
    base: Path | None,
    weights: list[float],
    out_dir: Path,
    *,
    dtype: str,
    shard_size_bytes: int,
    spec_json: dict[str, Any] | None = None,
    progress: Progress | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Merge same-base checkpoints tensor by tensor into ``out_dir``; return the report.

    A model is a path or an open :class:`~mudsc_core.io.Checkpoint` (a view such as
    :class:`~mudsc_core.lora.LoraCheckpoint`, a base with a LoRA adapter applied as it is read).

    ``model_parameters``: per model, mergekit's ``models[i].parameters`` (``weight``, ``density``,
    ``gamma``, ``epsilon``, ``lambda``: numbers, gradients over the layers or filter lists); they override
    the method's values for that model (``lambda`` its ``scaling_factor``), and ``parameters["weight"]``
    overrides ``weights[i]``.
    """
    started = time.perf_counter()
    info = same_base_method(method_name)
    if method_name == "passthrough":  # a layer remap, not a per-tensor merge of the same tensor
        raise ValueError("passthrough stacks the job's slices: use mudsc_core.same_base.passthrough.merge_slices")
    if not isinstance(params, info.params):
        params = info.params.model_validate(dict(params) if isinstance(params, Mapping) else params.model_dump())
    if len(weights) != len(models) or not models:
        raise ValueError("give one weight per model (and at least one model)")
    info.check_inputs(models=len(models), base=base is not None, architecture=False, calibration=False)
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(OUTPUT_DTYPES)}")
    per_model = _model_parameters(params, model_parameters, len(models))

    checkpoints = [m if isinstance(m, Checkpoint) else open_checkpoint(Path(m)) for m in models]
    names = [c.path for c in checkpoints]  # what the spec and the card name
    base_ckpt = open_checkpoint(Path(base)) if base is not None else None
    plan, notes = _plan(checkpoints, base_ckpt)
    resolver = _resolver(params, per_model, weights, [p.name for p in plan])
    timer = _Timer()
    merger = build_merger(method_name, params)
    blocked = _blocked(plan, merger, checkpoints, base_ckpt)
    buffers = _read_buffers(plan, blocked)
    reader = blocks.BlockReader()
    metrics: dict[str, float] = {"plan_s": time.perf_counter() - started}
    stats = TaskVectorStats()  # the report's tensor_stats (norms, sign conflicts, fraction kept)

    first_pass = merger.first_pass()
    total_steps = len(plan) * (2 if first_pass is not None else 1)
    if first_pass is not None:
        t0 = time.perf_counter()
        _run_first_pass(first_pass, plan, checkpoints, base_ckpt, progress, total_steps, buffers, blocked, reader)
        notes.extend(first_pass.finish())
        metrics["first_pass_s"] = time.perf_counter() - t0

    with staged_folder(Path(out_dir)) as (partial, files):
        writer = PlannedShardWriter(partial, dtype, shard_size_bytes, [(p.name, p.dtype, p.shape) for p in plan])
        try:
            # Write-behind: one thread writes tensor k while tensor k + 1 is read and merged
            # (file I/O and torch ops release the GIL). The output of step k lives in the base
            # slot, which alternates between two buffers, or in fresh memory; an output in a
            # model's slot (which the next step reads into) is written before going on.
            done_before = total_steps - len(plan)
            pending: Future[None] | None = None
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-write") as write_thread:
                for step, entry in enumerate(plan):
                    if progress is not None:
                        progress("merging", (done_before + step) / total_steps, entry.name)
                    large = entry.name in blocked or buffers.is_large(math.prod(entry.shape) * entry.dtype.itemsize)
                    if large and pending is not None:
                        # A large tensor does not alternate: waiting for the previous write here keeps
                        # a second largest-size buffer from being paged in (the largest ones are few).
                        t0 = time.perf_counter()
                        pending.result()
                        pending = None
                        timer.add("write_wait_s", t0)
                    buffers.next_step(first_base_buffer=large)
                    if entry.name in blocked:
                        tensor = _merge_blocked(
                            entry, merger, checkpoints, base_ckpt, resolver, timer, buffers, reader, stats
                        )
                    else:
                        tensor = _merge_one(entry, merger, checkpoints, base_ckpt, resolver, timer, buffers, stats)
                    t0 = time.perf_counter()
                    if pending is not None:
                        pending.result()  # the previous write (raises its error, if any)
                    pending = write_thread.submit(_write, writer, entry.name, tensor, timer)
                    if buffers.in_model_slot(tensor):
                        pending.result()
                    del tensor
                    timer.add("write_wait_s", t0)
                if pending is not None:
                    t0 = time.perf_counter()
                    pending.result()
                    timer.add("write_wait_s", t0)
        except BaseException:
            writer.abort()
            raise
        files += writer.close()
        if progress is not None:
            progress("merging", 1.0, "written")
        config_source = (base_ckpt.config_path if base_ckpt else None) or checkpoints[0].config_path
        if config_source is None:
            config_source = next((c.config_path for c in checkpoints if c.config_path), None)
        spec = (
            spec_json
            if spec_json is not None
            else _default_spec(method_name, params, names, base, weights, dtype, shard_size_bytes, per_model)
        )
        files += write_sidecars(
            partial,
            config_source=config_source,
            dtype=dtype,
            spec=spec,
            card=model_card(method_name, params, names, base, weights, dtype, len(plan), notes, spec_json, per_model),
        )

    metrics.update(timer.seconds)
    metrics["total_s"] = time.perf_counter() - started
    return {
        "method": method_name,
        "tensors": len(plan),
        "files": files,
        "metrics": metrics,
        "notes": notes,
        "params": params.model_dump(mode="json"),
        "tensor_stats": stats.rows,
    }


# --------------------------------------------------------------------------- parameters
def _model_parameters(
    params: Frozen, raw: Sequence[Mapping[str, Any]] | None, models: int
) -> list[dict[str, ParameterValue]]:
    """The models' parameters, typed and checked against the method (``invalid_params`` otherwise)."""
    if raw is None:
        return [{} for _ in range(models)]
    if len(raw) != models:
        raise ValueError("give one parameters mapping per model")
    try:
        typed = [validate_model_parameters(own) for own in raw]
    except ValueError as exc:
        raise InvalidParameters(f"per-model parameters: {exc}") from exc
    if any(typed):
        problems = (
            params.model_parameter_problems(typed)
            if isinstance(params, TensorParams)
            else ["this method takes no per-model parameters"]
        )
        if problems:
            raise InvalidParameters(problems[0])
    return typed


def _resolver(
    params: Frozen, per_model: Sequence[Mapping[str, ParameterValue]], weights: Sequence[float], names: Sequence[str]
) -> ParameterResolver:
    """Per tensor: the method's knobs and each model's (its weight always), over the checkpoint's layers."""
    shared: tuple[str, ...] = params.TENSOR_PARAMETERS if isinstance(params, TensorParams) else ()
    own: tuple[str, ...] = params.PER_MODEL_PARAMETERS if isinstance(params, TensorParams) else ()
    model_keys = ("weight", *(k for k in own if k != "weight"))
    return ParameterResolver(params, shared, model_keys, per_model, weights, layer_count(names))


# --------------------------------------------------------------------------- planning
def _plan(checkpoints: Sequence[Checkpoint], base: Checkpoint | None) -> tuple[list[TensorPlan], list[str]]:
    sources = ([base] if base is not None else []) + list(checkpoints)
    names = list(dict.fromkeys(name for source in sources for name in source.keys()))
    plan: list[TensorPlan] = []
    partial, base_missing, non_float, base_only = [], [], [], []
    for name in names:
        holders = [i for i, c in enumerate(checkpoints) if name in c]
        having = ([base] if base is not None and name in base else []) + [checkpoints[i] for i in holders]
        first = having[0]
        shape, dtype = first.shape(name), first.dtype(name)
        for other in having[1:]:
            if other.shape(name) != shape:
                raise IncompatibleModels(
                    f"tensor {name!r} has shape {list(shape)} in {first.path.name} but "
                    f"{list(other.shape(name))} in {other.path.name}"
                )
            if other.dtype(name).is_floating_point != dtype.is_floating_point:
                raise IncompatibleModels(
                    f"tensor {name!r} is {dtype} in {first.path.name} but {other.dtype(name)} in {other.path.name}"
                )
        if not dtype.is_floating_point:
            plan.append(TensorPlan(name, "copy", shape, dtype, holders, first))
            non_float.append(name)
            continue
        if len(holders) < len(checkpoints) and holders:
            partial.append(name)
        if base is not None and name not in base:
            plan.append(TensorPlan(name, "mean", shape, dtype, holders))
            base_missing.append(name)
        elif not holders:
            plan.append(TensorPlan(name, "copy", shape, dtype, holders, base))
            base_only.append(name)
        else:
            plan.append(TensorPlan(name, "merge", shape, dtype, holders))
    notes = []
    for label, group in (
        ("non-float tensors copied unchanged", non_float),
        ("float tensors in only some models, merged over those", partial),
        ("tensors absent from the base, weighted mean of the models that have them", base_missing),
        ("tensors only in the base, copied from it", base_only),
    ):
        if group:
            notes.append(f"{label}: {len(group)} ({', '.join(group[:5])}{', ...' if len(group) > 5 else ''})")
    return plan, notes


def _blocked(
    plan: Sequence[TensorPlan], merger: Merger, checkpoints: Sequence[Checkpoint], base: Checkpoint | None
) -> set[str]:
    """The merged tensors large enough to be merged in row blocks (:mod:`mudsc_core.same_base.blocks`)."""
    if base is None or not merger.needs_base or not blocks.supports_blocks(merger):
        return set()
    return {
        entry.name
        for entry in plan
        if entry.action == "merge"
        and blocks.wants_blocks(entry.shape, [base, *(checkpoints[i] for i in entry.holders)])
    }


def _read_buffers(plan: Sequence[TensorPlan], blocked: set[str]) -> _ReadBuffers:
    """Read buffers for the plan: the base slot holds the largest tensor (a blocked one's float32 output
    included); the model slots only the largest tensor read whole."""
    whole = [math.prod(p.shape) * p.dtype.itemsize for p in plan if p.name not in blocked]
    outputs = [4 * math.prod(p.shape) for p in plan if p.name in blocked]
    return _ReadBuffers(max(whole + outputs, default=0), max(whole, default=0))


def _run_first_pass(
    first_pass: FirstPass,
    plan: Sequence[TensorPlan],
    checkpoints: Sequence[Checkpoint],
    base: Checkpoint | None,
    progress: Progress | None,
    total_steps: int,
    buffers: _ReadBuffers,
    blocked: frozenset[str] | set[str] = frozenset(),
    reader: blocks.BlockReader | None = None,
) -> None:
    """Show the merger every task vector once (whole-model statistics) before the merge pass."""
    if base is None:
        raise ValueError("a first pass over task vectors needs a base model")
    for step, entry in enumerate(plan):
        if progress is not None:
            progress("merging", step / total_steps, f"first pass: {entry.name}")
        if entry.action != "merge":
            continue
        if entry.name in blocked:
            assert reader is not None
            models = [checkpoints[i] for i in entry.holders]
            blocks.observe_blocked(first_pass, entry.name, entry.shape, base, models, entry.holders, reader)
            continue
        base_tensor = base.get_float32(entry.name, out=buffers(0))
        for i in entry.holders:
            first_pass.observe(
                entry.name, i, checkpoints[i].get_float32(entry.name, out=buffers(1 + i)).sub_(base_tensor)
            )


# --------------------------------------------------------------------------- one tensor
def _merge_one(
    entry: TensorPlan,
    merger: Merger,
    checkpoints: Sequence[Checkpoint],
    base: Checkpoint | None,
    resolver: ParameterResolver,
    timer: _Timer,
    buffers: _ReadBuffers,
    stats: TaskVectorStats | None = None,
) -> torch.Tensor:
    """The merged tensor; it may live in a read buffer, so write it before the next read."""
    t0 = time.perf_counter()
    if entry.action == "copy":
        assert entry.source is not None
        read = entry.source.get_float32 if entry.dtype.is_floating_point else entry.source.get
        tensor = read(entry.name, out=buffers(0))
        timer.add("read_s", t0)
        return tensor
    values = resolver.at(entry.name)  # this tensor's knobs: the method's and each model's
    holder_weights = [values.per_model[i]["weight"] for i in entry.holders]
    if entry.action == "mean":
        return linear(_reads(entry.name, checkpoints, entry.holders, timer, buffers), holder_weights, normalize=True)
    reads_before = timer.seconds["read_s"]
    if not merger.needs_base:
        out = merger.merge(
            entry.name,
            _reads(entry.name, checkpoints, entry.holders, timer, buffers),
            holder_weights,
            entry.holders,
            values,
        )
    else:
        assert base is not None
        # Checked for NaN/Inf through its task vectors' norms (a merged tensor has at least one holder).
        base_tensor = base.get_float32(entry.name, out=buffers(0), check_finite=False)
        timer.add("read_s", t0)
        norms: list[float] = []
        task_vectors = _task_vectors(entry.name, base, base_tensor, checkpoints, entry.holders, timer, buffers, norms)
        delta = merger.merge(
            entry.name,
            stats.watch(task_vectors, norms) if stats else task_vectors,
            holder_weights,
            entry.holders,
            values,
        )
        if stats is not None:
            stats.merged(entry.name, delta)
        out = base_tensor.add_(delta)  # the base buffer becomes the output
        del delta
    # compute time = elapsed minus the reads done meanwhile (the merger pulls its inputs lazily)
    timer.seconds["compute_s"] += time.perf_counter() - t0 - (timer.seconds["read_s"] - reads_before)
    return out


def _merge_blocked(
    entry: TensorPlan,
    merger: Merger,
    checkpoints: Sequence[Checkpoint],
    base: Checkpoint | None,
    resolver: ParameterResolver,
    timer: _Timer,
    buffers: _ReadBuffers,
    reader: blocks.BlockReader,
    stats: TaskVectorStats | None = None,
) -> torch.Tensor:
    """A large merged tensor, in row blocks, into the base slot's buffer (write it before that slot's next read)."""
    assert base is not None and isinstance(merger, TaskArithmeticFamily)
    t0 = time.perf_counter()
    reads_before = timer.seconds["read_s"]
    values = resolver.at(entry.name)
    holder_weights = [values.per_model[i]["weight"] for i in entry.holders]

    def on_read(seconds: float) -> None:
        timer.seconds["read_s"] += seconds

    out = buffers(0)[: 4 * math.prod(entry.shape)].view(torch.float32)
    tensor = blocks.merge_blocked(
        merger,
        entry.name,
        entry.shape,
        base,
        [checkpoints[i] for i in entry.holders],
        entry.holders,
        holder_weights,
        values,
        out,
        reader,
        stats,
        on_read,
    )
    timer.seconds["compute_s"] += time.perf_counter() - t0 - (timer.seconds["read_s"] - reads_before)
    return tensor


def _reads(
    name: str, checkpoints: Sequence[Checkpoint], holders: Sequence[int], timer: _Timer, buffers: _ReadBuffers
) -> Iterator[torch.Tensor]:
    for i in holders:
        t0 = time.perf_counter()
        tensor = checkpoints[i].get_float32(name, out=buffers(1 + i))
        timer.add("read_s", t0)
        yield tensor
        del tensor


def _task_vectors(
    name: str,
    base: Checkpoint,
    base_tensor: torch.Tensor,
    checkpoints: Sequence[Checkpoint],
    holders: Sequence[int],
    timer: _Timer,
    buffers: _ReadBuffers,
    norms: list[float],
) -> Iterator[torch.Tensor]:
    """Each holder's task vector (its read buffer, the merger's to overwrite); its L2 norm appended to ``norms``.

    The norm is the NaN/Inf check of both inputs: it is finite only where every element of model - base is,
    which needs both finite. One reduction per task vector (the report's norm, wanted anyway) instead of one
    pass per input; where it is not finite, the inputs are read again, checked, to name the culprit.
    """
    for i in holders:
        t0 = time.perf_counter()
        delta = checkpoints[i].get_float32(name, out=buffers(1 + i), check_finite=False)
        timer.add("read_s", t0)
        delta.sub_(base_tensor)
        norm = float(torch.linalg.vector_norm(delta))
        if not math.isfinite(norm):
            # Raises InvalidCheckpoint (or ComputeOverflow) naming the file; where both are finite, the
            # difference or its norm overflowed float32 and the merge goes on as before.
            base.get_float32(name)
            checkpoints[i].get_float32(name)
        norms.append(norm)
        yield delta
        del delta


# --------------------------------------------------------------------------- spec and model card
def _default_spec(
    method_name: str,
    params: Frozen,
    models: Sequence[Path],
    base: Path | None,
    weights: Sequence[float],
    dtype: str,
    shard_size_bytes: int,
    per_model: Sequence[Mapping[str, ParameterValue]] = (),
) -> dict[str, Any]:
    own = list(per_model) or [{} for _ in models]
    return {
        "method": {"name": method_name, "params": params.model_dump(mode="json")},
        "models": [
            {"uri": Path(m).name, "weight": w, "parameters": {k: dump_value(v) for k, v in p.items()}}
            for m, w, p in zip(models, weights, own)
        ],
        "base_model": {"uri": Path(base).name} if base is not None else None,
        "output": {"dtype": dtype, "shard_size_bytes": shard_size_bytes},
    }


def model_card(
    method_name: str,
    params: Frozen,
    models: Sequence[Path],
    base: Path | None,
    weights: Sequence[float],
    dtype: str,
    tensors: int,
    notes: Sequence[str],
    spec_json: dict[str, Any] | None = None,
    per_model: Sequence[Mapping[str, ParameterValue]] = (),
) -> str:
    """A Hugging Face style model card naming the method, its parameters and the models."""
    names = [Path(m).name for m in models]
    base_name = Path(base).name if base is not None else None
    if spec_json:  # the URIs the user gave beat local temporary paths
        names = [str(m.get("uri", n)) for m, n in zip(spec_json.get("models") or [], names)] or names
        if spec_json.get("base_model"):
            base_name = str(spec_json["base_model"].get("uri", base_name))
    info = METHODS[method_name]
    front = ["---", "tags:", "- merge", f"- {method_name}"]
    if base_name:
        front += ["base_model:", f"- {json.dumps(base_name)}"]
    front.append("---")
    lines = front + [
        "",
        "# Merged model",
        "",
        f"Merged with **{method_name}** ({info.description}) by the mudsc merge service.",
        "",
        "## Parameters",
        "",
        "```json",
        json.dumps(params.model_dump(mode="json"), indent=2),
        "```",
        "",
        "## Models",
        "",
    ]
    if base_name:
        lines.append(f"- base: `{base_name}`")
    own = list(per_model) or [{} for _ in names]
    lines += [
        f"- `{n}` (weight {w:g})"
        + (f", parameters `{json.dumps({k: dump_value(v) for k, v in p.items()})}`" if p else "")
        for n, w, p in zip(names, weights, own)
    ]
    lines += ["", f"Output: {tensors} tensors, floating-point ones in {dtype}.", ""]
    spec = spec_json or _default_spec(method_name, params, models, base, weights, dtype, 0, per_model)
    equivalent = to_mergekit(spec)
    lines += ["## mergekit equivalent", ""]
    if equivalent.yaml is None:
        lines += [f"None: {equivalent.reason}.", ""]
    else:
        lines += ["```yaml", equivalent.yaml.rstrip(), "```", ""] + (
            [equivalent.reason + ".", ""] if equivalent.reason else []
        )
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)
