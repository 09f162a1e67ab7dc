"""The one writer of a merged model folder's sidecar files, beside the weights.

Every output folder holds the weights (``model.safetensors`` or shards + index, written by
:mod:`mudsc_core.io`) and these, each written here only:

- ``config.json``: the model's config, copied from the base (or the first model that has one);
- ``spec.json``: the job spec that produced the folder;
- ``README.md``: a Hugging Face model card (method, parameters, models);
- ``report.json``: what the merge measured (the job's ``result.metrics`` come from it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mudsc_core.formats.hf_folder import CONFIG_NAME

SPEC_NAME = "spec.json"
CARD_NAME = "README.md"
REPORT_NAME = "report.json"


def write_sidecars(
    folder: Path,
    *,
    config_source: Path | None = None,
    spec: dict[str, Any] | None = None,
    card: str | None = None,
    report: dict[str, Any] | None = None,
) -> list[str]:
    """Write the given sidecars into ``folder``; returns the names written."""
    written = []
    if config_source is not None:
        shutil.copyfile(config_source, folder / CONFIG_NAME)
        written.append(CONFIG_NAME)
    if spec is not None:
        (folder / SPEC_NAME).write_text(json.dumps(spec, indent=2, default=str) + "\n", encoding="utf-8")
        written.append(SPEC_NAME)
    if card is not None:
        (folder / CARD_NAME).write_text(card, encoding="utf-8")
        written.append(CARD_NAME)
    if report is not None:
        (folder / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        written.append(REPORT_NAME)
    return written
