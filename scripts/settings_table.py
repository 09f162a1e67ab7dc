"""Print the configuration table of the README (Markdown) from ``mudsc_jobs.settings.Settings``.

    python scripts/settings_table.py                     # print it
    python scripts/settings_table.py --write README.md   # replace the table between the README's markers

Every field becomes one row: its environment variable (``MUDSC_<SECTION>__<FIELD>``), type, default and
description, so the README cannot drift from the code.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import BaseModel  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

from mudsc_jobs.settings import Settings  # noqa: E402

ENV_PREFIX = "MUDSC_"
DELIMITER = "__"


def _model_class(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def settings_fields(model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX) -> Iterator[tuple[str, FieldInfo]]:
    """(environment variable, field) for every leaf field, walking nested sections."""
    for name, field in model.model_fields.items():
        section = _model_class(field.annotation)
        if section is not None:
            yield from settings_fields(section, f"{prefix}{name.upper()}{DELIMITER}")
        else:
            yield f"{prefix}{name.upper()}", field


def env_names() -> set[str]:
    return {name for name, _ in settings_fields()}


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = text or str(annotation)
    text = re.sub(r"\b(typing|app\.settings)\.", "", text).replace("NoneType", "None")
    return text


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`" if value != "" else '`""`'


def _description(field: FieldInfo) -> str:
    text = field.description or ""
    return re.sub(r"\s*\(MUDSC_[A-Z0-9_]+(\*)?\)\s*$", "", text).replace("|", "\\|")


def table() -> str:
    rows = ["| environment variable | type | default | meaning |", "|---|---|---|---|"]
    for name, field in settings_fields():
        type_name = _type_name(field.annotation).replace("|", "\\|")
        rows.append(f"| `{name}` | {type_name} | {_default(field)} | {_description(field)} |")
    return "\n".join(rows)


START, END = "<!-- settings-table:start", "<!-- settings-table:end -->"


def replace_table(text: str) -> str:
    """``text`` with the part between the settings-table markers replaced by the current table."""
    start = text.index(START)
    body_start = text.index("\n", start) + 1
    end = text.index(END, body_start)
    return text[:body_start] + table() + "\n" + text[end:]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        target = Path(sys.argv[2])
        target.write_text(replace_table(target.read_text()))
    elif len(sys.argv) == 1:
        print(table())
    else:
        sys.exit("usage: python scripts/settings_table.py [--write README.md]")
