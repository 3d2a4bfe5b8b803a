"""What the SQLite back-end of the outbox adds to the contract: its file, WAL, versions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from orthanc_kheops.state.outbox import SCHEMA_VERSION, SqliteOutbox

T0 = 1_000_000.0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.sqlite3"


def test_a_committed_row_is_visible_to_another_connection_before_close(path: Path) -> None:
    writer = SqliteOutbox(path)
    try:
        writer.enqueue([("a", 1)], now=T0, requeue=True)
        reader = sqlite3.connect(path)
        try:
            rows = reader.execute("SELECT orthanc_id, state FROM instances").fetchall()
        finally:
            reader.close()
    finally:
        writer.close()

    assert rows == [("a", "pending")]


def test_the_outbox_file_uses_write_ahead_logging(path: Path) -> None:
    SqliteOutbox(path).close()

    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        connection.close()


def test_an_outbox_of_another_schema_version_is_refused(path: Path) -> None:
    first = SqliteOutbox(path)
    first.set_meta("schema_version", SCHEMA_VERSION + 1)
    first.close()

    with pytest.raises(RuntimeError, match=f"schema version {SCHEMA_VERSION + 1}"):
        SqliteOutbox(path)


def test_a_new_outbox_records_its_schema_version(path: Path) -> None:
    outbox = SqliteOutbox(path)
    assert outbox.get_meta("schema_version") == SCHEMA_VERSION
    outbox.close()
