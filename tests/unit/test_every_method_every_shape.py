"""Every registered same-base method on every tensor shape: 0-d, zero-size, 1-D, large, non-contiguous.

Defined behaviour (docs/same_base_methods.md): a 0-d or zero-size tensor merges like any other (a
zero-size one stays empty); methods that work on matrices (TSV, Iso-C/CTS) fall back to task
arithmetic on other shapes; nothing crashes, nothing comes back non-finite.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mudsc_core.same_base.stream import build_merger, merge_checkpoints
from mudsc_core.schema import METHODS

# passthrough is excluded: it is a layer remap (the job's slices pick each output layer from one model),
# not a per-tensor merge of the models' same tensor; tests/unit/test_passthrough.py covers it.
SAME_BASE = sorted(name for name, info in METHODS.items() if info.family == "same_base" and name != "passthrough")
SHAPES: dict[str, tuple[int, ...]] = {
    "scalar": (),
    "empty": (0,),
    "empty_matrix": (0, 5),
    "vector": (7,),
    "matrix": (6, 4),
    "large": (1 << 20,),
}


def _checkpoints(tmp_path: Path, shape: tuple[int, ...], n: int) -> tuple[list[Path], Path]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=generator)
    save_file({"t": base}, tmp_path / "base.safetensors")
    paths = []
    for i in range(n):
        path = tmp_path / f"m{i}.safetensors"
        save_file({"t": base + 0.1 * torch.randn(shape, generator=generator)}, path)
        paths.append(path)
    return paths, tmp_path / "base.safetensors"


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("method", SAME_BASE)
def test_method_merges_every_shape(tmp_path: Path, method: str, shape_name: str) -> None:
    info = METHODS[method]
    shape = SHAPES[shape_name]
    n = 2 if info.max_models == 2 else 3
    models, base = _checkpoints(tmp_path, shape, n)
    merge_checkpoints(
        method,
        {},
        models,
        base if info.requires_base else None,
        [1.0] * n,
        tmp_path / "out",
        dtype="float32",
        shard_size_bytes=1 << 30,
    )
    merged = load_file(tmp_path / "out" / "model.safetensors")["t"]
    assert tuple(merged.shape) == shape
    assert bool(torch.isfinite(merged).all())


@pytest.mark.parametrize("method", SAME_BASE)
def test_method_accepts_non_contiguous_tensors(method: str) -> None:
    """Mergers get views at times (a transposed task vector): the result equals the contiguous one."""
    info = METHODS[method]
    n = 2 if info.max_models == 2 else 3
    generator = torch.Generator().manual_seed(1)
    tensors = [torch.randn(5, 8, generator=generator) for _ in range(n)]
    merger = build_merger(method, info.params())
    contiguous = merger.merge("w", [t.t().contiguous() for t in tensors], [1.0] * n, list(range(n)))
    strided = merger.merge("w", [t.t() for t in tensors], [1.0] * n, list(range(n)))
    assert not tensors[0].t().is_contiguous()
    torch.testing.assert_close(strided, contiguous)


PERMUTATION = sorted(name for name, info in METHODS.items() if info.family == "permutation")
MLP = {"name": "mlp", "config": {"input_dim": 8, "hidden": [6], "num_classes": 3}}


@pytest.mark.parametrize("bad", ["scalar", "empty", "flat"])
@pytest.mark.parametrize("method", PERMUTATION)
def test_permutation_methods_refuse_tensors_of_another_shape(method: str, bad: str) -> None:
    """The permutation family reads shapes off the architecture: any other shape is architecture_mismatch."""
    from mudsc_core import build_model, merge
    from mudsc_core.errors import ArchitectureMismatch

    states = [build_model(MLP).state_dict() for _ in range(2)]
    weight = states[1]["fc0.weight"]
    states[1]["fc0.weight"] = {"scalar": weight[0, 0], "empty": weight[:0], "flat": weight.reshape(-1)}[bad]
    with pytest.raises(ArchitectureMismatch, match="fc0.weight"):
        merge(states, MLP, {"name": method}, calibration=torch.randn(16, 8))


@pytest.mark.parametrize("method", PERMUTATION)
def test_permutation_methods_accept_non_contiguous_tensors(method: str) -> None:
    from mudsc_core import build_model, merge

    torch.manual_seed(0)
    states = [build_model(MLP).state_dict() for _ in range(2)]
    strided = [{k: v.t().contiguous().t() if v.ndim == 2 else v for k, v in s.items()} for s in states]
    assert not strided[0]["fc0.weight"].is_contiguous()
    calibration = torch.randn(16, 8)
    expected = merge(states, MLP, {"name": method}, calibration=calibration).state_dict
    got = merge(strided, MLP, {"name": method}, calibration=calibration).state_dict
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor)
