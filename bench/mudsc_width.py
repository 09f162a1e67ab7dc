"""Time and peak memory of a traced MuDSC merge (zip, with calibration) against model width.

Two random-init Llama-shaped ``LlamaForCausalLM`` models (2 layers, vocab 64, head dim 64, grouped-query
attention with half as many kv heads, intermediate 2.7x hidden) are merged through
``mudsc_core.permutation.merge.merge`` with ``{"name": "mudsc", "params": {"mode": "zip"}}`` and token
calibration, one width per fresh subprocess (so each peak RSS is its own). Prints a table and the
growth exponents of time and memory against width (least-squares slope in log-log), and the merge's
own estimate of its peak next to the measured one.

    python -m bench.mudsc_width [--widths 256 512 1024 2048] [--max-sweeps N] [--out docs/bench_mudsc_width.txt]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VOCAB, SAMPLES, TOKENS = 64, 32, 32


def _config(hidden: int) -> Any:
    import transformers

    heads = max(2, hidden // 64)
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=round(2.7 * hidden),
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=TOKENS,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )


def run_one(hidden: int, max_sweeps: int | None) -> dict[str, Any]:
    """One merge at ``hidden`` (in this process): seconds, peak RSS, the estimate."""
    import torch
    import transformers

    from mudsc_core.permutation.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss, state_bytes
    from mudsc_core.permutation.merge import merge

    config = _config(hidden)
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append(transformers.LlamaForCausalLM(config).state_dict())
    generator = torch.Generator().manual_seed(0)
    calibration = {
        "input_ids": torch.randint(0, VOCAB, (SAMPLES, TOKENS), generator=generator),
        "attention_mask": torch.ones(SAMPLES, TOKENS, dtype=torch.long),
    }
    params: dict[str, Any] = {"mode": "zip"}
    if max_sweeps is not None:
        params["max_sweeps"] = max_sweeps
    architecture = {"name": "transformers", "config": config.to_dict()}
    from mudsc_core.architectures import trace_architecture

    trace_architecture(architecture)  # the derivation is cached: timed separately from the merge
    inputs = sum(state_bytes(state) for state in states)
    reset_peak_rss()
    before = current_rss_bytes()
    started = time.perf_counter()
    result = merge(states, architecture, {"name": "mudsc", "params": params}, calibration)
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    report = result.report
    return {
        "hidden": hidden,
        "intermediate": config.intermediate_size,
        "seconds": seconds,
        "matching_s": report["timings_s"].get("matching", 0.0),
        "sweeps": report["sweeps"],
        "input_bytes": inputs,
        # The merge's own memory with its inputs: what the estimate counts.
        "measured_bytes": peak - before + inputs,
        "peak_rss_bytes": peak,
        "estimated_bytes": report["memory"]["estimated_peak_bytes"],
        "estimated_stage": report["memory"]["estimated_peak_stage"],
    }


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / den if den else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--max-sweeps", type=int, default=None, help="cap on coordinate-ascent sweeps")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the child's width
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.max_sweeps)))
        return 0

    rows = []
    for hidden in args.widths:
        command = [sys.executable, "-m", "bench.mudsc_width", "--one", str(hidden)]
        if args.max_sweeps is not None:
            command += ["--max-sweeps", str(args.max_sweeps)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-3000:])
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  hidden {hidden}: {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)

    mib = 2**20
    sweeps = "method default" if args.max_sweeps is None else f"at most {args.max_sweeps}"
    lines = [
        f"MuDSC zip of two 2-layer Llama-shaped models, calibration {SAMPLES} x {TOKENS} tokens, sweeps: {sweeps}",
        f"{'hidden':>6} {'interm':>6} {'time s':>8} {'match s':>8} {'sweeps':>6} {'s/sweep':>8} "
        f"{'inputs MiB':>10} {'measured MiB':>12} {'estimate MiB':>12} {'est/meas':>8} {'peak stage':>22}",
    ]
    for row in rows:
        lines.append(
            f"{row['hidden']:>6} {row['intermediate']:>6} {row['seconds']:>8.1f} {row['matching_s']:>8.1f} "
            f"{row['sweeps']:>6} {row['matching_s'] / max(row['sweeps'], 1):>8.2f} {row['input_bytes'] / mib:>10.0f} "
            f"{row['measured_bytes'] / mib:>12.0f} {row['estimated_bytes'] / mib:>12.0f} "
            f"{row['estimated_bytes'] / row['measured_bytes']:>8.2f} {row['estimated_stage']:>22}"
        )
    if len(rows) >= 2:
        widths = [float(r["hidden"]) for r in rows]
        lines.append(
            "growth exponent (log-log slope vs hidden): "
            f"time {slope(widths, [r['seconds'] for r in rows]):.2f}, "
            f"time per sweep {slope(widths, [r['matching_s'] / max(r['sweeps'], 1) for r in rows]):.2f}, "
            f"memory {slope(widths, [r['measured_bytes'] for r in rows]):.2f}, "
            f"memory above inputs {slope(widths, [max(r['measured_bytes'] - r['input_bytes'], 1) for r in rows]):.2f}"
        )
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
