"""State files written by older releases are migrated forward when the plugin opens them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from orthanc_kheops.state.outbox import SCHEMA_VERSION, SqliteOutbox
from orthanc_kheops.state.state_file import StateFile

V1_OUTBOX = Path(__file__).parent / "data" / "outbox-v1.sql"
T0 = 1_700_000_000.0
MB = 1024 * 1024


@pytest.fixture
def v1_file(tmp_path: Path) -> Path:
    """An outbox file exactly as the previous release left it."""
    path = tmp_path / "outbox.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(V1_OUTBOX.read_text(encoding="utf-8"))
    db.close()
    return path


def test_an_outbox_of_the_previous_release_keeps_every_row_and_its_state(v1_file: Path) -> None:
    outbox = SqliteOutbox(v1_file)
    try:
        rows = outbox.lookup(
            ["sent", "failed", "retrying", "inflight", "pending-stored", "pending-reconciled"]
        )
        counts = outbox.counts()
        version = outbox.get_meta("schema_version")
        kept = (outbox.get_meta("retries"), outbox.get_meta("last_change"))
    finally:
        outbox.close()

    assert version == SCHEMA_VERSION
    assert {k: v.state for k, v in rows.items()} == {
        "sent": "sent",
        "failed": "failed",
        "retrying": "pending",
        "inflight": "inflight",
        "pending-stored": "pending",
        "pending-reconciled": "pending",
    }
    assert rows["failed"].last_error == "KHEOPS refused it: not authorized (292)"
    assert rows["retrying"].attempts == 1
    assert counts == {"pending": 3, "inflight": 1, "sent": 1, "failed": 1, "deleted": 0}
    assert kept == (1, 42)


def test_a_migrated_outbox_works_as_a_new_one(v1_file: Path) -> None:
    outbox = SqliteOutbox(v1_file)
    try:
        assert outbox.recover_interrupted() == 1
        batches = []
        while batch := outbox.claim(now=T0 + 100, lease=60, max_count=50, max_bytes=32 * MB):
            batches.append([i.orthanc_id for i in batch])
            outbox.mark_sent(batches[-1], now=T0 + 101)
        pruned = outbox.prune_sent(before=T0 + 50, limit=10)
        counts = outbox.counts()
    finally:
        outbox.close()

    # The instance of unknown size (0, queued by the old reconciler) travels alone.
    assert batches == [["inflight", "pending-stored"], ["pending-reconciled"], ["retrying"]]
    assert pruned == 1  # the row the old release sent
    assert counts == {"pending": 0, "inflight": 0, "sent": 5, "failed": 1, "deleted": 0}


def test_rows_of_the_previous_release_do_not_know_where_their_file_is(v1_file: Path) -> None:
    outbox = SqliteOutbox(v1_file)
    try:
        outbox.enqueue([("new", 10)], now=T0, requeue=False, files={"new": "uuid-of-new"})
        rows = outbox.lookup(["pending-stored", "new"])
    finally:
        outbox.close()

    assert (rows["pending-stored"].file_uuid, rows["new"].file_uuid) == (None, "uuid-of-new")


def test_a_migrated_outbox_opens_again_without_migrating(v1_file: Path) -> None:
    SqliteOutbox(v1_file).close()

    outbox = SqliteOutbox(v1_file)
    try:
        assert outbox.counts()["pending"] == 3
    finally:
        outbox.close()


# --- the framework, for any state file --------------------------------------------------------


def _steps(db: sqlite3.Connection) -> list[tuple[str, int]]:
    return [(r[0], r[1]) for r in db.execute("SELECT name, version FROM steps ORDER BY rowid")]


SCHEMA_V3 = "CREATE TABLE steps (name TEXT, version INTEGER); CREATE TABLE extra (x INTEGER);"


def test_each_step_runs_once_in_order_from_the_version_found(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    StateFile(path, schema="CREATE TABLE steps (name TEXT, version INTEGER);", version=1).close()
    migrations = {
        1: lambda db: db.execute("INSERT INTO steps VALUES ('one', 1)"),
        2: lambda db: db.execute("CREATE TABLE extra (x INTEGER)"),
    }

    upgraded = StateFile(path, schema=SCHEMA_V3, version=3, migrations=migrations)
    try:
        with upgraded.read() as db:
            assert _steps(db) == [("one", 1)]
            assert db.execute("SELECT COUNT(*) FROM extra").fetchone()[0] == 0
        assert upgraded.get_meta("schema_version") == 3
    finally:
        upgraded.close()


def test_a_step_that_fails_leaves_the_file_at_the_version_it_reached(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    StateFile(path, schema="CREATE TABLE steps (name TEXT, version INTEGER);", version=1).close()

    def broken(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO steps VALUES ('half', 2)")
        raise sqlite3.IntegrityError("step 2 cannot finish")

    migrations = {1: lambda db: db.execute("INSERT INTO steps VALUES ('one', 1)"), 2: broken}
    with pytest.raises(sqlite3.IntegrityError):
        StateFile(path, schema=SCHEMA_V3, version=3, migrations=migrations)

    again = StateFile(path, schema="", version=2, migrations=migrations)
    try:
        with again.read() as db:
            assert _steps(db) == [("one", 1)]
    finally:
        again.close()


def test_a_file_of_a_newer_release_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    StateFile(path, schema="CREATE TABLE t (x INTEGER);", version=4).close()

    with pytest.raises(RuntimeError, match="schema version 4; this plugin reads 3 and older"):
        StateFile(path, schema="", version=3)


def test_a_missing_step_is_refused_before_anything_changes(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    StateFile(path, schema="CREATE TABLE t (x INTEGER);", version=1).close()

    with pytest.raises(RuntimeError, match="no migration from schema version 1"):
        StateFile(path, schema="", version=2)
