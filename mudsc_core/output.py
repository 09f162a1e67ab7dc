"""The one writer of a merged model folder's sidecar files, beside the weights.

Every output folder holds the weights (``model.safetensors`` or shards + index, written by
:mod:`mudsc_core.io`) and these, each written here only:

- ``config.json``: the model's config, copied from the base (or the first model that has one),
  its dtype field (``torch_dtype`` / ``dtype``, where the config has one) set to the output dtype;
- files carried over from one input folder so that the result loads as it is: the tokenizer's
  files, its chat template and the generation config (``output.tokenizer_source``);
- ``spec.json``: the job spec that produced the folder;
- ``README.md``: a Hugging Face model card (method, parameters, models, the mergekit equivalent);
- ``report.json``: what the merge measured (the job's ``result.metrics`` come from it);
- ``report.html`` and ``report.png``: the same report as a page to look at and its figure
  (:mod:`mudsc_core.report_html`, drawn with Pillow; skipped, with a warning, where rendering fails).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mudsc_core.formats import json_limits
from mudsc_core.formats.hf_folder import CONFIG_NAME, GENERATION_CONFIG_NAME, MAX_SIDECAR_BYTES, TOKENIZER_FILES

SPEC_NAME = "spec.json"
CARD_NAME = "README.md"
REPORT_NAME = "report.json"
_DTYPE_KEYS = ("torch_dtype", "dtype")  # transformers 4 writes the first, 5 the second
logger = logging.getLogger(__name__)


@contextmanager
def staged_folder(out_dir: Path) -> Iterator[tuple[Path, list[str]]]:
    """A hidden folder inside ``out_dir`` to write a result into, and the list of the file names written.

    When the block ends without an error, the listed files are moved into ``out_dir``; the hidden folder is
    removed either way, so a failed or canceled merge leaves nothing half-written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=out_dir))
    files: list[str] = []
    try:
        yield partial, files
        for name in files:
            os.replace(partial / name, out_dir / name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def write_sidecars(
    folder: Path,
    *,
    config_source: Path | Mapping[str, Any] | None = None,
    dtype: str | None = None,
    carried: Sequence[Path] = (),
    spec: dict[str, Any] | None = None,
    card: str | None = None,
    report: dict[str, Any] | None = None,
) -> list[str]:
    """Write the given sidecars into ``folder``; returns the names written."""
    written = []
    if config_source is not None:
        _write_config(config_source, folder / CONFIG_NAME, dtype)
        written.append(CONFIG_NAME)
    for path in carried:
        shutil.copyfile(path, folder / path.name)
        written.append(path.name)
    if spec is not None:
        (folder / SPEC_NAME).write_text(json.dumps(spec, indent=2, default=str) + "\n", encoding="utf-8")
        written.append(SPEC_NAME)
    if card is not None:
        (folder / CARD_NAME).write_text(card, encoding="utf-8")
        written.append(CARD_NAME)
    if report is not None:
        (folder / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        written.append(REPORT_NAME)
        written += _write_report_views(folder, report)
    return written


def _write_report_views(folder: Path, report: dict[str, Any]) -> list[str]:
    """``report.html`` and ``report.png``; a page that cannot be drawn never fails the merge it describes."""
    from mudsc_core import report_html

    try:
        page, png = report_html.render(report)
    except Exception as exc:  # noqa: BLE001 - Pillow missing or a report it cannot draw: the merge stands
        logger.warning("report.html not written: %s: %s", type(exc).__name__, exc)
        return []
    (folder / report_html.HTML_NAME).write_text(page, encoding="utf-8")
    (folder / report_html.PNG_NAME).write_bytes(png)
    return [report_html.HTML_NAME, report_html.PNG_NAME]


def carried_files(folder: Path | None) -> list[Path]:
    """The files a result takes from its tokenizer source folder (tokenizer, chat template, generation config)."""
    if folder is None or not folder.is_dir():
        return []
    wanted = TOKENIZER_FILES | {GENERATION_CONFIG_NAME}
    return sorted(p for p in folder.iterdir() if p.name in wanted and p.is_file())


def _write_config(source: Path | Mapping[str, Any], target: Path, dtype: str | None) -> None:
    """Write the config (a file's, or one given as a mapping) with its dtype field naming the output's: the
    keys it has (a mapping without one gets ``dtype``). A config file with nothing to change is copied as is."""
    if isinstance(source, Mapping):
        config: Any = dict(source)
        if dtype is not None and not any(k in config for k in _DTYPE_KEYS):
            config["dtype"] = dtype
    else:
        try:  # an untrusted document: bounded like every other one we parse
            config = json_limits.loads(source.read_bytes(), max_bytes=MAX_SIDECAR_BYTES, what="config.json")
        except json_limits.UntrustedJsonError:
            config = None
        if not isinstance(config, dict) or dtype is None or not any(k in config for k in _DTYPE_KEYS):
            shutil.copyfile(source, target)  # nothing to change: the file as it is
            return
    for key in _DTYPE_KEYS:
        if dtype is not None and key in config:
            config[key] = dtype
    target.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
