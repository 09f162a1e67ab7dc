"""Transformer test bed: BERT, GPT-2 and ViT pairs trained from seeds on the digits, merged by every method.

The models, data and protocol are tests/transformer_testbed.py's (2 layers, width 64, 4 heads, MLP 128;
BERT and GPT-2 read the digit as 17 tokens, ViT reads the 8x8 image in 2x2 patches). For every seed pair
and family: train model A and model B, merge them with each permutation method on calibration inputs from
the training set, and score everything on the held-out split. Printed as markdown: test accuracy (mean ±
std over seed pairs) of model A, model B and each merge; the fraction of the gap closed,
(merged - weight_average) / (mean of A and B - weight_average); and time per model / per merge.

Run: ``python -m bench.transformer_testbed`` (3 seed pairs; docs/mudsc_transformers.md has its output);
``--pairs 0,1 --families vit`` for one cell; ``--jobs 2`` runs (family, seed pair) cells in 2 processes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from collections.abc import Mapping, Sequence

import torch

from tests import transformer_testbed as tt

SEED_PAIRS = ((0, 1), (2, 3), (4, 5))


def _fmt(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _cell(runs: Sequence[tt.PairRun], label: str, value: str) -> str:
    """A method's cell: mean ± std over the runs it succeeded on; "fails" where every merge was refused."""
    done = [run for run in runs if label in run.merged]
    if not done:
        return "fails"
    values = [run.merged[label] if value == "accuracy" else run.gap_closed(label) for run in done]
    text = _fmt(values) if value == "accuracy" else _fmt(values, 1.0, 2)
    return text if len(done) == len(runs) else f"{text} ({len(done)}/{len(runs)} ran)"


def tables(results: Mapping[str, Sequence[tt.PairRun]]) -> str:
    labels = [label for label, _, _ in tt.METHODS]
    head = "| family | model A | model B | " + " | ".join(labels) + " |"
    rule = "|" + "---|" * (3 + len(labels))
    accuracy = [head, rule]
    gaps = ["| family | " + " | ".join(labels) + " |", "|" + "---|" * (1 + len(labels))]
    times = [
        "| family | train s / model | " + " | ".join(f"{label} s" for label in labels) + " |",
        "|" + "---|" * (2 + len(labels)),
    ]
    failures: dict[str, str] = {}
    for family, runs in results.items():
        models = [_fmt([run.models[i] for run in runs]) for i in (0, 1)]
        accuracy.append(
            f"| {family} | {models[0]} | {models[1]} | "
            + " | ".join(_cell(runs, label, "accuracy") for label in labels)
            + " |"
        )
        gaps.append(f"| {family} | " + " | ".join(_cell(runs, label, "gap") for label in labels) + " |")
        merge_s = [
            f"{statistics.fmean(r.merge_s[label] for r in runs if label in r.merge_s):.1f}"
            if any(label in r.merge_s for r in runs)
            else "-"
            for label in labels
        ]
        times.append(
            f"| {family} | {statistics.fmean(r.train_s / 2 for r in runs):.1f} | " + " | ".join(merge_s) + " |"
        )
        for run in runs:
            for label, error in run.failed.items():
                failures.setdefault(f"{family} {label}", error)
    out = [
        "Test accuracy (%), mean ± std over seed pairs:",
        "",
        *accuracy,
        "",
        "Gap closed, (merged - weight_average) / (mean of A and B - weight_average), mean ± std:",
        "",
        *gaps,
        "",
        "Seconds (mean over seed pairs; merges include the calibration pass, tracing is cached after the first):",
        "",
        *times,
    ]
    if failures:
        out += ["", "Merges the library refused:", ""]
        out += [f"- {key}: `{error}`" for key, error in failures.items()]
    return "\n".join(out)


def _run(task: tuple[str, tuple[int, int], int, int, int]) -> tt.PairRun:
    family, seeds, epochs, threads, mlp_width = task
    torch.set_num_threads(threads)
    tt.MLP_WIDTH = mlp_width  # read by tt.config() at call time; the default is the test bed's
    run = tt.run_pair(family, tt.load_digits(), seeds, epochs=epochs)
    merged = ", ".join(f"{label} {100 * acc:.1f}" for label, acc in run.merged.items())
    print(
        f"# {family} seeds {seeds}: A {100 * run.models[0]:.1f}, B {100 * run.models[1]:.1f}; {merged}",
        file=sys.stderr,
        flush=True,
    )
    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=[f"{a},{b}" for a, b in SEED_PAIRS], help="seed pairs a,b")
    parser.add_argument("--families", nargs="+", default=list(tt.FAMILIES), choices=tt.FAMILIES)
    parser.add_argument("--epochs", type=int, default=tt.EPOCHS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (the models are tiny)")
    parser.add_argument("--mlp-width", type=int, default=tt.MLP_WIDTH, help="MLP width (a sensitivity check)")
    parser.add_argument("--jobs", type=int, default=1, help="processes, one (family, seed pair) each at a time")
    args = parser.parse_args(argv)
    pairs = [tuple(int(s) for s in pair.split(",")) for pair in args.pairs]
    tasks = [(family, (a, b), args.epochs, args.threads, args.mlp_width) for family in args.families for a, b in pairs]
    started = time.perf_counter()
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            runs = pool.map(_run, tasks, chunksize=1)
    else:
        runs = [_run(task) for task in tasks]
    results: dict[str, list[tt.PairRun]] = {}
    for run in runs:
        results.setdefault(run.family, []).append(run)
    print(
        f"Seed pairs {[tuple(p) for p in pairs]}, MLP width {args.mlp_width}, {args.epochs} epochs, calibration = first {tt.CALIBRATION} "
        f"training samples, {args.jobs} process(es) x {args.threads} torch thread(s), torch {torch.__version__}; "
        f"{time.perf_counter() - started:.0f} s in all.\n"
    )
    print(tables(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
