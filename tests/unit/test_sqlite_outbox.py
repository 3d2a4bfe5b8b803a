"""What the SQLite back-end of the outbox adds to the contract: its file, WAL, versions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from orthanc_kheops.state.outbox import SCHEMA_VERSION, SqliteOutbox, StoreUnavailable

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


def test_a_full_disk_is_raised_as_store_unavailable_and_changes_nothing(path: Path) -> None:
    outbox = SqliteOutbox(path)
    try:
        outbox.enqueue([("before", 1)], now=T0, requeue=True)
        writer = outbox._file._db
        pages = writer.execute("PRAGMA page_count").fetchone()[0]
        writer.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk full"

        with pytest.raises(StoreUnavailable, match="database or disk is full"):
            outbox.enqueue(
                [(f"id{n:05}-{'x' * 200}", 1) for n in range(2000)], now=T0, requeue=True
            )
        with pytest.raises(StoreUnavailable, match="database or disk is full"):
            outbox.enqueue([(f"one-{'x' * 5000}", 1)], now=T0, requeue=True)

        assert outbox.counts()["pending"] == 1
        writer.execute("PRAGMA max_page_count = 1073741823")
        assert outbox.enqueue([("after", 1)], now=T0, requeue=True) == 1
        assert outbox.counts()["pending"] == 2
    finally:
        outbox.close()
