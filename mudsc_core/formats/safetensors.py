"""Torch-free validation of a safetensors header (used by the API on S3 objects and by mudsc_core.io on files).

Layout: 8 bytes little-endian header length N, N bytes of JSON, then the data buffer. The
header maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the buffer) plus an optional ``__metadata__`` string map. The check reads only
the header (two ranged GETs in the API) and needs the object's total size.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from mudsc_core.formats import json_limits

# Bytes per element of every dtype the safetensors format defines (sub-byte ones as fractions).
DTYPE_SIZES: dict[str, float] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "F4": 0.5,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
MAX_TENSORS = 1_000_000
MAX_DIMS = 64
MAX_DIM = 2**63 - 1  # what torch (int64 sizes) can represent
# Merging averages, permutes and scales weights: they must be floating point. Integer bookkeeping tensors
# (BatchNorm's step counter; the position index buffer that transformers before 4.31 saved with BERT-style
# models, ``embeddings.position_ids``, which transformers 5 ignores on load) are carried over as they are.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
BOOKKEEPING_SUFFIXES = ("num_batches_tracked", "position_ids")


def is_bookkeeping(name: str) -> bool:
    """An integer buffer that rides along with the weights (never merged, never refused for its dtype)."""
    return name.endswith(BOOKKEEPING_SUFFIXES)


class InvalidSafetensors(ValueError):
    """The object is not a well-formed safetensors file; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data buffer (after the header)
    end: int


def _short(value: object, limit: int = 60) -> str:
    """A bounded repr for messages (an attacker's name or dtype may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def header_length(prefix: bytes, *, object_size: int, max_header_bytes: int) -> int:
    """The JSON header's length from the first 8 bytes, checked against the object size and a bound."""
    if object_size < 8 or len(prefix) < 8:
        raise InvalidSafetensors(f"{object_size} bytes is too short for a safetensors file")
    length: int
    (length,) = struct.unpack("<Q", prefix[:8])
    if length < 2:
        raise InvalidSafetensors("header length is smaller than an empty JSON object")
    if length > max_header_bytes:
        raise InvalidSafetensors(f"header length {length} exceeds the limit of {max_header_bytes} bytes")
    if 8 + length > object_size:
        raise InvalidSafetensors(f"header length {length} runs past the end of the {object_size}-byte object")
    return length


def parse_header(header: bytes, *, object_size: int) -> dict[str, TensorInfo]:
    """Validate the header JSON against the object size; returns the tensors by name."""
    try:
        # A valid header nests 3 deep ({name: {"shape": [...]}}); anything deeper is refused unparsed.
        decoded: Any = json_limits.loads(header, max_bytes=len(header), max_depth=4, what="header")
    except json_limits.UntrustedJsonError as exc:
        raise InvalidSafetensors(str(exc)) from None
    if not isinstance(decoded, dict):
        raise InvalidSafetensors("header is not a JSON object")
    buffer_size = object_size - 8 - len(header)
    metadata = decoded.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise InvalidSafetensors("__metadata__ must map strings to strings")
    if len(decoded) > MAX_TENSORS:
        raise InvalidSafetensors(f"more than {MAX_TENSORS} tensors")
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in decoded.items():
        if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
            raise InvalidSafetensors(f"tensor {_short(name)}: entry must be {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise InvalidSafetensors(f"tensor {_short(name)}: unknown dtype {_short(dtype)}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)
        ):
            raise InvalidSafetensors(
                f"tensor {_short(name)}: shape must be a list of at most {MAX_DIMS} non-negative integers (each at most 2^63-1)"
            )
        if math.prod(shape) > MAX_DIM:
            raise InvalidSafetensors(f"tensor {_short(name)}: {math.prod(shape)} elements exceed 2^63-1")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise InvalidSafetensors(f"tensor {_short(name)}: data_offsets must be two integers")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise InvalidSafetensors(f"tensor {_short(name)}: data_offsets {offsets} are not an ordered pair")
        if end > buffer_size:
            raise InvalidSafetensors(
                f"tensor {_short(name)}: data ends at byte {end} but the data buffer holds {buffer_size} bytes (truncated?)"
            )
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if expected != end - begin:
            raise InvalidSafetensors(
                f"tensor {_short(name)}: {dtype}{shape} needs {expected:g} bytes, data_offsets span {end - begin}"
            )
        tensors[name] = TensorInfo(dtype, tuple(shape), begin, end)
        spans.append((begin, end, name))
    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise InvalidSafetensors(f"tensors {_short(prev)} and {_short(name)} overlap in the data buffer")
    return tensors
