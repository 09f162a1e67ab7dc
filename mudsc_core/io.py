"""Checkpoint I/O: validated lazy reading and sharded writing of safetensors checkpoints.

A checkpoint is a ``.safetensors`` file or a local Hugging Face model folder (``config.json``
plus ``model.safetensors`` or ``model-0000i-of-0000K.safetensors`` shards with a
``model.safetensors.index.json``). Every failure to parse or read one raises
:class:`~mudsc_core.errors.InvalidCheckpoint` naming the file.

Why the reader is our own and not ``safe_open``: every header is validated here before any
byte of data is trusted (length bounded by the file size and a cap, a JSON object, known
dtypes, byte ranges inside the data section, consistent with the shape and not overlapping),
and a tensor is then read with one positioned read into a buffer it owns. A memory-mapped
reader would leave every page it touched resident and counted in the process's RSS until
the mapping closes, so streaming a model through it costs as much resident memory as
loading it; ``pread`` keeps the resident set at the tensors actually alive. The files stay
plain safetensors (what we write is readable by ``safetensors.safe_open``/``load_file``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mudsc_core.errors import ComputeOverflow, InvalidCheckpoint, ObjectNotFound, OutputOverflow
from mudsc_core.formats import hf_folder
from mudsc_core.formats.hf_folder import INDEX_NAME, SINGLE_NAME
from mudsc_core.formats.safetensors import InvalidSafetensors, header_length, parse_header

logger = logging.getLogger(__name__)

HEADER_CAP_BYTES = 100 * 1024 * 1024  # same cap as the safetensors library

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
OUTPUT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


# --------------------------------------------------------------------------- reading
def read_header(path: Path) -> dict[str, TensorEntry]:
    """Validate a safetensors file's header (before any data is read); return its tensors."""
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            header_len = header_length(prefix, object_size=file_size, max_header_bytes=HEADER_CAP_BYTES)
            raw = f.read(header_len)
        tensors = parse_header(raw, object_size=file_size)
    except OSError as exc:
        raise InvalidCheckpoint(f"{path.name}: cannot be read ({exc.strerror or exc})") from exc
    except InvalidSafetensors as exc:
        raise InvalidCheckpoint(f"{path.name}: not a valid safetensors file: {exc}") from None
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in tensors.items():
        dtype = DTYPES.get(info.dtype)
        if dtype is None:
            raise InvalidCheckpoint(f"{path.name}: tensor {name!r} has dtype {info.dtype}, which cannot be merged")
        entries[name] = TensorEntry(path, dtype, info.shape, data_start + info.begin, info.end - info.begin)
    return entries


class Checkpoint:
    """A lazily read model: names, shapes and dtypes from the validated headers; data on ``get``."""

    def __init__(self, path: Path, entries: dict[str, TensorEntry], config_path: Path | None) -> None:
        self.path = path
        self._entries = entries
        self.config_path = config_path

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> TensorEntry:
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name].dtype

    def nbytes(self, name: str) -> int:
        return self._entries[name].nbytes

    def get(self, name: str, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into memory it owns (a fresh, writable tensor).

        With ``out`` (a contiguous uint8 tensor of at least ``nbytes(name)`` bytes) the data is
        read into the front of that buffer instead and a view of it is returned: a caller that
        reads many tensors reuses its buffers, whose pages are already resident, rather than
        page-faulting a fresh allocation for every tensor (which costs more than the read).
        The view is only valid until the caller reads into that buffer again.
        """
        entry = self._entries[name]
        if out is None:
            buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        elif out.dtype != torch.uint8 or not out.is_contiguous() or out.numel() < entry.nbytes:
            raise ValueError(f"read buffer for {name!r} must be a contiguous uint8 tensor of >= {entry.nbytes} bytes")
        else:
            buffer = out.reshape(-1)[: entry.nbytes]
        read_exact(entry.file, entry.start, buffer.numpy().data if entry.nbytes else memoryview(b""), name)
        return buffer.view(entry.dtype).reshape(entry.shape)

    def get_float32(self, name: str, *, check_finite: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
        """``get`` as float32 (the compute dtype); NaN/Inf raise InvalidCheckpoint naming the tensor.

        A tensor stored as float32 is returned as read (no copy; a view of ``out`` if given);
        another dtype is converted into a fresh tensor.
        """
        stored = self.get(name, out=out)
        tensor = stored if stored.dtype == torch.float32 else stored.to(torch.float32)
        if check_finite:
            self.check_finite(name, tensor, stored)
        return tensor

    def check_finite(self, name: str, tensor: torch.Tensor, stored: torch.Tensor) -> None:
        """``tensor`` (float32, read from ``stored``, all or part of ``name``) holds no NaN/Inf: else
        InvalidCheckpoint, or ComputeOverflow where only the conversion of finite float64 values overflowed."""
        if _all_finite(tensor):
            return
        if stored.dtype == torch.float64 and _all_finite(stored):
            raise ComputeOverflow(
                f"{self.path.name}: tensor {name!r} holds float64 values beyond the float32 range the merge computes in"
            )
        raise InvalidCheckpoint(f"{self.path.name}: tensor {name!r} contains NaN or Inf")


def read_exact(file: Path, offset: int, view: memoryview, name: str) -> None:
    """Fill ``view`` with the bytes of ``file`` from ``offset`` (unbuffered); a short or failed read raises
    InvalidCheckpoint naming the file and the tensor ``name``."""
    try:
        with open(file, "rb", buffering=0) as f:
            f.seek(offset)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise InvalidCheckpoint(f"{file.name}: truncated while reading tensor {name!r}")
                done += got
    except OSError as exc:
        raise InvalidCheckpoint(f"{file.name}: cannot read tensor {name!r} ({exc.strerror or exc})") from exc


def _all_finite(tensor: torch.Tensor) -> bool:
    """NaN propagates through min/max and Inf shows as an end: one pass, no mask allocated."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float())
    return math.isfinite(float(low)) and math.isfinite(float(high))


def open_checkpoint(path: Path) -> Checkpoint:
    """Open a ``.safetensors`` file or a HF model folder (rules: :mod:`mudsc_core.formats.hf_folder`)."""
    path = Path(path)
    if path.is_file():
        entries = read_header(path)
        return Checkpoint(path, entries, None)
    if not path.is_dir():
        raise InvalidCheckpoint(f"{path.name}: no such checkpoint file or folder")
    config = path / hf_folder.CONFIG_NAME
    config_path = config if config.is_file() else None
    names = {p.name for p in path.iterdir() if p.is_file()}
    weight_map = None
    try:
        if hf_folder.INDEX_NAME in names:
            index = path / hf_folder.INDEX_NAME
            if index.stat().st_size > hf_folder.MAX_INDEX_BYTES:
                raise InvalidCheckpoint(f"{hf_folder.INDEX_NAME}: index file is too large")
            weight_map = hf_folder.parse_index(index.read_bytes())
        files = hf_folder.weight_files(names, weight_map)
    except ObjectNotFound as exc:  # locally, a shard the index names is simply missing from the checkpoint
        raise InvalidCheckpoint(f"{path.name}: {exc.message} (missing)") from None
    except InvalidCheckpoint as exc:
        raise InvalidCheckpoint(f"{path.name}: {exc.message}") from None
    if weight_map is None:
        return Checkpoint(path, read_header(path / files[0]), config_path)
    return Checkpoint(path, _read_sharded(path, weight_map), config_path)


def _read_sharded(folder: Path, weight_map: Mapping[str, str]) -> dict[str, TensorEntry]:
    entries: dict[str, TensorEntry] = {}
    for shard_name in hf_folder.shards_of(weight_map):
        for name, entry in read_header(folder / shard_name).items():
            if weight_map.get(name) == shard_name:
                entries[name] = entry
    missing = [n for n in weight_map if n not in entries]
    if missing:
        raise InvalidCheckpoint(
            f"{hf_folder.INDEX_NAME}: tensor {missing[0]!r} is not in its shard {weight_map[missing[0]]}"
        )
    return {name: entries[name] for name in weight_map}


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The whole model in memory (for the small models of the permutation methods)."""
    checkpoint = open_checkpoint(path)
    state: dict[str, torch.Tensor] = {}
    for name in checkpoint.keys():
        tensor = checkpoint.get(name)
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise InvalidCheckpoint(f"{Path(path).name}: tensor {name!r} contains NaN or Inf")
        state[name] = tensor
    return state


# --------------------------------------------------------------------------- writing
def _header_bytes(
    layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A safetensors header (padded to 8 bytes with spaces, as the library does) and each tensor's range."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    ranges: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, dtype, shape in layout:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        ranges[name] = (offset, nbytes)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, ranges


def shard_file_name(index: int, count: int) -> str:
    return SINGLE_NAME if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def plan_shards(sizes: Iterable[tuple[str, int]], shard_size_bytes: int) -> list[list[str]]:
    """Split tensors in order into shards as HF does: a new shard when the next tensor would overflow."""
    shards: list[list[str]] = [[]]
    current = 0
    for name, nbytes in sizes:
        if shards[-1] and current + nbytes > shard_size_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += nbytes
    return shards


class _ShardWriterBase:
    """What both writers share: the output dtype rule and the index over the shards they wrote."""

    def __init__(self, out_dir: Path, dtype: str | torch.dtype, shard_size_bytes: int) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dtype = OUTPUT_DTYPES[dtype] if isinstance(dtype, str) else dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"output dtype must be floating point, got {self.dtype}")
        self.shard_size_bytes = shard_size_bytes
        self._closed = False
        self._weight_map: dict[str, str] = {}
        self._total = 0

    def out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Floating-point tensors are written in the output dtype; others keep their own."""
        return self.dtype if dtype.is_floating_point else dtype

    def _prepare(self, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The tensor as written (output dtype, contiguous, on CPU) and its bytes.

        Finiteness is checked after the cast: float64 (or float32) values beyond the output dtype's
        range become inf only here, and a result must never hold inf or NaN.
        """
        if self._closed:
            raise ValueError("shard writer is closed")
        tensor = tensor.detach().to("cpu", self.out_dtype(tensor.dtype)).contiguous()
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise OutputOverflow(
                f"tensor {name!r}: merged values do not fit the output dtype {str(tensor.dtype).removeprefix('torch.')}"
                " (they overflow to inf or are NaN); choose a wider output dtype"
            )
        data = tensor.reshape(-1).view(torch.uint8).numpy().data.cast("B") if tensor.numel() else b""
        return tensor, data

    def _finish(self, files: list[str]) -> list[str]:
        if len(files) > 1:
            index = {"metadata": {"total_size": self._total}, "weight_map": self._weight_map}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            files.append(INDEX_NAME)
        return files


class PlannedShardWriter(_ShardWriterBase):
    """Shards whose layout is known up front (what a streaming merge plans first).

    ``layout`` lists (name, dtype as stored in the source, shape) for every tensor, in order. The
    shard headers are written at once and each tensor is ``pwrite``-n straight to its place, in any
    order, so nothing is held here and a write-behind thread may write while the next is computed.
    """

    def __init__(
        self,
        out_dir: Path,
        dtype: str | torch.dtype,
        shard_size_bytes: int,
        layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
    ) -> None:
        super().__init__(out_dir, dtype, shard_size_bytes)
        self._layout = {name: (self.out_dtype(dt), tuple(shape)) for name, dt, shape in layout}
        sizes = [(n, math.prod(s) * dt.itemsize) for n, (dt, s) in self._layout.items()]
        self._places: dict[str, tuple[int, int, int]] = {}  # name -> (fd, absolute offset, nbytes)
        self._fds: list[int] = []
        self._files: list[str] = []
        self._pending = set(self._layout)
        shards = plan_shards(sizes, self.shard_size_bytes)
        for i, names in enumerate(shards):
            file_name = shard_file_name(i, len(shards))
            header, ranges = _header_bytes((n, *self._layout[n]) for n in names)
            fd = os.open(self.out_dir / file_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            self._files.append(file_name)
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, len(header) + sum(nbytes for _, nbytes in ranges.values()))
            for name in names:
                offset, nbytes = ranges[name]
                self._places[name] = (fd, len(header) + offset, nbytes)
                self._weight_map[name] = file_name
                self._total += nbytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor, data = self._prepare(name, tensor)
        if name not in self._pending:
            raise ValueError(f"tensor {name!r} is not in the planned layout or was already written")
        dtype, shape = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r} is {tensor.dtype}{tuple(tensor.shape)}, planned {dtype}{shape}")
        fd, offset, _ = self._places[name]
        _pwrite_all(fd, data, offset)
        self._pending.discard(name)

    def close(self) -> list[str]:
        """Finish every shard (and the index when there are several); return the file names written."""
        if self._closed:
            raise ValueError("shard writer is closed")
        self._closed = True
        for fd in self._fds:
            os.close(fd)
        if self._pending:
            raise ValueError(
                f"{len(self._pending)} planned tensors were never written, e.g. {sorted(self._pending)[0]!r}"
            )
        return self._finish(list(self._files))

    def abort(self) -> None:
        """Close handles without finishing (the caller removes the folder)."""
        if not self._closed:
            self._closed = True
            for fd in self._fds:
                os.close(fd)


class SpooledShardWriter(_ShardWriterBase):
    """Shards of tensors added one by one with no layout known up front.

    Each shard's data is spooled to a temporary file as tensors arrive; the shard is assembled
    (header, then the spooled data) when it is full or on ``close``. No tensor is held here.
    """

    def __init__(self, out_dir: Path, dtype: str | torch.dtype, shard_size_bytes: int) -> None:
        super().__init__(out_dir, dtype, shard_size_bytes)
        self._spool: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        self._spool_size = 0
        self._spool_files: list[Path] = []
        self._spool_handle: BinaryIO | None = None
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor, data = self._prepare(name, tensor)
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._spool[-1] and self._spool_size + nbytes > self.shard_size_bytes:
            self._roll_spool()
        if self._spool_handle is None:
            spool_path = self.out_dir / f".spool-{len(self._spool_files):05d}.tmp"
            self._spool_files.append(spool_path)
            self._spool_handle = open(spool_path, "wb")
        self._spool_handle.write(data)
        self._spool[-1].append((name, tensor.dtype, tuple(tensor.shape)))
        self._spool_size += nbytes

    def _roll_spool(self) -> None:
        if self._spool_handle is not None:
            self._spool_handle.close()
            self._spool_handle = None
        self._spool.append([])
        self._spool_size = 0

    def close(self) -> list[str]:
        """Assemble every shard (and the index when there are several); return the file names written."""
        if self._closed:
            raise ValueError("shard writer is closed")
        self._closed = True
        if self._spool_handle is not None:
            self._spool_handle.close()
            self._spool_handle = None
        shards = [s for s in self._spool if s] or [[]]
        files = []
        for i, shard in enumerate(shards):
            file_name = shard_file_name(i, len(shards))
            header, ranges = _header_bytes(shard)
            with open(self.out_dir / file_name, "wb") as out:
                out.write(header)
                if i < len(self._spool_files):
                    with open(self._spool_files[i], "rb") as spool:
                        _copy(spool, out)
                    self._spool_files[i].unlink()
            for name, _, _ in shard:
                self._weight_map[name] = file_name
                self._total += ranges[name][1]
            files.append(file_name)
        return self._finish(files)

    def abort(self) -> None:
        """Close handles without finishing (the caller removes the folder)."""
        if not self._closed:
            self._closed = True
            if self._spool_handle is not None:
                self._spool_handle.close()


def ShardWriter(  # the one public constructor of both writers (a function: it picks the class)
    out_dir: Path,
    dtype: str | torch.dtype = torch.float32,
    shard_size_bytes: int = 2 * 1024**3,
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]] | None = None,
) -> PlannedShardWriter | SpooledShardWriter:
    """``model.safetensors`` or HF shards + ``model.safetensors.index.json``: planned with a ``layout``, else spooled."""
    if layout is not None:
        return PlannedShardWriter(out_dir, dtype, shard_size_bytes, layout)
    return SpooledShardWriter(out_dir, dtype, shard_size_bytes)


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _copy(src: BinaryIO, dst: BinaryIO) -> None:
    try:
        size = os.fstat(src.fileno()).st_size
        dst.flush()
        done = 0
        while done < size:
            moved = os.copy_file_range(src.fileno(), dst.fileno(), size - done)
            if moved == 0:
                break
            done += moved
        if done == size:
            return
        src.seek(done)
    except (AttributeError, OSError):
        src.seek(0)
    while chunk := src.read(16 * 1024 * 1024):
        dst.write(chunk)


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    out_dir: Path,
    dtype: str | torch.dtype = torch.float32,
    shard_size_bytes: int = 2 * 1024**3,
) -> list[str]:
    """Write a whole state dict as ``model.safetensors`` or HF shards + index."""
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in state.items()]
    writer = PlannedShardWriter(out_dir, dtype, shard_size_bytes, layout)
    try:
        for name, tensor in state.items():
            writer.add(name, tensor)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def iter_tensors(checkpoint: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    for name in checkpoint.keys():
        yield name, checkpoint.get(name)


__all__ = [
    "Checkpoint",
    "ShardWriter",
    "PlannedShardWriter",
    "SpooledShardWriter",
    "TensorEntry",
    "open_checkpoint",
    "load_state_dict",
    "save_state_dict",
    "read_header",
    "plan_shards",
    "DTYPES",
    "OUTPUT_DTYPES",
]
