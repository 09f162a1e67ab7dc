"""Values the output dtype cannot hold are refused after the cast (never an inf in a result)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mudsc_core.errors import ComputeOverflow, OutputOverflow
from mudsc_core.io import save_state_dict
from mudsc_core.same_base.stream import merge_checkpoints


@pytest.mark.parametrize(
    ("value", "dtype", "error"),
    [(1e39, "float32", ComputeOverflow), (1e5, "float16", OutputOverflow), (3.5e38, "bfloat16", ComputeOverflow)],
)
def test_finite_inputs_beyond_a_dtype_fail_with_a_specific_overflow(
    tmp_path: Path, value: float, dtype: str, error: type[Exception]
) -> None:
    """float64 beyond float32 fails when read (the merge computes in float32); a float32 result beyond
    float16 fails when written (output_overflow)."""
    models = []
    for i in range(2):
        path = tmp_path / f"m{i}.safetensors"
        save_file({"w": torch.full((4,), value, dtype=torch.float64), "ok": torch.ones(2, dtype=torch.float64)}, path)
        models.append(path)
    out = tmp_path / "out"
    with pytest.raises(error, match="'w'"):
        merge_checkpoints("linear", {}, models, None, [1.0, 1.0], out, dtype=dtype, shard_size_bytes=1 << 30)
    assert not any(p.suffix == ".safetensors" for p in out.rglob("*"))  # nothing half-written is left


def test_the_writer_checks_every_float_tensor_after_the_cast(tmp_path: Path) -> None:
    with pytest.raises(OutputOverflow):
        save_state_dict({"w": torch.tensor([1e300], dtype=torch.float64)}, tmp_path / "o", "float32")
    save_state_dict({"steps": torch.tensor([2**40])}, tmp_path / "p", "float16")  # integers are never cast


def test_finite_weights_that_overflow_the_permutation_merge_are_not_blamed_on_calibration() -> None:
    from mudsc_core import build_model, merge

    arch = {"name": "mlp", "config": {"input_dim": 8, "hidden": [6], "num_classes": 3}}
    beyond = {k: v.to(torch.float64) * 1e300 for k, v in build_model(arch).state_dict().items()}
    with pytest.raises(ComputeOverflow, match="float32 range"):
        merge([beyond, beyond], arch, {"name": "mudsc"}, calibration=torch.randn(16, 8))
    huge = {k: v * 1e30 for k, v in build_model(arch).state_dict().items()}  # finite float32, forward -> inf
    with pytest.raises(ComputeOverflow, match="not finite|activations"):
        merge([huge, huge], arch, {"name": "mudsc"}, calibration=torch.randn(16, 8) * 1e10)
