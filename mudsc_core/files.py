"""File-level merge used by the worker: local checkpoint files in, a merged model folder out.

Dispatches by method family: permutation methods (MuDSC and its special cases) load the
(small, separately trained) models whole and call :func:`mudsc_core.permutation.merge.merge`;
same-base methods stream tensor by tensor (:mod:`mudsc_core.same_base.stream`; ``passthrough`` with
the job's ``slices``: :mod:`mudsc_core.same_base.passthrough`). Either way the
folder gets the weights and its sidecars (:mod:`mudsc_core.output`): the job spec, the report and,
for same-base merges, the model config and card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mudsc_core.errors import InvalidCalibration, InvalidCheckpoint
from mudsc_core.formats.hf_folder import CONFIG_NAME
from mudsc_core.output import carried_files, write_sidecars
from mudsc_core.progress import Progress
from mudsc_core.schema import METHODS, ArchitectureSpec, JobSpec

if TYPE_CHECKING:
    from mudsc_core.io import Checkpoint


@dataclass(frozen=True)
class LocalInputs:
    models: list[Path]
    base_model: Path | None = None
    calibration: Path | None = None
    # Per model: the local PEFT LoRA adapter folder applied to it (``models[i].lora``), or None.
    loras: list[Path | None] = field(default_factory=list)


def load_calibration(path: Path, tensor_name: str, max_samples: int) -> torch.Tensor:
    from mudsc_core.io import open_checkpoint

    checkpoint = open_checkpoint(path)
    if tensor_name not in checkpoint.keys():
        raise InvalidCalibration(
            f"calibration file has no tensor {tensor_name!r} (it has: {', '.join(sorted(checkpoint.keys())[:10])})"
        )
    shape = checkpoint.shape(tensor_name)
    if len(shape) < 2 or shape[0] == 0:
        raise InvalidCalibration(f"calibration tensor {tensor_name!r} must be (samples, ...), got shape {list(shape)}")
    return checkpoint.get(tensor_name)[:max_samples]


def load_calibration_inputs(path: Path, max_samples: int) -> dict[str, torch.Tensor]:
    """Every tensor of the calibration file, by name: the forward keywords of a transformers model."""
    from mudsc_core.io import open_checkpoint

    checkpoint = open_checkpoint(path)
    if not checkpoint.keys():
        raise InvalidCalibration("the calibration file holds no tensors")
    inputs = {}
    for name in checkpoint.keys():
        shape = checkpoint.shape(name)
        if len(shape) < 1 or shape[0] == 0:
            raise InvalidCalibration(f"calibration tensor {name!r} must be (samples, ...), got shape {list(shape)}")
        inputs[name] = checkpoint.get(name)[:max_samples]
    return inputs


def _transformers_states(
    spec: JobSpec, architecture: ArchitectureSpec, inputs: LocalInputs
) -> list[dict[str, torch.Tensor]]:
    """Each model folder loaded by transformers (after our own checks of its files' headers)."""
    from mudsc_core.architectures import transformers as hf
    from mudsc_core.io import load_state_dict, open_checkpoint

    states = []
    for path, ref in zip(inputs.models, spec.models):
        if not path.is_dir():  # a single file with the config given inline: its names are the model's
            states.append(load_state_dict(path))
            continue
        open_checkpoint(path)  # headers, index and shards checked as for every other merge
        states.append(hf.load_folder(architecture.typed_config(), path, ref.uri))
    return states


def _architecture(spec: JobSpec, inputs: LocalInputs) -> ArchitectureSpec:
    """The job's architecture; a transformers one with its config read from (and checked against) the folders."""
    assert spec.architecture is not None  # the spec validator requires it
    if spec.architecture.name != "transformers":
        return spec.architecture
    from mudsc_core.architectures import transformers as hf

    config = hf.resolve(
        spec.architecture.typed_config(), inputs.models, [f"models[{i}] {m.uri}" for i, m in enumerate(spec.models)]
    )
    return ArchitectureSpec(name="transformers", config=config.as_dict())


def merge_files(
    spec: JobSpec,
    inputs: LocalInputs,
    out_dir: Path,
    *,
    device: str,
    progress: Progress | None = None,
    memory_budget_bytes: int | None = None,
) -> dict[str, Any]:
    """Merge the checkpoints named by ``inputs`` as ``spec`` says; write into ``out_dir``.

    ``memory_budget_bytes`` (None or 0: no limit) bounds a permutation merge's estimated peak memory
    (:class:`~mudsc_core.errors.TooLarge` beyond it).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    info = METHODS[spec.method.name]
    spec_json = spec.model_dump(mode="json")
    sidecars: dict[str, Any] = {}
    if info.family == "same_base" and spec.slices is not None:
        from mudsc_core.same_base.passthrough import merge_slices

        report = merge_slices(
            spec.slices,
            _same_base_models(spec, inputs),
            out_dir,
            dtype=spec.output.dtype,
            shard_size_bytes=spec.output.shard_size_bytes,
            spec_json=spec_json,
            progress=progress,
        )
    elif info.family == "same_base":
        from mudsc_core.same_base.stream import merge_checkpoints

        report = merge_checkpoints(
            spec.method.name,
            spec.method.typed_params(),
            _same_base_models(spec, inputs),
            inputs.base_model,
            [m.weight for m in spec.models],
            out_dir,
            dtype=spec.output.dtype,
            shard_size_bytes=spec.output.shard_size_bytes,
            spec_json=spec_json,
            progress=progress,
            model_parameters=[m.parameters for m in spec.models],
        )
    else:
        from mudsc_core.io import load_state_dict, save_state_dict
        from mudsc_core.permutation.merge import merge

        architecture = _architecture(spec, inputs)
        calibration: torch.Tensor | dict[str, torch.Tensor] | None = None
        if spec.calibration is not None and inputs.calibration is not None:
            if architecture.name == "transformers":
                calibration = load_calibration_inputs(inputs.calibration, spec.calibration.max_samples)
            else:
                calibration = load_calibration(
                    inputs.calibration, spec.calibration.tensor, spec.calibration.max_samples
                )
        if architecture.name == "transformers":
            states = _transformers_states(spec, architecture, inputs)
        else:
            states = [load_state_dict(path) for path in inputs.models]
        result = merge(
            states,
            architecture,
            spec.method,
            calibration,
            device=device,
            progress=progress,
            calibration_batch_size=spec.calibration.batch_size if spec.calibration else 128,
            memory_budget_bytes=memory_budget_bytes,
        )
        report = result.report
        merged = result.state_dict
        if architecture.name == "transformers":
            from mudsc_core.architectures import transformers as hf

            merged = hf.to_checkpoint(architecture.typed_config(), merged)
        save_state_dict(merged, out_dir, spec.output.dtype, spec.output.shard_size_bytes)
        sidecars["spec"] = spec_json  # (the same-base stream writes its spec, config and card itself)
        if architecture.name == "transformers":  # the result loads with from_pretrained
            config_file = inputs.models[0] / CONFIG_NAME
            sidecars["config_source"] = config_file if config_file.is_file() else architecture.config
            sidecars["dtype"] = spec.output.dtype
    report.setdefault("metrics", {})
    write_sidecars(out_dir, carried=carried_files(_tokenizer_folder(spec, inputs)), report=report, **sidecars)
    return report


def _same_base_models(spec: JobSpec, inputs: LocalInputs) -> list[Path | Checkpoint]:
    """The models as paths, or, where a model has a LoRA adapter, as the base with the adapter applied
    (a :class:`~mudsc_core.lora.LoraCheckpoint`: the adapted tensors are computed as they are read)."""
    loras = list(inputs.loras) + [None] * (len(inputs.models) - len(inputs.loras))
    if len(loras) != len(inputs.models) or any(
        (lora is None) != (ref.lora is None) for lora, ref in zip(loras, spec.models)
    ):
        raise ValueError("give one local adapter folder per model with a LoRA adapter (and none for the others)")
    if all(lora is None for lora in loras):
        return list(inputs.models)
    from mudsc_core.io import open_checkpoint
    from mudsc_core.lora import open_lora_checkpoint

    models: list[Path | Checkpoint] = []
    for path, lora, ref in zip(inputs.models, loras, spec.models):
        if lora is None or ref.lora is None:
            models.append(path)
            continue
        base = open_checkpoint(path)
        try:
            models.append(open_lora_checkpoint(base, lora))
        except InvalidCheckpoint as exc:  # name the adapter as the user gave it, not the local folder
            detail = exc.message.removeprefix(f"{lora.name}: ")
            raise InvalidCheckpoint(f"{ref.lora.uri}: {detail}") from None
    return models


def _tokenizer_folder(spec: JobSpec, inputs: LocalInputs) -> Path | None:
    """The input folder whose tokenizer files the result carries (``output.tokenizer_source``)."""
    index = spec.tokenizer_folder_index()
    if index is None:
        return None
    folder = inputs.base_model if index == len(spec.models) else inputs.models[index]
    return folder if folder is not None and folder.is_dir() else None
