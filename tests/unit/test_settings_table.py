"""The README's table of settings states the defaults the schema gives, for every setting."""

from __future__ import annotations

import json
import re
from pathlib import Path

from orthanc_kheops.config import DEFAULTS
from orthanc_kheops.schemas import SCHEMA_DIRECTORY

README = Path(__file__).resolve().parents[2] / "README.md"
_ROW = re.compile(r"^\| `(?P<key>[A-Za-z]+)` \| (?P<default>[^|]+) \|", re.MULTILINE)


def _table() -> dict[str, str]:
    """Setting -> its default as the README shows it, from the table of "## Configuration"."""
    text = README.read_text()
    start = text.index("| key | default | meaning |")
    end = text.index("\n\n", start)
    return {m["key"]: m["default"].strip() for m in _ROW.finditer(text[start:end])}


def _shown(value: object) -> str:
    return f"`{value}`" if isinstance(value, str) else f"`{json.dumps(value)}`"


def test_every_setting_of_the_schema_has_a_row() -> None:
    schema = json.loads((SCHEMA_DIRECTORY / "kheops.schema.json").read_text())

    assert sorted(_table()) == sorted(schema["properties"])


def test_every_default_in_the_table_is_the_schemas() -> None:
    table = _table()

    assert {key: table[key] for key in DEFAULTS} == {
        key: _shown(value) for key, value in DEFAULTS.items()
    }
