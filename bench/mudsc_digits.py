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

Architectures: the CIFAR-style ResNet-8 (width 2), a small VGG, an MLP, and torchvision's ResNet-18
at base width 32 (``torchvision_resnet``, half the standard 64; on 8x8 inputs its stem leaves 2x2 maps
and layers 2-4 run at 1x1), all trained with the same protocol. (At width 8 the merges collapse: 33-37 %
joint for zip methods against 94 % endpoints on one seed pair, where width 32 reaches 89-91 % against 98 %.) Their permutation specs are derived by tracing.

``--compare-oracle``: for every architecture whose module keeps a hand-written spec
(``mudsc_core.architectures.oracle_spec``: mlp, vgg, resnet), the fixed-beta methods are merged
again on the same trained pairs with ``spec=oracle_spec(arch)``; the section "traced vs hand-written
spec" gives, per architecture and setting, the max absolute difference over methods x BN reset x
seed pairs of the joint test accuracy and of every merged state-dict entry.

Run: ``python -m bench.mudsc_digits --compare-oracle`` (writes docs/mudsc_digits.md); ``--quick``
for a smoke run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench import testbed as tb
from mudsc_core import MergeResult, merge
from mudsc_core.architectures import infer_architecture, oracle_spec, trace_architecture
from mudsc_core.permutation.spec import PermSpec
from mudsc_core.schema import ArchitectureSpec

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
    "tv_resnet18x32": {
        "name": "torchvision_resnet",
        "config": {"depth": 18, "width": 32, "num_classes": 10, "in_channels": 1},
    },
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


Rows = dict[tuple[str, bool], dict[str, Any]]  # (method label, BN reset) -> scores, report, ...
Runs = list[tuple[Pair, Rows]]  # one (pair, rows) per seed pair


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


def merge_pair(
    pair: Pair, method: str, params: Mapping[str, Any], calibration: Tensor, spec: PermSpec | None = None
) -> MergeResult:
    """Merge the pair's endpoints (heads shared / separate by setting); ``spec=None``: the traced spec."""
    heads = "shared" if pair.setting == "same" else "separate"
    method_spec = {"name": method, "params": {**params, "heads": heads}}
    return merge(pair.states, pair.architecture, method_spec, calibration, spec=spec)


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
    pair: Pair,
    data: tb.Digits,
    calibration: Tensor,
    *,
    methods: Sequence[tuple[str, str, dict[str, Any]]] = METHODS,
    resets: Sequence[bool] = (False, True),
    beta_sweep: bool = False,
    spec: PermSpec | None = None,
    keep_states: bool = False,
) -> Rows:
    """Every method x BN reset on one pair: {(label, reset): {joint, task0, task1, report[, beta][, state]}}.

    ``spec`` goes to every merge (None: the traced spec); ``keep_states`` keeps the merged state dict
    of each fixed-beta row under "state" (for :func:`compare_specs`).
    """
    rows: Rows = {}
    for label, method, extra in methods:
        for reset in resets:
            result = merge_pair(pair, method, {**extra, "reset_bn": reset}, calibration, spec)
            rows[(label, reset)] = {**score(pair, result.state_dict, data.x_test, data.y_test), "report": result.report}
            if keep_states:
                rows[(label, reset)]["state"] = result.state_dict
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


# --------------------------------------------------------------------------- traced vs hand-written spec
@dataclass
class SpecDiff:
    """Traced vs hand-written spec on the same merges: max |difference| over every compared merge."""

    merges: int = 0  # merges compared (methods x BN reset [x seed pairs])
    joint: float = 0.0  # max |joint test accuracy difference| (a fraction)
    weights: float = 0.0  # max |difference| over every entry of every merged state dict
    groups: tuple[int, int] = (0, 0)  # free unit groups: traced spec, hand-written spec

    def update(self, other: SpecDiff) -> None:
        self.merges += other.merges
        self.joint = max(self.joint, other.joint)
        self.weights = max(self.weights, other.weights)
        self.groups = other.groups


def hand_written_spec(architecture: ArchitectureSpec | Mapping[str, Any]) -> PermSpec | None:
    """The module's hand-written (oracle) spec for the architecture, or None where it keeps none."""
    try:
        return oracle_spec(architecture)
    except AttributeError:
        return None


def max_state_difference(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """Max |a - b| over every entry of two state dicts (inf if their entries or shapes differ)."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return float("inf")
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def compare_specs(
    pair: Pair, traced_rows: Mapping[tuple[str, bool], Mapping[str, Any]], data: tb.Digits, calibration: Tensor
) -> SpecDiff | None:
    """Merge the pair again with the hand-written spec and compare with ``traced_rows`` (run with keep_states).

    None where the architecture has no hand-written spec.
    """
    architecture = infer_architecture(pair.architecture, pair.states[0])  # as merge() sees it
    oracle = hand_written_spec(architecture)
    if oracle is None:
        return None
    oracle_rows = run_methods(pair, data, calibration, spec=oracle, keep_states=True)
    traced = trace_architecture(architecture)
    diff = SpecDiff(groups=(len(traced.free_groups), len(oracle.groups)))
    for key, row in oracle_rows.items():
        if row["report"]["spec"]["source"] != "given":
            raise RuntimeError(f"{key}: merge did not use the hand-written spec")
        diff.merges += 1
        diff.joint = max(diff.joint, abs(row["joint"] - traced_rows[key]["joint"]))
        diff.weights = max(diff.weights, max_state_difference(row["state"], traced_rows[key]["state"]))
    return diff


def oracle_table(diffs: Mapping[tuple[str, str], SpecDiff]) -> str:
    """diffs[(arch_key, setting)] -> markdown."""
    lines = [
        "| architecture | setting | merges compared | free groups (traced / hand-written) "
        "| max abs Δ joint accuracy (pp) | max abs Δ merged weights |",
        "|" + "---|" * 6,
    ]
    for (arch_key, setting), d in diffs.items():
        lines.append(
            f"| {arch_key} | {setting} | {d.merges} | {d.groups[0]} / {d.groups[1]} "
            f"| {100 * d.joint:.4g} | {d.weights:.3g} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- bench
def _fmt(values: Sequence[float], pct: bool = True) -> str:
    scale = 100.0 if pct else 1.0
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}" if pct else f"{mean:.2f} ± {std:.2f}"


def table(results: Mapping[str, Runs], labels: Sequence[str]) -> str:
    """results[setting] = [(pair, rows) per seed pair] -> markdown."""
    head = (
        "| method | BN reset | same: joint | same: 0-4 | same: 5-9 | same: gap closed "
        "| disjoint: joint | disjoint: task 0-4 | disjoint: task 5-9 | disjoint: gap closed |"
    )
    lines = [head, "|" + "---|" * 10]
    settings = ("same", "disjoint")

    def cells(value: Callable[[Pair, Rows, str], float], gap: Callable[[Runs], str] | None = None) -> list[str]:
        out = []
        for setting in settings:
            runs = results.get(setting, [])
            if not runs:
                out += ["-"] * 4
                continue
            for key in ("joint", "task0", "task1"):
                out.append(_fmt([value(pair, rows, key) for pair, rows in runs]))
            out.append("-" if gap is None else gap(runs))
        return out

    def endpoint_value(pair: Pair, rows: Rows, key: str) -> float:
        return pair.endpoint[key]

    lines.append(
        "| endpoints (same: mean of models; disjoint: own task, joint = ensemble) | - | "
        + " | ".join(cells(endpoint_value))
        + " |"
    )
    for label in labels:
        for reset in (False, True):
            if not all((label, reset) in rows for runs in results.values() for _, rows in runs):
                continue

            def row_value(pair: Pair, rows: Rows, key: str, label: str = label, reset: bool = reset) -> float:
                return float(rows[(label, reset)][key])

            def gap(runs: Runs, label: str = label, reset: bool = reset) -> str:
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

            name = label
            if "beta*" in label:
                chosen = [rows[(label, reset)]["beta"] for runs in results.values() for _, rows in runs]
                name += " β∈{" + ",".join(f"{b:g}" for b in chosen) + "}"
            lines.append(f"| {name} | {'yes' if reset else 'no'} | " + " | ".join(cells(row_value, gap)) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=sorted(ARCHITECTURES))
    parser.add_argument("--seed-pairs", type=int, default=len(SEED_PAIRS))
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-beta-sweep", action="store_true")
    parser.add_argument(
        "--compare-oracle",
        action="store_true",
        help="also merge with each architecture's hand-written spec and report the differences",
    )
    parser.add_argument("--quick", action="store_true", help="1 seed pair, 3 epochs, VGG only, no doc written")
    parser.add_argument("--out", type=Path, default=DOC)
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(arguments)
    if args.quick:
        args.archs, args.seed_pairs, args.epochs, args.no_beta_sweep = ["vgg"], 1, 3, True
    torch.set_num_threads(args.threads)
    seeds = [(2 * i, 2 * i + 1) for i in range(args.seed_pairs)]
    data = tb.load_digits_data()
    calibration = calibration_inputs(data)
    labels = [m[0] for m in METHODS] + ([] if args.no_beta_sweep else ["mudsc align (beta*)", "mudsc zip (beta*)"])
    started = time.perf_counter()
    sections = []
    spec_diffs: dict[tuple[str, str], SpecDiff] = {}
    for arch_key in args.archs:
        architecture = ARCHITECTURES[arch_key]
        results: dict[str, Runs] = {"same": [], "disjoint": []}
        for setting in ("same", "disjoint"):
            for pair_seeds in seeds:
                t0 = time.perf_counter()
                pair = train_pair(architecture, data, setting, pair_seeds, args.epochs)
                rows = run_methods(
                    pair, data, calibration, beta_sweep=not args.no_beta_sweep, keep_states=args.compare_oracle
                )
                note = ""
                if args.compare_oracle and (diff := compare_specs(pair, rows, data, calibration)) is not None:
                    spec_diffs.setdefault((arch_key, setting), SpecDiff()).update(diff)
                    note = f", vs hand-written spec: max |d joint| {diff.joint:.3g}, max |d weight| {diff.weights:.3g}"
                for row in rows.values():
                    row.pop("state", None)
                results[setting].append((pair, rows))
                print(
                    f"[{arch_key} {setting} seeds {pair_seeds}] {time.perf_counter() - t0:.0f}s "
                    f"endpoint joint {pair.endpoint['joint']:.3f}{note}",
                    file=sys.stderr,
                    flush=True,
                )
        body = table(results, labels)
        sections.append(f"### {arch_key}: `{architecture}`\n\n{body}\n")
        print(f"### {arch_key}\n\n{body}\n", flush=True)
    if args.compare_oracle:
        body = oracle_table(spec_diffs) if spec_diffs else "(no architecture in this run has a hand-written spec)"
        sections.append(
            "### traced vs hand-written spec\n\n"
            "The fixed-beta methods above (every method x BN reset x seed pair, beta* rows excluded) merged "
            "again on the same trained pairs with `merge(..., spec=oracle_spec(arch))`, the hand-written spec "
            "the architecture's module keeps as the tracer's test oracle, and compared with the merges that "
            "used the traced spec: max absolute difference of the joint test accuracy (percentage points) and "
            "of every entry of the merged state dicts. Free groups: the traced spec's free unit groups / the "
            "hand-written spec's groups.\n\n"
            f"{body}\n"
        )
        print(f"### traced vs hand-written spec\n\n{body}\n", flush=True)
    elapsed = time.perf_counter() - started
    command = " ".join(["python -m bench.mudsc_digits", *arguments])
    threads = f"{args.threads} CPU thread(s)"
    doc = "\n".join(
        [
            "# MuDSC digits test bed: full table",
            "",
            f"Generated {_dt.date.today().isoformat()} by `{command}` in {elapsed:.0f} s "
            f"({threads}, torch {torch.__version__}).",
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
            + ". Every architecture is trained with this same protocol; the permutation specs are derived "
            "by tracing (`mudsc_core.architectures.perm_spec`). tv_resnet18x32 is torchvision's ResNet-18 "
            "(`torchvision_resnet`, BasicBlocks 2-2-2-2, 7x7/2 stem + 3x3/2 max-pool) at base width 32 "
            "(stage widths 32/64/128/256, 2.8M parameters); on 8x8 digits the stem leaves 2x2 maps and "
            "layers 2-4 run at 1x1.",
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
            f"Reproduce: `{command}` (took {elapsed / 60:.0f} min here on {threads} of a shared "
            f"{os.cpu_count()}-core machine).",
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
