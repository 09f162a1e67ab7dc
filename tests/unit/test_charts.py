"""The report figure's charts (mudsc_core.charts): valid PNGs of the figure's size whatever the data (NaN, inf,
zeros and negatives, on log axes too; thousands of points; hundreds of labels), data drawn where it belongs, and
no two texts overlapping."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from mudsc_core import charts

WIDTH, HEIGHT = 990, 675  # the report's figure: 11 x 7.5 inches at 90 dpi
RED = "#d62728"
TextBox = tuple[str, tuple[float, float, float, float]]  # a text and its box: left, top, right, bottom


def _image(figure: charts.Figure) -> Image.Image:
    png = figure.png()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.format == "PNG" and image.size == figure.size
    return image.convert("RGB")


def _pixels_near(image: Image.Image, color: str, box: Any = None, tolerance: int = 40) -> int:
    """How many pixels (inside ``box``: left, top, right, bottom) are within ``tolerance`` of ``color``."""
    left, top, right, bottom = (int(round(v)) for v in box) if box else (0, 0, *image.size)
    pixels = np.asarray(image, dtype=np.int16)[top:bottom, left:right]
    target = np.array(Image.new("RGB", (1, 1), color).getpixel((0, 0)), dtype=np.int16)
    return int((np.abs(pixels - target) <= tolerance).all(axis=-1).sum())


@pytest.fixture
def text_boxes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[TextBox]]:
    """Every text the charts draw, with its bounding box (in drawn pixels)."""
    boxes: list[TextBox] = []
    original = ImageDraw.ImageDraw.text

    def text(self: ImageDraw.ImageDraw, xy: Any, text: Any, *args: Any, **kwargs: Any) -> None:
        if text:
            left, top, right, bottom = self.textbbox(xy, text, font=kwargs.get("font"), anchor=kwargs.get("anchor"))
            boxes.append((str(text), (left, top, right, bottom)))
        original(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    yield boxes


def _assert_no_overlap(boxes: list[TextBox]) -> None:
    for i, (text_a, a) in enumerate(boxes):
        for text_b, b in boxes[i + 1 :]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, f"{text_a!r} {a} overlaps {text_b!r} {b}"


def test_png_is_valid_and_of_the_figure_size() -> None:
    figure = charts.Figure(2, 2, width=WIDTH, height=HEIGHT)
    assert _image(figure).size == (WIDTH, HEIGHT)
    figure = charts.Figure(1, 3, width=500, height=200)
    figure.panels[0][1].line([1.0, 2.0, 3.0])
    assert _image(figure).size == (500, 200)


def test_a_line_is_drawn_in_its_own_panel_at_its_height() -> None:
    figure = charts.Figure(2, 2, width=WIDTH, height=HEIGHT)
    panel = figure.panels[0][1]
    panel.line([0.5] * 50, color=RED)
    panel.ylim = (0, 1)
    image = _image(figure)
    assert panel.area is not None
    left, top, right, bottom = panel.area
    assert WIDTH / 2 < left < right <= WIDTH and 0 < top < bottom <= HEIGHT / 2  # the top right panel
    assert _pixels_near(image, RED) == _pixels_near(image, RED, panel.area) > 0.8 * (right - left)
    middle = (top + bottom) / 2  # 0.5 of (0, 1): the middle of the plot area, the whole width (5% margins)
    assert _pixels_near(image, RED, (left, middle - 2, right, middle + 2)) > 0.8 * (right - left)


def test_nan_is_a_gap_and_a_log_axis_leaves_out_what_is_not_positive() -> None:
    figure = charts.Figure(1, 1, width=600, height=400)
    panel = figure.panels[0][0]
    panel.line([1.0] * 10 + [math.nan] * 10 + [1.0] * 10 + [0.0, -1.0] * 5 + [1.0] * 10, color=RED)
    panel.log_y = True
    image = _image(figure)
    assert panel.area is not None
    left, top, right, bottom = panel.area

    def at(i: float) -> float:  # x of point i: 0..49 with 5% margins
        return left + (i + 2.45) / 53.9 * (right - left)

    drawn = [_pixels_near(image, RED, (at(a) + 3, top, at(b) - 3, bottom)) for a, b in ((0, 9), (20, 29), (40, 49))]
    gaps = [_pixels_near(image, RED, (at(a) + 3, top, at(b) - 3, bottom)) for a, b in ((9, 20), (29, 40))]
    assert all(n > 0 for n in drawn) and gaps == [0, 0]


def test_the_largest_bar_reaches_near_the_right_edge_and_bars_are_proportional() -> None:
    figure = charts.Figure(2, 2, width=WIDTH, height=HEIGHT)
    panel = figure.panels[1][0]
    panel.barh(["small", "medium", "large"], [[1.0, 2.0, 4.0]])
    image = _image(figure)
    assert panel.area is not None
    left, top, right, bottom = panel.area
    blue = charts.COLORS[0]
    ends = []
    for i in range(3):  # the rightmost bar pixel in the middle row of each category's slot, first at the top
        y = round(top + (i + 0.5) * (bottom - top) / 3)
        row = [x for x in range(int(left), int(right) + 1) if _pixels_near(image, blue, (x, y, x + 1, y + 1), 10)]
        ends.append(max(row) - left)
    assert 0.9 * (right - left) < ends[2] < right - left  # 4 of (0, 4.2): 5% margin
    assert ends[0] == pytest.approx(ends[2] / 4, abs=3) and ends[1] == pytest.approx(ends[2] / 2, abs=3)


def test_grouped_bars_show_both_series_and_a_legend(text_boxes: list[TextBox]) -> None:
    figure = charts.Figure(1, 1, width=600, height=400)
    panel = figure.panels[0][0]
    panel.barh(["a", "b"], [[3.0, 3.0], [1.0, 2.0]], ["units per model", "merged"])
    image = _image(figure)
    assert (
        _pixels_near(image, charts.COLORS[0], panel.area) > 0 and _pixels_near(image, charts.COLORS[1], panel.area) > 0
    )
    assert {"units per model", "merged", "a", "b"} <= {text for text, _ in text_boxes}


def test_hundreds_of_labels_are_thinned_out_and_never_overlap(text_boxes: list[TextBox]) -> None:
    figure = charts.Figure(2, 2, width=WIDTH, height=HEIGHT)
    names = [f"model.layers.{i}.mlp.gate_proj" for i in range(400)]  # 28 characters up to layer 9, then shortened
    figure.panels[0][0].barh(names, [[float(i) for i in range(400)]])
    figure.panels[0][0].title = "mean similarity of matched units\n(dual space: beta 0.5 x weight + 0.5 x activation)"
    _image(figure)
    shown = {name if len(name) <= 28 else "..." + name[-25:]: i for i, name in enumerate(names)}
    labels = [shown[text] for text, _ in text_boxes if text in shown]
    assert labels[0] == 0 and 5 < len(labels) < 40  # the first category at the top, then every stride-th
    assert len({b - a for a, b in zip(labels, labels[1:], strict=False)}) == 1
    _assert_no_overlap(text_boxes)


def test_an_empty_panel_shows_its_message(text_boxes: list[TextBox]) -> None:
    figure = charts.Figure(1, 2, width=WIDTH, height=300)
    figure.panels[0][0].message = "no sweeps (no matching)"
    figure.panels[0][1].barh([], [[]])  # nothing to draw: empty axes
    _image(figure)
    left_half = [text for text, box in text_boxes if box[2] <= WIDTH]  # drawn at twice the size
    assert left_half == ["no sweeps (no matching)"]  # no ticks either


_ODD = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e-300, 5e-324, 1e300, -1e308, 1.0, 0.5, 1e6 + 0.5, 123.456]


@st.composite
def _series(draw: st.DrawFn) -> list[float]:
    """Up to 5000 values: a few odd or ordinary ones, repeated, on a ramp or not (Hypothesis's buffer is too small
    for thousands of independently drawn floats)."""
    length = draw(st.one_of(st.integers(0, 5), st.integers(0, 5000)))
    pool = draw(st.lists(st.one_of(st.sampled_from(_ODD), st.floats()), min_size=1, max_size=8))
    ramp = draw(st.sampled_from([0.0, 1.0, -1e-3, 1e290]))
    return [pool[i % len(pool)] + (ramp * i if ramp else 0.0) for i in range(length)]


_LABELS = st.lists(st.text(max_size=60), max_size=8)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    lines=st.lists(st.tuples(_series(), st.booleans(), st.booleans(), st.none() | st.text(max_size=40)), max_size=4),
    xs=st.none() | _series(),
    bars=st.tuples(_LABELS, st.integers(0, 600), st.lists(_series(), max_size=2)),
    log_y=st.booleans(),
    integer_x=st.booleans(),
    ylim=st.none() | st.tuples(st.floats(-10, 10), st.floats(-10, 10)),
    title=st.text(max_size=120),
)
def test_any_data_draws_a_valid_png_without_overlapping_text(
    text_boxes: list[TextBox],
    lines: list[tuple[list[float], bool, bool, str | None]],
    xs: list[float] | None,
    bars: tuple[list[str], int, list[list[float]]],
    log_y: bool,
    integer_x: bool,
    ylim: tuple[float, float] | None,
    title: str,
) -> None:
    text_boxes.clear()
    figure = charts.Figure(2, 2, width=WIDTH, height=HEIGHT)
    panel = figure.panels[0][0]
    for ys, dashed, markers, label in lines:
        panel.line(ys, xs, dashed=dashed, markers=markers, label=label)
    panel.log_y, panel.integer_x, panel.ylim, panel.title, panel.xlabel = log_y, integer_x, ylim, title, title
    words, count, series = bars
    names = [f"{words[i % len(words)]}.{i}" if words else str(i) for i in range(count)]
    figure.panels[1][1].barh(names, series, words)
    figure.panels[1][1].title = title
    _image(figure)
    _assert_no_overlap(text_boxes)
