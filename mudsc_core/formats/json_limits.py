"""Bounds checked on an untrusted JSON document before it is parsed (torch-free).

Python's decoder recurses once per nesting level: a document nested 100,000 deep raises
``RecursionError`` (or worse, exhausts the stack in a thread). Every untrusted document we parse
(safetensors headers, index files, model and adapter configs) first passes :func:`check_json`,
which bounds its size and nesting depth in one vectorised pass, and is then decoded with
:func:`loads`, which turns every decoder failure into one ``ValueError`` subclass.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

MAX_DEPTH = 64
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


class UntrustedJsonError(ValueError):
    """The document is too large, too deeply nested, or not JSON; the message says which."""


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in ``raw`` (brackets inside strings do not count)."""
    structural = _STRING.sub(b"", raw)
    if not structural:
        return 0
    steps = _OPEN[np.frombuffer(structural, dtype=np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def loads(raw: bytes, *, max_bytes: int, max_depth: int = MAX_DEPTH, what: str = "document") -> Any:
    """Decode an untrusted JSON document after bounding its size and depth; ``UntrustedJsonError`` otherwise."""
    if len(raw) > max_bytes:
        raise UntrustedJsonError(f"{what} is {len(raw)} bytes, more than the {max_bytes} allowed")
    depth = json_depth(raw)
    if depth > max_depth:
        raise UntrustedJsonError(f"{what} is nested {depth} levels deep, more than the {max_depth} allowed")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UntrustedJsonError(f"{what} is not valid UTF-8 JSON: {exc}") from None
