"""Per Hugging Face family: the time of a whole MuDSC merge, and that a permuted copy merges back exactly.

For every model class of ``bench/trace_families.py`` (small random configs, width 32, 2 layers): model A,
and B = A with every free group permuted at random (the same function, other weights), merged with
``mudsc`` (zip, beta 0.5, 64 calibration samples passed as forward keywords) and with ``git_rebasin``
(weight space), BatchNorm statistics kept (``reset_bn`` false: re-estimated they would not be A's), through
``mudsc_core.permutation.merge.merge`` with ``{"name": "transformers", ...}``. Prints
the wall time of each merge (tracing included: the cache is cleared first) and the largest difference of
the merged weights from A's.

Run: ``python -m bench.hf_merge_families [--out docs/bench_hf_merge_families.txt]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.trace_families import FAMILIES, Family
from mudsc_core.architectures import _traced, trace_architecture
from mudsc_core.permutation.merge import merge
from mudsc_core.permutation.permute import permute_state_dict, random_permutations

SAMPLES = 64


def _calibration(entry: Family) -> dict[str, torch.Tensor]:
    batch = entry.example_inputs()
    repeats = -(-SAMPLES // next(iter(batch.values())).shape[0])
    return {name: t.repeat(repeats, *([1] * (t.ndim - 1)))[:SAMPLES] for name, t in batch.items()}


def measure(entry: Family) -> tuple[float, float, float, int]:
    model = entry.build()
    model.config.architectures = [entry.cls]
    arch = {"name": "transformers", "config": model.config.to_dict()}
    spec = trace_architecture(arch).spec
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moved = permute_state_dict(spec, state, random_permutations(spec, torch.Generator().manual_seed(3)))
    times, worst = [], 0.0
    # BatchNorm statistics are kept (reset_bn false): re-estimated from calibration they would differ from A's.
    methods = (
        {"name": "mudsc", "params": {"mode": "zip", "reset_bn": False}},
        {"name": "git_rebasin", "params": {"reset_bn": False}},
    )
    for method in methods:
        _traced.cache_clear()
        start = time.perf_counter()
        result = merge([state, moved], arch, method, _calibration(entry))
        times.append(time.perf_counter() - start)
        for name, tensor in state.items():
            if tensor.is_floating_point():
                worst = max(worst, float((result.state_dict[name] - tensor).abs().max()))
    return times[0], times[1], worst, len(spec.groups)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = [
        f"torch {torch.__version__}, one CPU thread, width 32, 2 layers, {SAMPLES} calibration samples",
        "",
        "| class | free groups | mudsc zip merge s | git_rebasin merge s | max abs difference from A |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for entry in FAMILIES:
        zip_s, weight_s, worst, groups = measure(entry)
        lines.append(f"| `{entry.cls}` | {groups} | {zip_s:.2f} | {weight_s:.2f} | {worst:.1e} |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
