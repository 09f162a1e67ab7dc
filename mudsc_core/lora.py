"""A base checkpoint with a PEFT LoRA adapter applied, read tensor by tensor.

:class:`LoraCheckpoint` is a :class:`~mudsc_core.io.Checkpoint` whose adapted tensors are
``W + scale * B @ A``, computed when the tensor is read (``get_float32``/``get``): no merged copy of
the model exists, in memory or on disk. The adapter's rules (its files, its config, how its
tensors pair with the base's) are :mod:`mudsc_core.formats.peft_adapter`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mudsc_core.errors import InvalidCheckpoint, MergeError
from mudsc_core.formats import peft_adapter
from mudsc_core.io import DTYPE_NAMES, Checkpoint, _all_finite, open_checkpoint, read_header


class LoraCheckpoint(Checkpoint):
    """``base`` with ``adapter``'s pairs applied (names, shapes and dtypes are the base's)."""

    def __init__(self, base: Checkpoint, adapter: Checkpoint, pairs: list[peft_adapter.LoraPair], scale: float) -> None:
        super().__init__(base.path, {name: base.entry(name) for name in base.keys()}, base.config_path)
        self.base = base
        self.adapter = adapter
        self.scale = scale
        self.pairs = {p.base: p for p in pairs}

    def get(self, name: str, *, out: torch.Tensor | None = None) -> torch.Tensor:
        if name not in self.pairs:
            return self.base.get(name, out=out)
        return self.get_float32(name, out=out).to(self.dtype(name))

    def get_float32(self, name: str, *, check_finite: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
        pair = self.pairs.get(name)
        if pair is None:
            return self.base.get_float32(name, check_finite=check_finite, out=out)
        tensor = self.base.get_float32(name, check_finite=check_finite, out=out)
        lora_a = self.adapter.get_float32(pair.a)
        lora_b = self.adapter.get_float32(pair.b)
        tensor.addmm_(lora_b, lora_a, alpha=self.scale)  # in place: no second copy of the tensor
        if check_finite and not _all_finite(tensor):
            raise InvalidCheckpoint(
                f"{self.adapter.path.name}: tensor {name!r} with the adapter applied overflows float32 (inf or NaN)"
            )
        return tensor


def open_lora_checkpoint(base: Path | Checkpoint, adapter: Path) -> LoraCheckpoint:
    """The base (a path or an open checkpoint) with the PEFT adapter folder ``adapter`` applied.

    Every failure is :class:`~mudsc_core.errors.InvalidCheckpoint` (a missing file in the folder
    included) whose message names the file or tensor, prefixed with the folder's name.
    """
    adapter = Path(adapter)
    base_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(Path(base))
    try:
        if not adapter.is_dir():
            raise InvalidCheckpoint("not a LoRA adapter folder")
        sizes = {p.name: p.stat().st_size for p in adapter.iterdir() if p.is_file()}
        try:
            peft_adapter.files_to_fetch(sizes)
        except MergeError as exc:
            raise InvalidCheckpoint(exc.message) from None
        config = peft_adapter.parse_config((adapter / peft_adapter.CONFIG_NAME).read_bytes())
        entries = read_header(adapter / peft_adapter.WEIGHTS_NAME)
        pairs = peft_adapter.pair_tensors(
            {name: (DTYPE_NAMES[e.dtype], e.shape) for name, e in entries.items()},
            {name: base_ckpt.shape(name) for name in base_ckpt.keys()},
            config,
        )
    except InvalidCheckpoint as exc:
        raise InvalidCheckpoint(f"{adapter.name}: {exc.message}") from None
    except OSError as exc:
        raise InvalidCheckpoint(f"{adapter.name}: cannot be read ({exc.strerror or exc})") from None
    weights = Checkpoint(adapter / peft_adapter.WEIGHTS_NAME, entries, None)
    return LoraCheckpoint(base_ckpt, weights, pairs, config.scale)


__all__ = ["LoraCheckpoint", "open_lora_checkpoint"]
