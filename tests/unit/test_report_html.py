"""The merge report to look at (mudsc_core.report_html): rendered from real merges' reports, written beside
report.json by the sidecar writer, and shown by a real browser (Debian's chromium, headless, driven over the
DevTools protocol) with its images decoded and its tables present."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from mudsc_core import build_model, report_html
from mudsc_core.output import write_sidecars
from mudsc_core.permutation.merge import merge
from mudsc_core.same_base.stream import merge_checkpoints

REPO = Path(__file__).resolve().parents[2]
ARCH = {"name": "mlp", "config": {"input_dim": 16, "hidden": [8, 8], "num_classes": 4}}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def permutation_report() -> dict[str, Any]:
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append(build_model(ARCH).state_dict())
    torch.manual_seed(2)
    result = merge(states, ARCH, {"name": "mudsc", "params": {"mode": "zip", "beta": 0.5}}, torch.randn(32, 16))
    return result.report


@pytest.fixture(scope="module")
def same_base_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("same-base")
    torch.manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(16, 16) for i in range(4)} | {"steps": torch.tensor([3])}
    save_file(base, folder / "base.safetensors")
    for m in range(3):
        save_file(
            {k: (v + 0.1 * (m + 1) * torch.randn_like(v)) if v.is_floating_point() else v for k, v in base.items()},
            folder / f"m{m}.safetensors",
        )
    return merge_checkpoints(
        "ties",
        {"density": 0.5},
        [folder / f"m{m}.safetensors" for m in range(3)],
        folder / "base.safetensors",
        [1.0, 1.0, 1.0],
        folder / "out",
        dtype="float32",
        shard_size_bytes=10**9,
    )


class _Page(HTMLParser):
    """The images (their src) and tables (rows of cell texts) of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.external: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        if tag in ("script", "link", "iframe") or (values.get("href") or "").startswith("http"):
            self.external.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None


def _parse(page: str) -> _Page:
    parsed = _Page()
    parsed.feed(page)
    return parsed


def _embedded_png(src: str) -> bytes:
    assert src.startswith("data:image/png;base64,"), src[:40]
    return base64.b64decode(src.split(",", 1)[1])


def _rows_with(parsed: _Page, first_cell: str) -> list[list[str]]:
    return [row for table in parsed.tables for row in table if row and row[0] == first_cell]


def test_permutation_report_page_shows_groups_sweeps_spec_and_health(permutation_report: dict[str, Any]) -> None:
    page, png = report_html.render(permutation_report)
    parsed = _parse(page)
    assert png.startswith(PNG_MAGIC)
    assert len(parsed.images) == 1 and _embedded_png(parsed.images[0]) == png
    assert not parsed.external  # self-contained: nothing loaded from elsewhere
    for group, values in permutation_report["groups"].items():
        (row,) = _rows_with(parsed, group)[:1]
        assert row[1:4] == [str(values["size"]), str(values["merged_size"]), f"{values['mean_similarity']:.4g}"]
    sweeps = next(t for t in parsed.tables if t and t[0] == ["sweep", "objective"])
    assert len(sweeps) - 1 == len(permutation_report["objective_per_sweep"])
    pinned = [g["name"] for g in permutation_report["spec"]["groups"] if not g["free"]]
    assert pinned and all(_rows_with(parsed, name) for name in pinned)
    assert "dual space: beta 0.5" in page and "self-check" in page and "passed" in page
    for stage in permutation_report["timings_s"]:
        assert _rows_with(parsed, stage)


def test_same_base_report_has_per_tensor_statistics_and_page(same_base_report: dict[str, Any]) -> None:
    stats = same_base_report["tensor_stats"]
    assert [s["name"] for s in stats] == [f"layers.{i}.weight" for i in range(4)]  # merged tensors only
    for row in stats:
        assert len(row["task_vector_norms"]) == 3 and all(n > 0 for n in row["task_vector_norms"])
        assert 0 < row["sign_conflict"] < 1  # three random task vectors disagree on most elements
        assert 0 < row["kept"] <= 1 and row["merged_norm"] > 0
    page, png = report_html.render(same_base_report)
    parsed = _parse(page)
    assert png.startswith(PNG_MAGIC) and _embedded_png(parsed.images[0]) == png
    for row in stats:
        (cells,) = _rows_with(parsed, row["name"])
        assert cells[1] == str(row["numel"]) and cells[4] == f"{row['sign_conflict']:.4g}"


def test_task_vector_statistics_are_exact_on_known_vectors() -> None:
    from mudsc_core.same_base.tensor_stats import TaskVectorStats

    stats = TaskVectorStats()
    vectors = [torch.tensor([1.0, -2.0, 0.0, 3.0]), torch.tensor([1.0, 2.0, 0.0, -4.0])]
    seen = list(stats.watch(iter([v.clone() for v in vectors])))
    torch.testing.assert_close(seen, vectors)  # passed through unchanged
    stats.merged("w", torch.tensor([2.0, 0.0, 0.0, 0.0]))
    (row,) = stats.rows
    assert row["task_vector_norms"] == pytest.approx([14**0.5, 21**0.5])
    assert row["sign_conflict"] == 0.5 and row["kept"] == 0.25 and row["merged_norm"] == 2.0


def test_sampled_fractions_are_close_to_the_exact_ones_on_large_tensors() -> None:
    from mudsc_core.same_base.tensor_stats import SAMPLE, TaskVectorStats

    torch.manual_seed(0)
    vectors = [torch.randn(1000, 700) for _ in range(3)]  # more elements than SAMPLE
    assert vectors[0].numel() > SAMPLE
    merged = torch.where(torch.rand(1000, 700) < 0.3, 1.0, 0.0)
    stats = TaskVectorStats()
    for _ in stats.watch(iter(vectors)):
        pass
    stats.merged("big", merged)
    (row,) = stats.rows
    stacked = torch.stack(vectors)
    exact_conflict = float(((stacked > 0).any(0) & (stacked < 0).any(0)).float().mean())
    assert abs(row["sign_conflict"] - exact_conflict) < 0.01
    assert abs(row["kept"] - float((merged != 0).float().mean())) < 0.01
    assert row["task_vector_norms"] == pytest.approx([float(v.norm()) for v in vectors], rel=1e-5)


def test_method_without_base_says_it_has_no_task_vectors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    for m in range(2):
        save_file({"w": torch.randn(4, 4)}, tmp_path / f"m{m}.safetensors")
    report = merge_checkpoints(
        "linear",
        {},
        [tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"],
        None,
        [1.0, 1.0],
        tmp_path / "out",
        dtype="float32",
        shard_size_bytes=10**9,
    )
    assert report["tensor_stats"] == []
    page, png = report_html.render(report)
    assert "no task vectors" in page and png.startswith(PNG_MAGIC)


def test_report_views_are_written_beside_report_json(tmp_path: Path, permutation_report: dict[str, Any]) -> None:
    written = write_sidecars(tmp_path, report=permutation_report)
    assert written == ["report.json", "report.html", "report.png"]
    assert json.loads((tmp_path / "report.json").read_text())["method"] == "mudsc"
    assert (tmp_path / "report.png").read_bytes().startswith(PNG_MAGIC)


def test_a_report_that_cannot_be_drawn_does_not_fail_the_merge(tmp_path: Path) -> None:
    written = write_sidecars(tmp_path, report={"groups": {"g": "not a mapping"}, "objective_per_sweep": []})
    assert written == ["report.json"]  # the page is left out, with a warning; the merge stands
    assert not (tmp_path / "report.html").exists()


def test_report_text_is_escaped() -> None:
    page, _ = report_html.render({"method": "<script>x</script>", "notes": ["a <b> & c"], "metrics": {}})
    assert "<script>x" not in page and "&lt;script&gt;" in page and "a &lt;b&gt; &amp; c" in page


# --------------------------------------------------------------------------- in a real browser
def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    result = subprocess.run(["bash", str(REPO / "scripts" / "ensure_deps.sh"), "chromium"], capture_output=True)
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    pytest.skip(
        "Debian's chromium is not installed and could not be installed (scripts/ensure_deps.sh chromium: "
        f"{result.stderr.decode(errors='replace').strip()[-300:] or 'no apt-get or no root'})"
    )


class DevTools:
    """A minimal Chrome DevTools protocol client over one page target's websocket."""

    def __init__(self, url: str) -> None:
        from websockets.sync.client import connect

        self.socket = connect(url, max_size=64 * 2**20, open_timeout=20)
        self.next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")


@pytest.fixture(scope="module")
def browser() -> Iterator[DevTools]:
    binary = _chromium()
    profile = Path(tempfile.mkdtemp(prefix="mudsc-chromium-"))
    process = subprocess.Popen(
        [
            binary,
            "--headless",
            "--no-sandbox",  # tests may run as root, where chromium's sandbox refuses to start
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if process.poll() is not None or time.monotonic() > deadline:
                stderr = process.stderr.read().decode(errors="replace")[-1000:] if process.stderr else ""
                pytest.fail(f"chromium did not open its DevTools port: {stderr}")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        import httpx

        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t.get("type") == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        tools.call("Page.enable")
        tools.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        yield tools
        tools.socket.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)


_PAGE_STATE = """
new Promise(resolve => {
  const done = () => resolve({
    images: [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})),
    tables: [...document.querySelectorAll('table')].map(t => t.rows.length),
    visibleTables: [...document.querySelectorAll('table')].filter(t => t.getBoundingClientRect().height > 0).length,
    title: document.title,
  });
  if (document.readyState === 'complete') done(); else window.addEventListener('load', done);
})
"""


def _show(browser: DevTools, page: Path) -> dict[str, Any]:
    browser.call("Page.navigate", url=page.as_uri())
    deadline = time.monotonic() + 30
    while browser.evaluate("document.readyState") != "complete" or browser.evaluate("location.href") != page.as_uri():
        assert time.monotonic() < deadline, "the page did not load"
        time.sleep(0.1)
    state: dict[str, Any] = browser.evaluate(_PAGE_STATE)
    shots = os.environ.get("MUDSC_REPORT_SCREENSHOTS")  # a folder: keep what the browser showed, to look at
    if shots:
        shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        Path(shots).mkdir(parents=True, exist_ok=True)
        (Path(shots) / (page.parent.name + ".png")).write_bytes(base64.b64decode(shot["data"]))
    return state


@pytest.mark.parametrize("kind", ["permutation", "same_base"])
def test_chromium_shows_the_report_images_and_tables(
    kind: str, browser: DevTools, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    report = request.getfixturevalue(f"{kind}_report")
    folder = tmp_path / kind
    folder.mkdir()
    write_sidecars(folder, report=report)
    state = _show(browser, folder / "report.html")
    assert re.match(r"merge report: (mudsc|ties)", state["title"])
    assert state["images"] and all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in state["images"])
    assert len(state["tables"]) >= 3 and all(rows > 0 for rows in state["tables"])
    assert state["visibleTables"] == len(state["tables"])
