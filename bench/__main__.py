"""Run the benchmarks (``python -m bench [name ...]``, ``make bench``).

Each prints ratios against a baseline measured in the same run and writes its last output
under docs/. Names: zip_speed (fast zip vs the straightforward definition), same_base_memory
(streaming vs load-everything peak RSS and wall time, ~3 GB of generated checkpoints),
task_vectors (per-task accuracy of every same-base method), mudsc_digits (every permutation
method x setting x BN reset on digits; ~20 min on one core), load (1,000 jobs against a live
local stack), trace_families (trace and self-check time of the derived spec per Hugging Face family),
same_base_vs_mergekit (task arithmetic and TIES against mergekit in a throwaway venv, whole processes),
api_load (wrk reads/s of one API process, submission -> running, a fresh worker's first job vs its second),
gpu_check (MuDSC and TIES on CUDA against the CPU; says "no CUDA device" and exits 0 without one),
mudsc_quality (beta "auto" against beta* and the best single-space method, REPAIR rows; digits MLP/VGG/ResNet-8
and the transformer pairs, docs/mudsc_quality.md), mudsc_vs_reference (MuDSC align and zip end to end against the
MuDSC paper's own code and a compute bound, two ResNet-20x4, one thread; needs its local git mirror, else ours only).
"""

from __future__ import annotations

import subprocess
import sys

BENCHES: dict[str, list[str]] = {
    "zip_speed": ["-m", "bench.zip_speed", "--out", "docs/bench_zip_speed.txt"],
    "same_base_memory": ["bench/same_base_memory.py"],
    "task_vectors": ["-m", "bench.task_vectors"],
    "mudsc_digits": ["-m", "bench.mudsc_digits"],
    "load": ["-m", "bench.load"],
    "trace_families": ["-m", "bench.trace_families", "--out", "docs/bench_trace_families.txt"],
    "mudsc_width": ["-m", "bench.mudsc_width", "--max-sweeps", "1", "--out", "docs/bench_mudsc_width.txt"],
    "transformer_testbed": ["-m", "bench.transformer_testbed"],
    "hf_merge_families": ["-m", "bench.hf_merge_families", "--out", "docs/bench_hf_merge_families.txt"],
    "same_base_vs_mergekit": ["bench/same_base_vs_mergekit.py", "--out", "docs/bench_same_base_vs_mergekit.txt"],
    "api_load": ["-m", "bench.api_load", "--out", "docs/bench_api_load.txt"],
    "gpu_check": ["-m", "bench.gpu_check", "--out", "docs/bench_gpu_check.txt"],
    "mudsc_quality": ["-m", "bench.mudsc_quality"],
    "webhook_latency": ["-m", "bench.webhook_latency", "--out", "docs/bench_webhook_latency.txt"],
    "mudsc_vs_reference": ["-m", "bench.mudsc_vs_reference", "--out", "docs/bench_mudsc_vs_reference.txt"],
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        sys.stderr.write(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHES)}\n")
        return 2
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        if subprocess.call([sys.executable, *BENCHES[name]]) != 0:
            failed.append(name)
    if failed:
        sys.stderr.write(f"failed: {', '.join(failed)}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
