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


# --------------------------------------------------------------------------- hostile headers, generated
_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Entries shaped like tensors, with every field of any JSON type: the parser must never trip over a type.
_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(["F32", "BF16", "I64", "XX"]), _ANY_JSON),
        "shape": st.one_of(st.lists(st.integers(min_value=-2, max_value=2**65), max_size=4), _ANY_JSON),
        "data_offsets": st.one_of(st.lists(st.integers(min_value=-2, max_value=2**65), max_size=3), _ANY_JSON),
    },
)
_HEADER = st.one_of(
    _ANY_JSON,
    st.dictionaries(st.text(max_size=8), st.one_of(_ENTRY, _ANY_JSON), max_size=4),
    st.dictionaries(st.just("__metadata__"), _ANY_JSON, max_size=1),
)


@settings(max_examples=600, deadline=None)
@given(header=_HEADER, padding=st.integers(min_value=0, max_value=64))
def test_any_json_header_parses_or_is_refused_as_invalid(header: object, padding: int) -> None:
    blob = _raw(header, b"\0" * padding)
    try:
        length = header_length(blob[:8], object_size=len(blob), max_header_bytes=1 << 20)
        tensors = parse_header(blob[8 : 8 + length], object_size=len(blob))
    except InvalidSafetensors:
        return
    for info in tensors.values():
        assert info.dtype in {"F32", "BF16", "I64"} and all(0 <= d < 2**63 for d in info.shape)


@pytest.mark.parametrize("depth", [5, 1000, 100_000])
def test_deeply_nested_headers_are_refused_unparsed(depth: int) -> None:
    raw = b"[" * depth + b"]" * depth
    with pytest.raises(InvalidSafetensors, match="nested"):
        parse_header(raw, object_size=8 + len(raw))


def test_a_zero_element_tensor_with_a_dimension_beyond_int64_is_refused() -> None:
    raw = json.dumps({"w": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}).encode()
    with pytest.raises(InvalidSafetensors, match="2\\^63-1"):
        parse_header(raw, object_size=8 + len(raw))


@pytest.mark.parametrize("dtype", [["F32"], {"a": 1}, 3, None])
def test_a_dtype_of_any_other_type_is_refused(dtype: object) -> None:
    raw = json.dumps({"w": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}).encode()
    with pytest.raises(InvalidSafetensors, match="unknown dtype"):
        parse_header(raw, object_size=8 + len(raw) + 4)
