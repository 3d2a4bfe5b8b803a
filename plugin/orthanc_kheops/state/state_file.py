"""A durable state file: SQLite in WAL mode, with a schema version and JSON meta values.

One connection writes, inside `transaction()`, under a lock; another reads, inside
`read()`. In WAL mode readers do not block the writer, so status pages and metrics
never hold up the store callback. synchronous=NORMAL survives a crash or kill -9 of
Orthanc (the OS keeps what was written).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_META = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class StateFile:
    def __init__(self, path: Path, *, schema: str, version: int, private: bool = False) -> None:
        """Open (or create) the file; refuse one written with another schema version.

        `private` makes the file readable by its owner only, for files that hold tokens
        (SQLite gives its -wal and -shm files the same mode).
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        if private:
            path.touch(mode=0o600, exist_ok=True)
            os.chmod(path, 0o600)
        self._lock = threading.Lock()
        self._db = _connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_META + schema)
        self._read_lock = threading.Lock()
        self._reader = _connect(path)
        found = self.get_meta("schema_version")
        if found is None:
            self.set_meta("schema_version", version)
        elif found != version:
            self.close()
            raise RuntimeError(f"{path} has schema version {found}; this plugin reads {version}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The writing connection, in one immediate transaction, rolled back on error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def write_one(self, sql: str, parameters: tuple[object, ...]) -> int:
        """One statement, committed on its own; the count of rows it changed.

        SQLite makes a statement outside a transaction atomic by itself, so this is as durable
        as `transaction()` with a third of the round trips: for the store callback, which
        holds Orthanc's lock while it runs.
        """
        with self._lock:
            return self._db.execute(sql, parameters).rowcount

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The reading connection: it sees what was committed."""
        with self._read_lock:
            yield self._reader

    def get_meta(self, key: str) -> object | None:
        with self.read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row["value"])

    def set_meta(self, key: str, value: object) -> None:
        """Set a value; None deletes the key."""
        with self.transaction() as db:
            if value is None:
                db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, json.dumps(value)),
                )

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA busy_timeout=10000")
    db.execute("PRAGMA foreign_keys=ON")
    return db
