"""Merge quality without labels on the digits test bed: ``beta: "auto"`` and REPAIR (issue 15 items 1-2).

Part 1, beta "auto". The bed of ``bench/mudsc_digits.py`` (its training protocol, calibration inputs,
settings same / disjoint, heads, scoring and label-chosen ``beta*``), BN reset on, per architecture x
setting x seed pair and per MuDSC mode:

- best single space: align = the better of git_rebasin (weight space) and activation_align; zip = the
  better of weight_zip and zipit; "better" = higher mean joint test accuracy over the seed pairs, chosen
  per architecture x setting (so the comparison is against the stronger baseline, picked with hindsight);
- mudsc at beta 0.5 (the default);
- mudsc beta* : beta in ``mudsc_digits.BETAS`` chosen by joint accuracy on labelled TRAIN data;
- mudsc beta "auto": chosen without labels (``auto_beta.py``: the last quarter of the same calibration
  inputs held out, grid 0 .. 1 scored by agreement with the input models).

The time ratio is the wall time of the auto merge over the wall time of one beta-0.5 merge of the same
pair in the same process (both with BN reset).

Part 2, REPAIR, where BN reset does not apply: the digits MLP (no normalisation) and a LayerNorm ViT
(the built-in ``vit`` architecture, timm names) on the same bed, and the Hugging Face BERT / ViT pairs of
``tests/transformer_testbed.py``; weight_average, git_rebasin, zipit, mudsc zip (beta 0.5), each with and
without ``repair``.

Run: ``python -m bench.mudsc_quality`` (writes docs/mudsc_quality.md); ``--quick`` for a smoke run.
Parts can run in separate processes and be joined: ``--part auto --raw a.json``,
``--part repair --raw b.json``, then ``--join a.json b.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bench import mudsc_digits as md
from bench import testbed as tb
from mudsc_core.architectures import build_model, trace_architecture
from mudsc_core.permutation import partial
from mudsc_core.schema import ArchitectureSpec

SINGLE_SPACE = {"align": ("git_rebasin", "activation_align"), "zip": ("weight_zip", "zipit")}
MODES = ("align", "zip")
QUALITY_ARCHS = ("mlp", "vgg", "resnet8x2")
VIT: dict[str, Any] = {
    "name": "vit",
    "config": {
        "image_size": 8,
        "patch_size": 2,
        "in_channels": 1,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 4,
        "num_classes": 10,
    },
}
REPAIR_ARCHS: dict[str, dict[str, Any]] = {"mlp": md.ARCHITECTURES["mlp"], "vit": VIT}
REPAIR_METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("weight_average", "weight_average", {}),
    ("git_rebasin", "git_rebasin", {}),
    ("zipit", "zipit", {}),
    ("mudsc zip", "mudsc", {"mode": "zip", "beta": 0.5}),
)
HF_FAMILIES = ("bert", "vit")
DOC = Path(__file__).resolve().parents[1] / "docs" / "mudsc_quality.md"


# --------------------------------------------------------------------------- part 1: beta "auto"
def quality_cell(pair: md.Pair, data: tb.Digits, calibration: torch.Tensor) -> dict[str, Any]:
    """One seed pair: joint test accuracy of every row, the chosen betas and the wall times (BN reset on)."""
    joint: dict[str, float] = {}
    betas: dict[str, float] = {}
    seconds: dict[str, float] = {}

    def run(label: str, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        result = md.merge_pair(pair, method, {**params, "reset_bn": True}, calibration)
        seconds[label] = time.perf_counter() - started
        joint[label] = md.score(pair, result.state_dict, data.x_test, data.y_test)["joint"]
        report: dict[str, Any] = result.report
        return report

    for names in SINGLE_SPACE.values():
        for name in names:
            run(name, name, {})
    for mode in MODES:
        run(f"mudsc {mode} 0.5", "mudsc", {"mode": mode, "beta": 0.5})
        report = run(f"mudsc {mode} auto", "mudsc", {"mode": mode, "beta": "auto"})
        betas[f"mudsc {mode} auto"] = float(report["beta_search"]["chosen"])
        beta, result = md.choose_beta(pair, mode, True, data, calibration)
        joint[f"mudsc {mode} beta*"] = md.score(pair, result.state_dict, data.x_test, data.y_test)["joint"]
        betas[f"mudsc {mode} beta*"] = beta
    return {"joint": joint, "betas": betas, "seconds": seconds, "endpoint": pair.endpoint["joint"]}


def run_quality(
    archs: Sequence[str],
    seeds: Sequence[tuple[int, int]],
    epochs: int,
    data: tb.Digits,
    results: dict[str, dict[str, list[dict[str, Any]]]] | None = None,
    save: Callable[[], None] = lambda: None,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """results[arch][setting] = [quality_cell per seed pair], filled in place; ``save()`` after each cell."""
    calibration = md.calibration_inputs(data)
    results = {} if results is None else results
    for arch_key in archs:
        for setting in ("same", "disjoint"):
            for pair_seeds in seeds:
                started = time.perf_counter()
                pair = md.train_pair(md.ARCHITECTURES[arch_key], data, setting, pair_seeds, epochs)
                cell = quality_cell(pair, data, calibration)
                results.setdefault(arch_key, {}).setdefault(setting, []).append(cell)
                save()
                _progress(
                    f"quality {arch_key} {setting} {pair_seeds}",
                    started,
                    _scores(cell["joint"]) + f" betas {cell['betas']}",
                )
    return results


def _scores(row: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in row.items())


def _progress(cell: str, started: float, text: str) -> None:
    """One finished cell on stderr: what it was, its seconds, its numbers."""
    print(f"[{cell}] {time.perf_counter() - started:.0f}s {text}", file=sys.stderr, flush=True)


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def _fmt(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * _mean(values):.1f} ± {100 * std:.1f}"


def time_ratio(cell: Mapping[str, Any], mode: str) -> float:
    """Wall time of the auto merge over one beta-0.5 merge of the same pair."""
    seconds = cell["seconds"]
    return float(seconds[f"mudsc {mode} auto"] / seconds[f"mudsc {mode} 0.5"])


def best_single(cells: Sequence[Mapping[str, Any]], mode: str) -> str:
    """The single-space method of ``mode`` with the higher mean joint accuracy over the seed pairs."""
    return max(SINGLE_SPACE[mode], key=lambda name: _mean([c["joint"][name] for c in cells]))


def quality_summary(results: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]]) -> dict[str, float]:
    """Per (arch, setting, mode) mean differences, averaged: auto - beta*, auto - best single, time ratio."""
    to_star, to_single, to_half, ratios = [], [], [], []
    for settings in results.values():
        for cells in settings.values():
            for mode in MODES:
                auto = _mean([c["joint"][f"mudsc {mode} auto"] for c in cells])
                to_star.append(auto - _mean([c["joint"][f"mudsc {mode} beta*"] for c in cells]))
                single = best_single(cells, mode)
                to_single.append(auto - _mean([c["joint"][single] for c in cells]))
                to_half.append(auto - _mean([c["joint"][f"mudsc {mode} 0.5"] for c in cells]))
                ratios += [time_ratio(c, mode) for c in cells if c.get("seconds")]
    return {
        "auto_minus_star": 100 * _mean(to_star),
        "auto_minus_star_abs": 100 * _mean([abs(d) for d in to_star]),
        "auto_minus_star_worst": 100 * min(to_star),
        "auto_minus_single": 100 * _mean(to_single),
        "auto_minus_single_worst": 100 * min(to_single),
        "auto_minus_half": 100 * _mean(to_half),
        "time_ratio": _mean(ratios) if ratios else float("nan"),
        "time_ratio_max": max(ratios, default=float("nan")),
        "timed_cells": len(ratios),
        "cases": len(to_star),
    }


def quality_table(results: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]]) -> str:
    lines = [
        "| architecture | setting | mode | best single space | mudsc β=0.5 | mudsc β* (labels) | β* chosen "
        "| mudsc β auto | β auto chosen | auto − β* | auto − best single | auto time / β=0.5 time |",
        "|" + "---|" * 12,
    ]
    for arch_key, settings in results.items():
        for setting, cells in settings.items():
            for mode in MODES:

                def col(label: str, cells: Sequence[Mapping[str, Any]] = cells) -> list[float]:
                    return [c["joint"][label] for c in cells]

                single = best_single(cells, mode)
                auto, star = col(f"mudsc {mode} auto"), col(f"mudsc {mode} beta*")
                chosen = {
                    kind: ",".join(f"{c['betas'][f'mudsc {mode} {kind}']:g}" for c in cells)
                    for kind in ("beta*", "auto")
                }
                timed = [time_ratio(c, mode) for c in cells if c.get("seconds")]
                ratio = f"{_mean(timed):.1f}x" if timed else "-"
                lines.append(
                    f"| {arch_key} | {setting} | {mode} | {single} {_fmt(col(single))} "
                    f"| {_fmt(col(f'mudsc {mode} 0.5'))} | {_fmt(star)} | {{{chosen['beta*']}}} "
                    f"| {_fmt(auto)} | {{{chosen['auto']}}} | {100 * (_mean(auto) - _mean(star)):+.1f} "
                    f"| {100 * (_mean(auto) - _mean(col(single))):+.1f} | {ratio} |"
                )
    return "\n".join(lines)


# --------------------------------------------------------------------------- part 2: REPAIR
def run_repair_digits(
    archs: Sequence[str],
    settings: Sequence[str],
    seeds: Sequence[tuple[int, int]],
    epochs: int,
    data: tb.Digits,
    results: dict[str, dict[str, list[dict[str, float]]]] | None = None,
    save: Callable[[], None] = lambda: None,
) -> dict[str, dict[str, list[dict[str, float]]]]:
    """results["digits " + arch][setting] = [{label: joint test accuracy} per seed pair], filled in place."""
    calibration = md.calibration_inputs(data)
    results = {} if results is None else results
    for arch_key in archs:
        for setting in settings:
            for pair_seeds in seeds:
                started = time.perf_counter()
                pair = md.train_pair(REPAIR_ARCHS[arch_key], data, setting, pair_seeds, epochs)
                row: dict[str, float] = {"endpoint": pair.endpoint["joint"]}
                for label, method, params in REPAIR_METHODS:
                    for repair in (False, True):
                        result = md.merge_pair(pair, method, {**params, "repair": repair}, calibration)
                        key = label + (" + repair" if repair else "")
                        row[key] = md.score(pair, result.state_dict, data.x_test, data.y_test)["joint"]
                results.setdefault(f"digits {arch_key}", {}).setdefault(setting, []).append(row)
                save()
                _progress(f"repair {arch_key} {setting} {pair_seeds}", started, _scores(row))
    return results


def run_repair_hf(
    families: Sequence[str],
    seeds: Sequence[tuple[int, int]],
    epochs: int,
    results: dict[str, dict[str, list[dict[str, float]]]] | None = None,
    save: Callable[[], None] = lambda: None,
) -> dict[str, dict[str, list[dict[str, float]]]]:
    """results["hf " + family]["same"] = [{label: test accuracy} per seed pair] (tests/transformer_testbed.py)."""
    from tests import transformer_testbed as tt

    data = tt.load_digits()
    results = {} if results is None else results
    for family in families:
        for pair_seeds in seeds:
            started = time.perf_counter()
            run, states = tt.train_pair(family, data, pair_seeds, epochs)
            row: dict[str, float] = {"endpoint": run.endpoint}
            for label, method, params in REPAIR_METHODS:
                for repair in (False, True):
                    result = tt.merge_pair(family, states, method, {**params, "repair": repair}, data)
                    row[label + (" + repair" if repair else "")] = tt.accuracy(family, result.state_dict, data)
            results.setdefault(f"hf {family}", {}).setdefault("same", []).append(row)
            save()
            _progress(f"repair hf {family} {pair_seeds}", started, _scores(row))
    return results


def repair_table(results: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]]) -> str:
    labels = [label for label, _, _ in REPAIR_METHODS]
    lines = [
        "| model | setting | seed pairs | endpoint | "
        + " | ".join(f"{label} | {label} + repair" for label in labels)
        + " |",
        "|" + "---|" * (4 + 2 * len(labels)),
    ]
    for model, settings in results.items():
        for setting, rows in settings.items():
            cells = [_fmt([r["endpoint"] for r in rows])]
            for label in labels:
                for key in (label, label + " + repair"):
                    cells.append(_fmt([r[key] for r in rows]))
            lines.append(f"| {model} | {setting} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def repair_lift(results: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]]) -> str:
    lines = []
    for model, settings in results.items():
        for setting, rows in settings.items():
            lifts = [
                f"{label} {100 * _mean([r[label + ' + repair'] - r[label] for r in rows]):+.1f}"
                for label, _, _ in REPAIR_METHODS
            ]
            lines.append(f"- {model} {setting}: " + ", ".join(lifts))
    return "\n".join(lines)


# --------------------------------------------------------------------------- part 3: partial zip
PARTIAL_METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("zipit", "zipit", {}),
    ("mudsc zip", "mudsc", {"mode": "zip", "beta": 0.5}),
)


def partial_accuracy(pair: md.Pair, state: Mapping[str, torch.Tensor], data: tb.Digits) -> float:
    """Joint test accuracy of a partial zip's trunk + branches (each branch's 5 logits, concatenated)."""
    arch = ArchitectureSpec.model_validate(pair.architecture)
    model = partial.partial_model(lambda: build_model(arch), state, "separate")
    with torch.no_grad():
        out = model(tb.inputs_for(pair.architecture, data.x_test))
    return float((out.argmax(1) == data.y_test).float().mean())


def run_partial(
    archs: Sequence[str],
    seeds: Sequence[tuple[int, int]],
    epochs: int,
    data: tb.Digits,
    results: dict[str, dict[str, list[dict[str, Any]]]] | None = None,
    save: Callable[[], None] = lambda: None,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """results[arch]["disjoint"] = [{"endpoint", "depths": {depth: {"group", "size", label: joint accuracy}}} per seed pair]:
    the disjoint setting, every valid cut (``partial.valid_depths``), zipit and mudsc zip, BN reset on."""
    calibration = md.calibration_inputs(data)
    results = {} if results is None else results
    for arch_key in archs:
        arch = md.ARCHITECTURES[arch_key]
        spec = trace_architecture(ArchitectureSpec.model_validate(tb.with_classes(arch, 5))).spec
        for pair_seeds in seeds:
            started = time.perf_counter()
            pair = md.train_pair(arch, data, "disjoint", pair_seeds, epochs)
            cell: dict[str, Any] = {"endpoint": pair.endpoint["joint"], "depths": {}}
            for depth in partial.valid_depths(spec):
                row: dict[str, Any] = {"group": spec.group_order()[depth - 1], "groups": len(spec.group_order())}
                for label, method, params in PARTIAL_METHODS:
                    result = md.merge_pair(pair, method, {**params, "stop_after": depth}, calibration)
                    row[label] = partial_accuracy(pair, result.state_dict, data)
                    row["size"] = result.report["partial"]["size_vs_one_model"]
                cell["depths"][str(depth)] = row
            results.setdefault(arch_key, {}).setdefault("disjoint", []).append(cell)
            save()
            depths = cell["depths"].items()
            _progress(
                f"partial {arch_key} {pair_seeds}",
                started,
                " ".join(f"{d}:" + "/".join(f"{r[m]:.3f}" for m, _, _ in PARTIAL_METHODS) for d, r in depths),
            )
    return results


def partial_table(results: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]]) -> str:
    labels = [label for label, _, _ in PARTIAL_METHODS]
    lines = [
        "| architecture | depth | last merged group | size vs one model | "
        + " | ".join(labels)
        + " | endpoints (ensemble, size 2.0) |",
        "|" + "---|" * (5 + len(labels)),
    ]
    for arch, settings in results.items():
        cells = settings["disjoint"]
        for depth, row in cells[0]["depths"].items():
            rows = [c["depths"][depth] for c in cells]
            accs = " | ".join(_fmt([r[label] for r in rows]) for label in labels)
            full = " (full merge)" if int(depth) == row["groups"] else ""
            lines.append(
                f"| {arch} | {depth} of {row['groups']}{full} | `{row['group']}` | {row['size']:.2f} | {accs} | "
                + _fmt([c["endpoint"] for c in cells])
                + " |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- doc
def document(raw: Mapping[str, Any]) -> str:
    parts = ['# Merge quality without labels: beta "auto", REPAIR, partial zip', ""]
    meta = raw.get("meta", {})
    parts += [
        f"Generated {meta.get('date', '?')} by `{meta.get('command', '?')}` (parts: "
        + "; ".join(f"{p['part']} {p['elapsed_s']:.0f} s, load average at start {p['load']}" for p in meta["runs"])
        + f"; 1 CPU thread each, torch {torch.__version__}, {os.cpu_count()}-core shared machine).",
        "",
    ]
    if "quality" in raw:
        q = raw["quality"]
        s = quality_summary(q["results"])
        parts += [
            '## beta "auto" against beta 0.5, the label-chosen beta* and the best single-space method',
            "",
            f"Digits bed of `bench/mudsc_digits.py`: {q['epochs']} epochs, seed pairs {q['seeds']}, calibration = "
            f"first {md.CALIBRATION} train images, BN reset on (the MLP has no BatchNorm). Joint test accuracy "
            "in %, mean ± std over seed pairs (same: shared head, 10-way; disjoint: `heads='separate'`, "
            "argmax over the 10 concatenated logits). best single space: align = better of git_rebasin and "
            "activation_align, zip = better of weight_zip and zipit, chosen per architecture x setting by the "
            f"mean over the seed pairs. β*: β in {list(md.BETAS)} with the best joint accuracy on labelled "
            "TRAIN data per seed pair (`mudsc_digits.choose_beta`). β auto: no labels; the merge holds out the "
            "last quarter of the same 512 calibration inputs (statistics from the first 384), merges at every "
            "β of 0, .1, .3, .5, .7, .9, 1 and keeps the one whose merged model agrees best with the input "
            "models on the held-out quarter (KL to the mean softmax, shared head; KL to the softmax of the "
            "models' concatenated logits, separate heads). "
            "Chosen βs are listed per seed pair. Time: wall time of the auto merge / one β = 0.5 merge of the "
            "same pair, same process.",
            "",
            quality_table(q["results"]),
            "",
            f"Summary over the {s['cases']} architecture x setting x mode cases (means over seed pairs first):",
            "",
            f"- auto − β* (labels): {s['auto_minus_star']:+.2f} points on average "
            f"(mean |gap| {s['auto_minus_star_abs']:.2f}, worst case {s['auto_minus_star_worst']:+.1f}).",
            f"- auto − best single-space method: {s['auto_minus_single']:+.2f} points on average "
            f"(worst case {s['auto_minus_single_worst']:+.1f}).",
            f"- auto − β = 0.5: {s['auto_minus_half']:+.2f} points on average.",
            f"- auto's wall time: {s['time_ratio']:.1f}x one β = 0.5 merge on average "
            f"(max {s['time_ratio_max']:.1f}x; the grid has 7 candidates, of which only matching, "
            "merging and BN reset repeat).",
            "",
        ]
    if "repair" in raw:
        r = raw["repair"]
        parts += [
            "## REPAIR where BatchNorm reset does not apply",
            "",
            "digits mlp / vit: the bed above (`bench/mudsc_digits.py` protocol, "
            f"{r['epochs']} epochs, joint test accuracy; same and disjoint as above); vit is the built-in "
            f"LayerNorm ViT `{VIT['config']}`. hf bert / hf vit: the Hugging Face pairs of "
            f"`tests/transformer_testbed.py` ({r['hf_epochs']} epochs, same task, test accuracy; calibration "
            "the first 256 train samples). Every method at its defaults (mudsc zip: β = 0.5), with and "
            "without `repair: true`. Accuracy in %, mean ± std over the seed pairs listed.",
            "",
            repair_table(r["results"]),
            "",
            "REPAIR's lift (points, mean over seed pairs):",
            "",
            repair_lift(r["results"]),
            "",
        ]
    if "partial" in raw:
        z = raw["partial"]
        parts += [
            "## Partial zip (`stop_after`): size against accuracy, disjoint tasks",
            "",
            f"The disjoint setting of the bed above ({z['epochs']} epochs, seed pairs {z['seeds']}, calibration the "
            "first 512 train images, BN reset on): the unit groups up to `depth` (in forward order) merged, every "
            "model's layers after the cut kept as its own branch reading the merged trunk, branch logits "
            "concatenated (joint test accuracy in %, argmax over the 10 logits; mean ± std over seed pairs). "
            "Every valid cut is listed (`partial.valid_depths`: a cut never falls inside a residual stream); the "
            "last depth is the full merge with separate heads. Size: parameters of trunk + branches over one "
            "model's. The endpoints' ensemble (everything separate) is the upper reference.",
            "",
            partial_table(z["results"]),
            "",
        ]
    parts += [f"Reproduce: `{meta.get('command', '?')}`.", ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("auto", "repair", "partial", "both"), default="both")
    parser.add_argument("--archs", nargs="+", default=list(QUALITY_ARCHS), choices=sorted(md.ARCHITECTURES))
    parser.add_argument("--seed-pairs", type=int, default=len(md.SEED_PAIRS))
    parser.add_argument("--epochs", type=int, default=md.EPOCHS)
    parser.add_argument("--repair-archs", nargs="*", default=list(REPAIR_ARCHS), choices=sorted(REPAIR_ARCHS))
    parser.add_argument("--repair-seed-pairs", type=int, default=len(md.SEED_PAIRS))
    parser.add_argument("--hf-families", nargs="*", default=list(HF_FAMILIES), choices=HF_FAMILIES)
    parser.add_argument("--hf-seed-pairs", type=int, default=2)
    parser.add_argument("--hf-epochs", type=int, default=20)
    parser.add_argument("--raw", type=Path, help="also write the raw results here (JSON)")
    parser.add_argument("--join", nargs="+", type=Path, help="only write the doc from these raw files")
    parser.add_argument("--quick", action="store_true", help="MLP only, 1 seed pair, 5 epochs, no doc")
    parser.add_argument("--out", type=Path, default=DOC)
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(arguments)
    command = " ".join(["python -m bench.mudsc_quality", *arguments])
    if args.join:
        raw: dict[str, Any] = {"meta": {"runs": []}}
        for path in args.join:
            part = json.loads(path.read_text())
            raw["meta"]["runs"] += part["meta"]["runs"]
            raw["meta"]["date"] = part["meta"]["date"]
            raw["meta"]["command"] = "; ".join(r["command"] for r in raw["meta"]["runs"])
            for key in ("quality", "repair", "partial"):
                if key in part:
                    joined = raw.setdefault(key, {**part[key], "results": {}})["results"]
                    for model, settings in part[key]["results"].items():
                        for setting, cells in settings.items():  # the same cell in two parts: the longer run
                            if len(cells) > len(joined.setdefault(model, {}).get(setting, [])):
                                joined[model][setting] = cells
        text = document(raw)
        print(text)
        args.out.write_text(text)
        return 0
    if args.quick:
        args.archs, args.seed_pairs, args.epochs = ["mlp"], 1, 5
        args.repair_archs, args.repair_seed_pairs, args.hf_families = ["mlp"], 1, []
    torch.set_num_threads(1)
    data = tb.load_digits_data()
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    started = time.perf_counter()
    raw = {"meta": {"date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "command": command}}

    def save() -> None:
        """Keep the raw results so far (a long run cut short still leaves its finished cells)."""
        elapsed = time.perf_counter() - started
        raw["meta"]["runs"] = [{"part": args.part, "command": command, "elapsed_s": elapsed, "load": load}]
        if args.raw:
            args.raw.write_text(json.dumps(raw, indent=1))

    if args.part in ("auto", "both"):
        seeds = [(2 * i, 2 * i + 1) for i in range(args.seed_pairs)]
        raw["quality"] = {"epochs": args.epochs, "seeds": seeds, "results": {}}
        run_quality(args.archs, seeds, args.epochs, data, raw["quality"]["results"], save)
    if args.part in ("repair", "both"):
        seeds = [(2 * i, 2 * i + 1) for i in range(args.repair_seed_pairs)]
        raw["repair"] = {"epochs": args.epochs, "hf_epochs": args.hf_epochs, "results": {}}
        results = raw["repair"]["results"]
        run_repair_digits(args.repair_archs, ("same", "disjoint"), seeds, args.epochs, data, results, save)
        hf_seeds = [(2 * i, 2 * i + 1) for i in range(args.hf_seed_pairs)]
        run_repair_hf(args.hf_families, hf_seeds, args.hf_epochs, results, save)
    if args.part in ("partial", "both"):
        seeds = [(2 * i, 2 * i + 1) for i in range(args.seed_pairs)]
        raw["partial"] = {"epochs": args.epochs, "seeds": seeds, "results": {}}
        run_partial(args.archs, seeds, args.epochs, data, raw["partial"]["results"], save)
    save()
    text = document(raw)
    print(text)
    if not args.quick:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
