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


def test_a_batch_is_claimed_and_marked_sent_in_as_many_statements_whatever_its_size(
    path: Path,
) -> None:
    """Every statement gives the GIL away and takes it back, which can wait for a worker
    reading a file: the rows of a batch are changed together, not one statement each."""
    outbox = SqliteOutbox(path)
    counts: dict[int, list[int]] = {}
    try:
        for size in (2, 100):
            ids = [f"{size}-{n}" for n in range(size)]
            outbox.enqueue([(orthanc_id, 1000) for orthanc_id in ids], now=T0, requeue=True)
            statements: list[str] = []
            outbox._file._db.set_trace_callback(statements.append)
            claimed = outbox.claim(now=T0, lease=300, max_count=size, max_bytes=1 << 30)
            claiming = len(statements)
            outbox.mark_sent(ids, now=T0, sop_uids=dict.fromkeys(ids, "1.2.3"))
            outbox._file._db.set_trace_callback(None)
            # Statements with their values bound: a trigger's run is traced as the statement
            # that fired it, with the same text; each row's own statement has its own values.
            counts[size] = [len(set(statements[:claiming])), len(set(statements[claiming:]))]
            assert sorted(i.orthanc_id for i in claimed) == sorted(ids)
        assert outbox.counts().get("sent") == 102
    finally:
        outbox.close()

    assert counts[100] == counts[2]
