"""Digits test bed: every permutation-merge method x both settings x BN reset, over seed pairs.

Settings
  same      two models trained from different seeds on all 10 classes, one shared head
            (``heads='shared'``); per-task columns = 10-way accuracy on the test digits 0-4 / 5-9.
  disjoint  model A on digits 0-4, model B on digits 5-9 (5-way heads each), merged with
            ``heads='separate'`` (10 logits), scored with ``testbed.disjoint_scores``: joint =
            argmax over the 10 logits, task k = argmax inside task k's own 5 logits.

Endpoints: same task - each model's accuracy (mean of the two); disjoint - each model on its
own task, and the joint accuracy of the ensemble of the two originals (concatenated logits),
the upper reference for the merged model.

"gap closed" = (merged - plain average) / (endpoint - plain average) on joint accuracy, the
plain average taken with the same BN-reset setting as the row (the stricter comparison); the
endpoint is the mean endpoint accuracy (same) or the ensemble's joint accuracy (disjoint).

Run: ``python -m bench.mudsc_digits`` (writes docs/mudsc_digits.md); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench import testbed as tb
from mudsc_core import merge

# (label, method name, extra params)
METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("weight_average", "weight_average", {}),
    ("git_rebasin", "git_rebasin", {}),
    ("activation_align", "activation_align", {}),
    ("zipit", "zipit", {}),
    ("weight_zip", "weight_zip", {}),
    ("mudsc align", "mudsc", {"mode": "align", "beta": 0.5}),
    ("mudsc zip", "mudsc", {"mode": "zip", "beta": 0.5}),
)
BETAS = (0.1, 0.3, 0.5, 0.7, 0.9)

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "resnet8x2": {"name": "resnet", "config": {"depth": 8, "width": 2, "num_classes": 10, "in_channels": 1}},
    "vgg": {"name": "vgg", "config": {"in_channels": 1, "layers": [32, 32, "M", 64, 64], "num_classes": 10}},
    "mlp": {"name": "mlp", "config": {"input_dim": 64, "hidden": [64, 64], "num_classes": 10}},
}
SEED_PAIRS = ((0, 1), (2, 3), (4, 5))
EPOCHS = 20
CALIBRATION = 512
DOC = Path(__file__).resolve().parents[1] / "docs" / "mudsc_digits.md"


@dataclass
class Pair:
    """Two trained endpoints of one setting and their reference scores."""

    setting: str  # "same" | "disjoint"
    architecture: dict[str, Any]  # the endpoints' architecture (5 classes for disjoint)
    states: list[dict[str, Tensor]]
    endpoint: dict[str, float]  # joint / task0 / task1 of the reference (see module doc)
    endpoint_models: list[float] = field(default_factory=list)  # each model's accuracy on its own task


def calibration_inputs(data: tb.Digits, n: int = CALIBRATION) -> Tensor:
    return data.x_train[:n]


def same_task_scores(
    architecture: Mapping[str, Any], state: Mapping[str, Tensor], x: Tensor, y: Tensor
) -> dict[str, float]:
    """Joint accuracy plus 10-way accuracy on the digits of each half."""
    pred = tb.logits(architecture, state, x).argmax(1)
    scores = {"joint": float((pred == y).float().mean())}
    for k, labels in enumerate(tb.SPLITS):
        keep = (y >= labels.start) & (y < labels.stop)
        scores[f"task{k}"] = float((pred[keep] == y[keep]).float().mean())
    return scores


def train_pair(
    architecture: Mapping[str, Any], data: tb.Digits, setting: str, seeds: Sequence[int], epochs: int = EPOCHS
) -> Pair:
    if setting == "same":
        arch = dict(architecture)
        states = [tb.train(arch, data.x_train, data.y_train, seed=s, epochs=epochs) for s in seeds]
        per_model = [same_task_scores(arch, s, data.x_test, data.y_test) for s in states]
        endpoint = {key: statistics.fmean(p[key] for p in per_model) for key in per_model[0]}
        return Pair(setting, arch, states, endpoint, [p["joint"] for p in per_model])
    if setting != "disjoint":
        raise ValueError(setting)
    arch = tb.with_classes(architecture, 5)
    states = []
    own = []
    for seed, labels in zip(seeds, tb.SPLITS):
        x, y = tb.task_subset(data.x_train, data.y_train, labels)
        states.append(tb.train(arch, x, y, seed=seed, epochs=epochs))
        xt, yt = tb.task_subset(data.x_test, data.y_test, labels)
        own.append(tb.accuracy(arch, states[-1], xt, yt))
    ensemble = torch.cat([tb.logits(arch, s, data.x_test) for s in states], dim=1)
    endpoint = {"joint": float((ensemble.argmax(1) == data.y_test).float().mean()), "task0": own[0], "task1": own[1]}
    return Pair(setting, arch, states, endpoint, own)


def merge_pair(pair: Pair, method: str, params: Mapping[str, Any], calibration: Tensor):
    heads = "shared" if pair.setting == "same" else "separate"
    return merge(pair.states, pair.architecture, {"name": method, "params": {**params, "heads": heads}}, calibration)


def score(pair: Pair, state: Mapping[str, Tensor], x: Tensor, y: Tensor) -> dict[str, float]:
    if pair.setting == "same":
        return same_task_scores(pair.architecture, state, x, y)
    return tb.disjoint_scores(pair.architecture, state, tb.Digits(x, y, x, y))


def choose_beta(
    pair: Pair, mode: str, reset_bn: bool, data: tb.Digits, calibration: Tensor, betas: Sequence[float] = BETAS
) -> tuple[float, Any]:
    """The paper's protocol: pick beta by joint accuracy on TRAIN data (ties -> smaller beta)."""
    best = None
    for beta in betas:
        result = merge_pair(pair, "mudsc", {"mode": mode, "beta": beta, "reset_bn": reset_bn}, calibration)
        acc = score(pair, result.state_dict, data.x_train, data.y_train)["joint"]
        if best is None or acc > best[0]:
            best = (acc, beta, result)
    assert best is not None
    return best[1], best[2]


def run_methods(
    pair: Pair, data: tb.Digits, calibration: Tensor, *, methods=METHODS, resets=(False, True), beta_sweep: bool = False
) -> dict[tuple[str, bool], dict[str, Any]]:
    """Every method x BN reset on one pair: {(label, reset): {joint, task0, task1, report[, beta]}}."""
    rows: dict[tuple[str, bool], dict[str, Any]] = {}
    for label, method, extra in methods:
        for reset in resets:
            result = merge_pair(pair, method, {**extra, "reset_bn": reset}, calibration)
            rows[(label, reset)] = {**score(pair, result.state_dict, data.x_test, data.y_test), "report": result.report}
    if beta_sweep:
        for mode in ("align", "zip"):
            for reset in resets:
                beta, result = choose_beta(pair, mode, reset, data, calibration)
                rows[(f"mudsc {mode} (beta*)", reset)] = {
                    **score(pair, result.state_dict, data.x_test, data.y_test),
                    "report": result.report,
                    "beta": beta,
                }
    return rows


def gap_closed(merged: float, average: float, endpoint: float) -> float:
    return (merged - average) / max(endpoint - average, 1e-6)


# --------------------------------------------------------------------------- bench
def _fmt(values: Sequence[float], pct: bool = True) -> str:
    scale = 100.0 if pct else 1.0
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}" if pct else f"{mean:.2f} ± {std:.2f}"


def table(results: dict[str, list[tuple[Pair, dict]]], labels: Sequence[str]) -> str:
    """results[setting] = [(pair, rows) per seed pair] -> markdown."""
    head = (
        "| method | BN reset | same: joint | same: 0-4 | same: 5-9 | same: gap closed "
        "| disjoint: joint | disjoint: task 0-4 | disjoint: task 5-9 | disjoint: gap closed |"
    )
    lines = [head, "|" + "---|" * 10]
    settings = ("same", "disjoint")

    def cells(getter) -> list[str]:
        out = []
        for setting in settings:
            runs = results.get(setting, [])
            if not runs:
                out += ["-"] * 4
                continue
            for key in ("joint", "task0", "task1"):
                out.append(_fmt([getter(pair, rows, key) for pair, rows in runs]))
            out.append(getter.__dict__.get("gap", lambda runs: "-")(runs))
        return out

    def endpoint_getter(pair, rows, key):
        return pair.endpoint[key]

    lines.append(
        "| endpoints (same: mean of models; disjoint: own task, joint = ensemble) | - | "
        + " | ".join(cells(endpoint_getter))
        + " |"
    )
    for label in labels:
        for reset in (False, True):
            if not all((label, reset) in rows for runs in results.values() for _, rows in runs):
                continue

            def getter(pair, rows, key, label=label, reset=reset):
                return rows[(label, reset)][key]

            def gap(runs, label=label, reset=reset):
                return _fmt(
                    [
                        gap_closed(
                            rows[(label, reset)]["joint"],
                            rows[("weight_average", reset)]["joint"],
                            pair.endpoint["joint"],
                        )
                        for pair, rows in runs
                    ],
                    pct=False,
                )

            getter.gap = gap  # type: ignore[attr-defined]
            name = label
            if "beta*" in label:
                chosen = [rows[(label, reset)]["beta"] for runs in results.values() for _, rows in runs]
                name += " β∈{" + ",".join(f"{b:g}" for b in chosen) + "}"
            lines.append(f"| {name} | {'yes' if reset else 'no'} | " + " | ".join(cells(getter)) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet8x2", "vgg"], choices=sorted(ARCHITECTURES))
    parser.add_argument("--seed-pairs", type=int, default=len(SEED_PAIRS))
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-beta-sweep", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 seed pair, 3 epochs, VGG only, no doc written")
    parser.add_argument("--out", type=Path, default=DOC)
    args = parser.parse_args(argv)
    if args.quick:
        args.archs, args.seed_pairs, args.epochs, args.no_beta_sweep = ["vgg"], 1, 3, True
    torch.set_num_threads(args.threads)
    seeds = [(2 * i, 2 * i + 1) for i in range(args.seed_pairs)]
    data = tb.load_digits_data()
    calibration = calibration_inputs(data)
    labels = [m[0] for m in METHODS] + ([] if args.no_beta_sweep else ["mudsc align (beta*)", "mudsc zip (beta*)"])
    started = time.perf_counter()
    sections = []
    for arch_key in args.archs:
        architecture = ARCHITECTURES[arch_key]
        results: dict[str, list[tuple[Pair, dict]]] = {"same": [], "disjoint": []}
        for setting in ("same", "disjoint"):
            for pair_seeds in seeds:
                t0 = time.perf_counter()
                pair = train_pair(architecture, data, setting, pair_seeds, args.epochs)
                rows = run_methods(pair, data, calibration, beta_sweep=not args.no_beta_sweep)
                results[setting].append((pair, rows))
                print(
                    f"[{arch_key} {setting} seeds {pair_seeds}] {time.perf_counter() - t0:.0f}s "
                    f"endpoint joint {pair.endpoint['joint']:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
        body = table(results, labels)
        sections.append(f"### {arch_key}: `{architecture}`\n\n{body}\n")
        print(f"### {arch_key}\n\n{body}\n", flush=True)
    elapsed = time.perf_counter() - started
    command = "python -m bench.mudsc_digits" + ("" if argv is None else " " + " ".join(argv))
    doc = "\n".join(
        [
            "# MuDSC digits test bed: full table",
            "",
            f"Generated {_dt.date.today().isoformat()} by `{command}` in {elapsed:.0f} s "
            f"({args.threads} CPU thread(s), torch {torch.__version__}).",
            "",
            "Config: scikit-learn digits (8x8, 1257 train / 540 test, `testbed.load_digits_data()`), "
            f"Adam lr 3e-3 cosine, {args.epochs} epochs, batch 64 (`testbed.train`); seed pairs {seeds} "
            "(model A seed, model B seed); calibration = first "
            f"{CALIBRATION} train images (both halves); zip keeps the width (r = 1/2), a = 0.5, b = 1; "
            "mudsc rows use beta = 0.5"
            + (
                ""
                if args.no_beta_sweep
                else f"; `beta*` rows pick beta in {list(BETAS)} by joint accuracy on TRAIN data "
                "per seed pair (chosen values listed, in order same..., disjoint...)"
            )
            + ".",
            "",
            "Test accuracy in %, mean ± std over seed pairs. same = both models on all 10 classes, shared head "
            "(per-task columns: 10-way accuracy on test digits 0-4 / 5-9). disjoint = A on 0-4, B on 5-9, "
            "merged with `heads='separate'` (10 logits): joint = 10-way argmax, task = argmax inside the task's "
            "own 5 logits. Endpoints: same = mean of the two models; disjoint = each model on its own task, "
            "joint = ensemble of the two originals (concatenated logits). gap closed = (merged - weight_average) / "
            "(endpoint - weight_average) on joint accuracy, weight_average taken with the same BN-reset setting "
            "(mean ± std, a fraction).",
            "",
            *sections,
            f"Reproduce: `{command}` (took {elapsed / 60:.0f} min here on one CPU thread of a shared 2-core machine).",
            "",
        ]
    )
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(doc)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
