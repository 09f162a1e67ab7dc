"""The torch-free safetensors header check used at submission."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from mudsc_core.formats.safetensors import InvalidSafetensors, header_length, parse_header


def _split(blob: bytes) -> tuple[int, bytes]:
    n = header_length(blob[:8], object_size=len(blob), max_header_bytes=1 << 20)
    return n, blob[8 : 8 + n]


def _raw(header: dict, data: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def test_real_file_parses_with_dtypes_and_shapes() -> None:
    blob = save(
        {"w": np.zeros((3, 4), np.float32), "b": np.ones(4, np.float16), "i": np.arange(2)}, metadata={"format": "np"}
    )
    _, header = _split(blob)
    tensors = parse_header(header, object_size=len(blob))
    assert {k: (v.dtype, v.shape) for k, v in tensors.items()} == {
        "w": ("F32", (3, 4)),
        "b": ("F16", (4,)),
        "i": ("I64", (2,)),
    }


def test_truncated_body_is_refused() -> None:
    blob = save({"w": np.zeros((16, 16), np.float32)})
    _, header = _split(blob)
    with pytest.raises(InvalidSafetensors, match="truncated"):
        parse_header(header, object_size=len(blob) - 10)


@pytest.mark.parametrize(
    "header, fragment",
    [
        ({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "needs 8 bytes"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "ordered"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            "overlap",
        ),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "non-negative"),
        ({"w": [1, 2]}, "entry must be"),
        ({"__metadata__": {"k": 1}}, "__metadata__"),
    ],
)
def test_malformed_headers_are_refused(header: dict, fragment: str) -> None:
    blob = _raw(header, b"\0" * 16)
    n, raw = _split(blob)
    with pytest.raises(InvalidSafetensors, match=fragment):
        parse_header(raw, object_size=len(blob))


def test_header_length_bounds() -> None:
    with pytest.raises(InvalidSafetensors, match="runs past"):
        header_length(struct.pack("<Q", 1000), object_size=100, max_header_bytes=1 << 20)
    with pytest.raises(InvalidSafetensors, match="exceeds the limit"):
        header_length(struct.pack("<Q", 1 << 30), object_size=1 << 31, max_header_bytes=1 << 20)
    with pytest.raises(InvalidSafetensors, match="too short"):
        header_length(b"\1\0", object_size=2, max_header_bytes=1 << 20)
    with pytest.raises(InvalidSafetensors, match="not a JSON object"):
        parse_header(b"[1, 2]", object_size=14)
    with pytest.raises(InvalidSafetensors, match="UTF-8 JSON"):
        parse_header(b"\xff\xfe{", object_size=11)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=64))
def test_arbitrary_bytes_never_crash_the_check(blob: bytes) -> None:
    try:
        n, header = _split(blob)
        parse_header(header, object_size=len(blob))
    except InvalidSafetensors:
        pass
