"""A durable state file: SQLite in WAL mode, with a versioned schema and JSON meta values.

One connection writes, inside `transaction()`, under a lock; another reads, inside
`read()`. In WAL mode readers do not block the writer, so status pages and metrics
never hold up the store callback. synchronous=NORMAL survives a crash or kill -9 of
Orthanc (the OS keeps what was written).

A file written by an older release is migrated forward when it is opened, one version at a
time, each step in its own transaction (SQLite's DDL is transactional: a step that fails
leaves the file as it was). SQLite's own errors while reading or writing (disk full, I/O
error, read-only file) are raised as `StoreUnavailable`.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .errors import StoreUnavailable

log = logging.getLogger(__name__)

Migration = Callable[[sqlite3.Connection], None]
"""One step of a schema: from version N (its key in `migrations`) to N + 1, inside a
transaction; it must use `execute`, never `executescript` (which commits)."""

_META = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class StateFile:
    def __init__(
        self,
        path: Path,
        *,
        schema: str,
        version: int,
        migrations: Mapping[int, Migration] | None = None,
        private: bool = False,
    ) -> None:
        """Open (or create) the file at schema `version`, migrating an older file forward.

        `schema` creates a new file at `version`; `migrations[n]` takes a file from version n
        to n + 1. A file of a newer version than `version` is refused. `private` makes the
        file readable by its owner only, for files that hold tokens (SQLite gives its -wal
        and -shm files the same mode).
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        if private:
            path.touch(mode=0o600, exist_ok=True)
            os.chmod(path, 0o600)
        self._path = path
        self._lock = threading.Lock()
        self._db = _connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_META)
        self._read_lock = threading.Lock()
        self._reader = _connect(path)
        try:
            self._upgrade(schema, version, migrations or {})
        except BaseException:
            self.close()
            raise

    def _upgrade(self, schema: str, version: int, migrations: Mapping[int, Migration]) -> None:
        found = self.get_meta("schema_version")
        if found is None:
            self._db.executescript(schema)
            self.set_meta("schema_version", version)
            return
        if not isinstance(found, int) or found > version:
            raise RuntimeError(
                f"{self._path} has schema version {found}; this plugin reads {version} and"
                " older: it was written by a newer release of the plugin"
            )
        for step in range(found, version):
            if step not in migrations:
                raise RuntimeError(f"{self._path}: no migration from schema version {step}")
            with self.transaction() as db:
                migrations[step](db)
                db.execute(
                    "UPDATE meta SET value = ? WHERE key = 'schema_version'",
                    (json.dumps(step + 1),),
                )
            log.warning("%s: schema migrated from version %d to %d", self._path, step, step + 1)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The writing connection, in one immediate transaction, rolled back on error."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    # After some errors (a full disk) SQLite has already rolled back.
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"{self._path.name}: {exc}") from exc

    def write_one(self, sql: str, parameters: tuple[object, ...]) -> int:
        """One statement, committed on its own; the count of rows it changed.

        SQLite makes a statement outside a transaction atomic by itself, so this is as durable
        as `transaction()` with a third of the round trips: for the store callback, which
        holds Orthanc's lock while it runs.
        """
        with self._lock:
            try:
                return self._db.execute(sql, parameters).rowcount
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"{self._path.name}: {exc}") from exc

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The reading connection: it sees what was committed."""
        with self._read_lock:
            try:
                yield self._reader
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"{self._path.name}: {exc}") from exc

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
