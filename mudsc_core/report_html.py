"""The merge report people look at: ``report.html`` (one self-contained page) and ``report.png`` (its figure).

Rendered from the report dict a merge returns (the job's ``report.json``), never from the tensors: what the
page shows is exactly what the JSON holds. The figure is drawn with Pillow by :mod:`mudsc_core.charts` (just the
panels drawn here; matplotlib's import and drawing were ~1.2 s of a ~5 s same-base job).

- Permutation methods (:class:`~mudsc_core.permutation.merge.PermutationReport`): the mean similarity of
  the matched units per group, in the similarity space the merge matched in (the report holds one number
  per group: the dual-space mix ``beta * weight + (1 - beta) * activation`` when calibration data was given,
  else weight space; the page names the space), the objective per sweep, the groups' widths before and
  after the merge, the spec summary (free and pinned groups, why pinned, the self-check), the memory
  estimate and the timings. Health signals: the self-check's error against its tolerance and whether
  BatchNorm statistics were re-estimated.
- Same-base methods (:func:`~mudsc_core.same_base.stream.merge_checkpoints`): per tensor, the models'
  task-vector norms, the fraction of elements whose task vectors disagree in sign and the fraction of
  elements the merged task vector keeps (``tensor_stats``, measured by the stream:
  :mod:`mudsc_core.same_base.tensor_stats`; methods without a base have no task vectors), the notes and the
  timings.

Images are PNGs embedded as base64 ``data:`` URIs and the page loads nothing else.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mudsc_core import charts

HTML_NAME = "report.html"
PNG_NAME = "report.png"
MAX_TABLE_ROWS = 400  # per-tensor tables of large models: the first rows, the figure shows them all
_DPI = 90

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; } .note { color: #666; font-size: 0.9em; }
.bad { color: #b00; font-weight: bold; } .good { color: #070; }
"""


def is_permutation_report(report: Mapping[str, Any]) -> bool:
    return "groups" in report and "objective_per_sweep" in report


def render(report: Mapping[str, Any]) -> tuple[str, bytes]:
    """``(report.html text, report.png bytes)`` of a merge report."""
    if is_permutation_report(report):
        return _permutation(report)
    return _same_base(report)


# --------------------------------------------------------------------------- permutation
def _permutation(report: Mapping[str, Any]) -> tuple[str, bytes]:
    groups: Mapping[str, Mapping[str, Any]] = report.get("groups") or {}
    objective = [float(v) for v in report.get("objective_per_sweep") or []]
    timings = _numbers(report.get("timings_s"))
    space = str(report.get("similarity_space", "none"))
    space_label = _space_label(space, report.get("beta"))

    figure = _figure(2, 2, height=7.5)
    (similarity, sweeps), (widths, stages) = figure.panels
    names = list(groups)
    sims = [float(groups[n].get("mean_similarity", 0.0)) for n in names]
    _barh(similarity, names, sims, f"mean similarity of matched units\n({space_label})")
    if objective:
        sweeps.line(objective, range(1, len(objective) + 1), markers=True)
        sweeps.xlabel = "sweep"
        sweeps.integer_x = True
    else:
        sweeps.message = "no sweeps (no matching)"
    sweeps.title = "objective per sweep"
    if names:
        sizes = [float(groups[n].get("size", 0)) for n in names]
        merged = [float(groups[n].get("merged_size", 0)) for n in names]
        widths.barh(names, [sizes, merged], ["units per model", "merged"])
    else:
        widths.message = "no unit groups"
    widths.title = "group widths"
    _barh(stages, list(timings), list(timings.values()), "seconds per stage")
    png = figure.png()

    spec: Mapping[str, Any] = report.get("spec") or {}
    check = spec.get("self_check") or {}
    error, tolerance = check.get("max_rel_error"), check.get("tolerance")
    healthy = isinstance(error, int | float) and isinstance(tolerance, int | float) and error <= tolerance
    memory: Mapping[str, Any] = report.get("memory") or {}
    summary = [
        ("method", report.get("method")),
        ("mode", report.get("mode")),
        ("models", report.get("num_models")),
        ("similarity space", space_label),
        ("matching", report.get("matching")),
        ("heads", report.get("heads")),
        ("architecture", json.dumps(report.get("architecture"), default=str)),
        ("sweeps", report.get("sweeps")),
        ("best objective", max(objective) if objective else None),
        ("BatchNorm statistics re-estimated", report.get("bn_reset")),
        ("estimated peak memory (bytes)", memory.get("estimated_peak_bytes")),
        ("peak stage", memory.get("estimated_peak_stage")),
    ]
    body = [
        f"<h1>Merge report: {_e(report.get('method'))}</h1>",
        _table(["", ""], summary, header=False),
        f'<img alt="summary figure" src="data:image/png;base64,{base64.b64encode(png).decode()}">',
        "<h2>Matched units per group</h2>",
        f'<p class="note">Mean similarity of the matched units in {_e(space_label)}, and the same final matching '
        "scored in weight space and in activation space separately; disagreement: the fraction of units whose "
        "most similar partner in model 0 differs between the two spaces (where dual-space matching matters; "
        "empty without calibration).</p>",
        _table(
            [
                "group",
                "units per model",
                "merged units",
                "mean similarity",
                "weight space",
                "activation space",
                "disagreement",
            ],
            [
                (
                    n,
                    g.get("size"),
                    g.get("merged_size"),
                    g.get("mean_similarity"),
                    g.get("weight"),
                    g.get("activation"),
                    g.get("disagreement"),
                )
                for n, g in groups.items()
            ],
        ),
        "<h2>Objective per sweep</h2>",
        _table(["sweep", "objective"], list(enumerate(objective, start=1))),
        "<h2>Permutation spec</h2>",
        _table(
            ["source", "capture", "derivation (s)", "outputs"],
            [(spec.get("source"), spec.get("capture"), spec.get("derivation_s"), spec.get("outputs"))],
        ),
        _table(
            ["group", "size", "blocks", "free", "pinned because"],
            [
                (g.get("name"), g.get("size"), g.get("blocks"), g.get("free"), ", ".join(g.get("pinned_because", [])))
                for g in spec.get("groups") or []
            ],
        ),
        "<h2>Health</h2>",
        f'<p class="{"good" if healthy else "bad"}">self-check: largest relative error {_e(_fmt(error))} '
        f"(tolerance {_e(_fmt(tolerance))}): {'passed' if healthy else 'not passed'}</p>",
        "<p>BatchNorm statistics "
        + ("re-estimated on the calibration data after merging" if report.get("bn_reset") else "not re-estimated")
        + (" (no calibration data: matched in weight space only)" if report.get("weight_space_only") else "")
        + ".</p>",
        *_repair_section(report.get("repair")),
        *_beta_section(report.get("beta_search")),
        *_partial_section(report.get("partial")),
        "<h2>Timings</h2>",
        _table(["stage", "seconds"], list(timings.items())),
        "<h2>Parameters</h2>",
        f"<pre>{_e(json.dumps(report.get('params'), indent=2, default=str))}</pre>",
    ]
    return _page(f"merge report: {report.get('method')}", body), png


def _repair_section(repair: Mapping[str, Any] | None) -> list[str]:
    """Variance collapse per group (merged std / interpolated std of the input models) and REPAIR's fix."""
    if not repair:
        return [
            "<p>Activation statistics of the merged model (variance collapse per group) are measured when the "
            "merge runs with <code>repair: true</code>.</p>"
        ]
    groups: Mapping[str, Mapping[str, Any]] = repair.get("groups") or {}
    skipped: Mapping[str, str] = repair.get("skipped") or {}
    return [
        "<h3>Variance collapse and REPAIR</h3>",
        '<p class="note">std ratio: the merged units\' pre-activation standard deviation over the calibration '
        "inputs divided by the interpolation of their input models' (1 = no collapse), before and after REPAIR.</p>",
        _table(
            ["group", "std ratio before", "std ratio after", "units rescaled", "mean shifted"],
            [
                (n, g.get("std_ratio_before"), g.get("std_ratio_after"), g.get("units_rescaled"), g.get("mean_shifted"))
                for n, g in groups.items()
            ],
        ),
        _table(["group left alone", "because"], list(skipped.items())) if skipped else "",
    ]


def _beta_section(search: Mapping[str, Any] | None) -> list[str]:
    if not search:
        return []
    return [
        "<h2>beta chosen without labels</h2>",
        f'<p class="note">Each candidate was merged and scored on {_e(search.get("held_out_samples"))} held-out '
        f"calibration inputs by its agreement with the input models (higher is better); chosen: beta "
        f"{_e(search.get('chosen'))}.</p>",
        _table(
            ["beta", "score", "objective"],
            [(c.get("beta"), c.get("score"), c.get("objective")) for c in search.get("candidates") or []],
        ),
    ]


def _partial_section(cut: Mapping[str, Any] | None) -> list[str]:
    if not cut:
        return []
    merged, separate = cut.get("merged_groups") or [], cut.get("separate_groups") or []
    return [
        "<h2>Partial zip</h2>",
        f'<p class="note">The first {_e(cut.get("depth"))} of {len(merged) + len(separate)} unit groups are merged '
        f"(a shared trunk); every model keeps its layers after the cut as its own branch, outputs "
        f"{'concatenated' if cut.get('combine') == 'concat' else 'averaged'}. {_e(cut.get('layout'))}.</p>",
        _table(
            ["", ""],
            [
                ("merged groups", ", ".join(merged)),
                ("separate groups", ", ".join(separate) or "none"),
                ("valid cuts (depths)", ", ".join(str(d) for d in cut.get("valid_depths") or [])),
                ("branches", cut.get("branches")),
                ("size against one model", cut.get("size_vs_one_model")),
            ],
            header=False,
        ),
    ]


def _space_label(space: str, beta: Any) -> str:
    if space == "dual":
        return f"dual space: beta {_fmt(beta)} x weight + {_fmt(1 - float(beta))} x activation"
    return {
        "activation": "activation space",
        "weight": "weight space",
        "none": "no matching",
    }.get(space, space)


# --------------------------------------------------------------------------- same base
def _same_base(report: Mapping[str, Any]) -> tuple[str, bytes]:
    stats: Sequence[Mapping[str, Any]] = report.get("tensor_stats") or []
    metrics = report.get("metrics") or {}
    timings = {k: v for k, v in _numbers(metrics).items() if k.endswith("_s")}

    figure = _figure(2, 2, height=7.5)
    (norms, conflicts), (kept, seconds) = figure.panels
    if stats:
        models = max(len(s.get("task_vector_norms") or []) for s in stats)
        for m in range(models):
            norms.line([_at(s.get("task_vector_norms"), m) for s in stats], label=f"model {m}")
        norms.line([float(s.get("merged_norm", math.nan)) for s in stats], label="merged", color="#000000", dashed=True)
        norms.log_y = any(float(s.get("merged_norm", 0) or 0) > 0 for s in stats)
        norms.title = "task-vector L2 norm per tensor"
        norms.xlabel = "tensor (in checkpoint order)"
        conflicts.line([float(s.get("sign_conflict", 0.0)) for s in stats])
        conflicts.ylim = (0, 1)
        conflicts.title = "fraction of elements with conflicting signs"
        conflicts.xlabel = "tensor"
        kept.line([float(s.get("kept", 0.0)) for s in stats], color=charts.COLORS[2])
        kept.ylim = (0, 1.05)
        kept.title = "fraction of elements kept (merged task vector non-zero)"
        kept.xlabel = "tensor"
        for panel in (norms, conflicts, kept):
            panel.integer_x = True
    else:
        for panel in (norms, conflicts, kept):
            panel.message = "no task vectors (a method without a base)"
    _barh(seconds, list(timings), list(timings.values()), "seconds")
    png = figure.png()

    summary: list[tuple[str, Any]] = [
        ("method", report.get("method")),
        ("tensors", report.get("tensors")),
        ("tensors with task-vector statistics", len(stats)),
    ]
    if stats:
        total = sum(int(s.get("numel", 0)) for s in stats) or 1
        summary += [
            (
                "sign conflicts (all merged elements)",
                sum(s.get("sign_conflict", 0) * s.get("numel", 0) for s in stats) / total,
            ),
            ("kept (all merged elements)", sum(s.get("kept", 0) * s.get("numel", 0) for s in stats) / total),
        ]
    shown = stats[:MAX_TABLE_ROWS]
    body = [
        f"<h1>Merge report: {_e(report.get('method'))}</h1>",
        _table(["", ""], summary, header=False),
        f'<img alt="summary figure" src="data:image/png;base64,{base64.b64encode(png).decode()}">',
        "<h2>Per tensor</h2>",
        (
            '<p class="note">Task vectors are each model minus the base. Sign conflict: the fraction of elements '
            "where some model's task vector is positive and another's negative. Kept: the fraction of elements "
            "where the merged task vector is non-zero. Both fractions are measured on an evenly strided sample "
            "of each tensor's elements (at most 65,536); the norms are exact.</p>"
            + (
                f'<p class="note">The first {len(shown)} of {len(stats)} tensors.</p>'
                if len(shown) < len(stats)
                else ""
            )
            + _table(
                ["tensor", "elements", "task-vector norms", "merged norm", "sign conflict", "kept"],
                [
                    (
                        s.get("name"),
                        s.get("numel"),
                        ", ".join(_fmt(v) for v in s.get("task_vector_norms") or []),
                        s.get("merged_norm"),
                        s.get("sign_conflict"),
                        s.get("kept"),
                    )
                    for s in shown
                ],
            )
            if stats
            else "<p>This method merges the models' tensors directly (no base, no task vectors): no per-tensor "
            "statistics.</p>"
        ),
        "<h2>Notes</h2>",
        "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.get("notes") or []) + "</ul>",
        "<h2>Timings</h2>",
        _table(["what", "seconds"], list(timings.items())),
        "<h2>Parameters</h2>",
        f"<pre>{_e(json.dumps(report.get('params'), indent=2, default=str))}</pre>",
    ]
    return _page(f"merge report: {report.get('method')}", body), png


# --------------------------------------------------------------------------- helpers
def _figure(rows: int, cols: int, *, height: float) -> charts.Figure:
    return charts.Figure(rows, cols, width=round(11 * _DPI), height=round(height * _DPI))  # 11 x height inches


def _barh(panel: charts.Panel, labels: Sequence[str], values: Sequence[float], title: str) -> None:
    if labels:
        panel.barh(labels, [values])
    else:
        panel.message = "nothing measured"
    panel.title = title


def _at(values: Any, index: int) -> float:
    return float(values[index]) if isinstance(values, list) and index < len(values) else math.nan


def _numbers(mapping: Any) -> dict[str, float]:
    if not isinstance(mapping, Mapping):
        return {}
    return {str(k): float(v) for k, v in mapping.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else ("yes" if value else "no")
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _e(value: Any) -> str:
    return html.escape(_fmt(value))


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, header: bool = True) -> str:
    head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>" if header else ""
    lines = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            numeric = header and isinstance(value, int | float) and not isinstance(value, bool)
            tag = "th" if not header and i == 0 else "td"
            cells.append(f"<{tag}{' class=num' if numeric else ''}>{_e(value)}</{tag}>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(lines)}</table>"


def _page(title: str, body: Sequence[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
