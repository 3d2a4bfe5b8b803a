"""Durable switching state: rules and share jobs, in their own SQLite file (WAL).

`rules` holds every rule, from orthanc.json (origin 'config', written again at each start)
and from REST (origin 'api'), as its JSON document, tokens in clear: the file is made
readable by its owner only. `shares` holds one row per (rule, series), whatever happens to
it; that row is the dedupe, so a series is shared into a rule's album once:

    pending --201--> shared
    pending --404 a few times, or another 4xx--> failed      (POST .../retry: pending again)
    pending --401/403--> pending, and the rule is marked failing: its jobs wait

Deleting a rule deletes its rows (ON DELETE CASCADE). Counters are derived from the rows.

Pending shares follow the rule in force: each row records what it was decided under (the
condition text the series matched, a digest of the destination token, the Orthanc id of the
instance that matched). Saving a rule with another destination drops its pending rows; the share
worker re-evaluates a row whose condition is not the rule's any more (see `Sharer`).

Schema versions: 1 had no decision columns; `_v1_to_v2` brings a version 1 file to 2, whose
pending rows then have no decision and are re-evaluated or dropped, never shared on trust.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .state_file import Migration, StateFile

SCHEMA_VERSION = 2
SHARE_STATES = ("pending", "shared", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rules (
    name              TEXT PRIMARY KEY,
    origin            TEXT NOT NULL CHECK (origin IN ('config', 'api')),
    document          TEXT NOT NULL,
    destination_album TEXT,
    source_album      TEXT,
    failing           TEXT,
    failing_since     REAL,
    last_error        TEXT,
    last_error_at     REAL,
    created_at        REAL NOT NULL,
    updated_at        REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS shares (
    rule         TEXT NOT NULL REFERENCES rules (name) ON DELETE CASCADE,
    study_uid    TEXT NOT NULL,
    series_uid   TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'shared', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    not_found    INTEGER NOT NULL DEFAULT 0,
    queued_at    REAL NOT NULL,
    next_attempt REAL NOT NULL,
    last_error   TEXT,
    done_at      REAL,
    condition    TEXT,
    destination  TEXT,
    instance_id  TEXT,
    PRIMARY KEY (rule, series_uid)
);
CREATE INDEX IF NOT EXISTS shares_due ON shares (state, next_attempt);
"""


def _v1_to_v2(db: sqlite3.Connection) -> None:
    """Version 2 records what each share job was decided under; version 1 jobs have none."""
    for column in ("condition", "destination", "instance_id"):
        db.execute(f"ALTER TABLE shares ADD COLUMN {column} TEXT")


_MIGRATIONS: dict[int, Migration] = {1: _v1_to_v2}


@dataclass(frozen=True)
class StoredRule:
    name: str
    origin: str
    document: Mapping[str, Any]
    destination_album: str | None
    source_album: str | None
    failing: str | None
    failing_since: float | None
    last_error: str | None
    last_error_at: float | None
    created_at: float
    updated_at: float

    def __repr__(self) -> str:  # the document holds tokens in clear
        return f"StoredRule({self.name!r}, origin={self.origin!r})"


@dataclass(frozen=True)
class ShareKey:
    rule: str
    study_uid: str
    series_uid: str


@dataclass(frozen=True)
class Decision:
    """What a share was decided under: it is made only while the rule in force still says so."""

    condition: str
    destination: str  # `destination_identity` of the token
    instance_id: str | None  # the Orthanc instance that matched, to evaluate the series again


@dataclass(frozen=True)
class ShareJob:
    key: ShareKey
    state: str
    attempts: int
    not_found: int
    queued_at: float
    next_attempt: float
    last_error: str | None
    decision: Decision | None = None  # None: decided before decisions were recorded


@dataclass(frozen=True)
class ShareCounts:
    pending: int = 0
    shared: int = 0
    failed: int = 0

    @property
    def matched(self) -> int:
        return self.pending + self.shared + self.failed


class RuleStore:
    """Rules and share jobs in their own state file (see `StateFile`), owner-only: it holds tokens."""

    def __init__(self, path: Path) -> None:
        self._file = StateFile(
            path, schema=_SCHEMA, version=SCHEMA_VERSION, migrations=_MIGRATIONS, private=True
        )
        # Held by `hold_rule` and by every change of a rule's document: one node per file.
        self._changing = threading.RLock()

    # -- rules ---------------------------------------------------------------------------

    def rules(self) -> list[StoredRule]:
        with self._file.read() as db:
            rows = db.execute("SELECT * FROM rules ORDER BY name").fetchall()
        return [_rule(row) for row in rows]

    def rule(self, name: str) -> StoredRule | None:
        with self._file.read() as db:
            row = db.execute("SELECT * FROM rules WHERE name = ?", (name,)).fetchone()
        return None if row is None else _rule(row)

    @contextmanager
    def hold_rule(self, name: str) -> Iterator[StoredRule | None]:
        """The rule as saved now, kept from being changed or deleted until the block ends.

        The share worker holds it from its last look at the rule to KHEOPS's answer, so that
        a change made meanwhile waits for the share instead of racing it.
        """
        with self._changing:
            yield self.rule(name)

    def save_rule(
        self,
        name: str,
        *,
        origin: str,
        document: Mapping[str, Any],
        albums: tuple[str, str] | None,
        now: float,
    ) -> int:
        """Create or replace a rule; it is no longer failing (its tokens were just checked).

        When the destination token changes, the rule's finished shares are forgotten, so that
        the series they were about are shared into the new album when they next grow; pending
        ones are dropped too (they were decided for the old album) unless the new token names
        the same album. Returns the pending shares dropped.
        """
        with self._changing, self._file.transaction() as db:
            return self._save(db, name, origin=origin, document=document, albums=albums, now=now)

    def _save(
        self,
        db: sqlite3.Connection,
        name: str,
        *,
        origin: str,
        document: Mapping[str, Any],
        albums: tuple[str, str] | None,
        now: float,
    ) -> int:
        old = db.execute("SELECT * FROM rules WHERE name = ?", (name,)).fetchone()
        previous = json.loads(old["document"]) if old is not None else {}
        dropped = 0
        old_token, new_token = previous.get("DestinationToken"), document.get("DestinationToken")
        if old is not None and old_token != new_token:
            if albums is not None and albums[0] == old["destination_album"]:
                # A new token of the same album: the pending decisions still hold.
                db.execute(
                    "UPDATE shares SET destination = ? WHERE rule = ? AND state = 'pending'"
                    " AND destination = ?",
                    (
                        destination_identity(str(new_token)),
                        name,
                        destination_identity(str(old_token)),
                    ),
                )
                db.execute("DELETE FROM shares WHERE rule = ? AND state != 'pending'", (name,))
            else:
                dropped = _drop_shares(db, name)
        if albums is None and old is not None and tokens(previous) == tokens(document):
            albums = (old["destination_album"], old["source_album"])
        destination, source = albums if albums is not None else (None, None)
        db.execute(
            "INSERT INTO rules (name, origin, document, destination_album, source_album,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET origin = excluded.origin,"
            " document = excluded.document, destination_album = excluded.destination_album,"
            " source_album = excluded.source_album, failing = NULL, failing_since = NULL,"
            " updated_at = excluded.updated_at",
            (name, origin, json.dumps(document), destination, source, now, now),
        )
        return int(dropped)

    def delete_rule(self, name: str) -> int | None:
        """Delete a rule and every share row of it; the pending ones dropped, None if no rule."""
        with self._changing, self._file.transaction() as db:
            dropped = _drop_shares(db, name)
            if db.execute("DELETE FROM rules WHERE name = ?", (name,)).rowcount == 0:
                return None
            return dropped

    def sync_config(self, documents: Mapping[str, Mapping[str, Any]], *, now: float) -> list[str]:
        """Make the config rules those of orthanc.json; returns the REST rules they replaced.

        A config rule left unchanged keeps its state; a changed one is saved again; one no longer
        in the configuration is deleted with its shares.
        """
        replaced: list[str] = []
        with self._changing, self._file.transaction() as db:
            existing = {
                row["name"]: row
                for row in db.execute("SELECT name, origin, document FROM rules").fetchall()
            }
            for name, row in existing.items():
                if row["origin"] == "config" and name not in documents:
                    db.execute("DELETE FROM rules WHERE name = ?", (name,))
            for name, document in documents.items():
                row = existing.get(name)
                if row is not None and row["origin"] == "api":
                    replaced.append(name)
                    db.execute("DELETE FROM rules WHERE name = ?", (name,))
                    row = None
                if row is not None and json.loads(row["document"]) == dict(document):
                    continue
                self._save(db, name, origin="config", document=document, albums=None, now=now)
        return replaced

    def set_albums(self, name: str, albums: tuple[str, str]) -> None:
        with self._file.transaction() as db:
            db.execute(
                "UPDATE rules SET destination_album = ?, source_album = ? WHERE name = ?",
                (*albums, name),
            )

    def set_failing(self, name: str, reason: str | None, *, now: float) -> None:
        """Mark a rule failing (its shares wait) with the reason, or clear it with None."""
        with self._file.transaction() as db:
            if reason is None:
                db.execute(
                    "UPDATE rules SET failing = NULL, failing_since = NULL WHERE name = ?", (name,)
                )
            else:
                db.execute(
                    "UPDATE rules SET failing = ?, failing_since = COALESCE(failing_since, ?),"
                    " last_error = ?, last_error_at = ? WHERE name = ?",
                    (reason, now, reason, now, name),
                )

    def note_error(self, name: str, error: str, *, now: float) -> None:
        with self._file.transaction() as db:
            db.execute(
                "UPDATE rules SET last_error = ?, last_error_at = ? WHERE name = ?",
                (error, now, name),
            )

    # -- shares --------------------------------------------------------------------------

    def add_shares(
        self, decided: Mapping[ShareKey, Decision], *, now: float, failed: str | None = None
    ) -> int:
        """Queue shares not seen before (the dedupe); returns how many are new.

        With `failed`, the rows are recorded failed at once with that reason (a series KHEOPS
        cannot share), so that the rule shows it.
        """
        rows = [_row(key, decision, now) for key, decision in decided.items()]
        state, error = ("failed", failed) if failed is not None else ("pending", None)
        with self._file.transaction() as db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO shares (rule, study_uid, series_uid, state, queued_at,"
                " next_attempt, condition, destination, instance_id, last_error, done_at)"
                f" SELECT ?1, ?2, ?3, '{state}', ?4, ?4, ?5, ?6, ?7, ?8, ?9 WHERE EXISTS"
                " (SELECT 1 FROM rules WHERE name = ?1)",
                [(*row, error, now if failed is not None else None) for row in rows],
            )
            new = db.total_changes - before
            if failed is not None:
                db.executemany(
                    "UPDATE rules SET last_error = ?, last_error_at = ? WHERE name = ?",
                    [(failed, now, name) for name in {key.rule for key in decided}],
                )
            return new

    def requeue_shares(self, decided: Mapping[ShareKey, Decision], *, now: float) -> int:
        """Queue shares now whatever their past (an administrator asked): returns how many.

        A rule deleted meanwhile gets nothing (its rows would be orphans).
        """
        rows = [_row(key, decision, now) for key, decision in decided.items()]
        with self._file.transaction() as db:
            before = db.total_changes
            db.executemany(
                "INSERT INTO shares (rule, study_uid, series_uid, state, queued_at, next_attempt,"
                " condition, destination, instance_id)"
                " SELECT ?1, ?2, ?3, 'pending', ?4, ?4, ?5, ?6, ?7"
                " WHERE EXISTS (SELECT 1 FROM rules WHERE name = ?1)"
                " ON CONFLICT (rule, series_uid) DO UPDATE SET"
                " state = 'pending', attempts = 0, not_found = 0, queued_at = excluded.queued_at,"
                " next_attempt = excluded.next_attempt, last_error = NULL, done_at = NULL,"
                " condition = excluded.condition, destination = excluded.destination,"
                " instance_id = excluded.instance_id",
                rows,
            )
            return db.total_changes - before

    def redecide(self, key: ShareKey, decision: Decision) -> None:
        """The series was evaluated again under the rule in force, and still matches."""
        with self._file.transaction() as db:
            db.execute(
                "UPDATE shares SET condition = ?, destination = ?, instance_id = ?"
                " WHERE rule = ? AND series_uid = ? AND state = 'pending'",
                (
                    decision.condition,
                    decision.destination,
                    decision.instance_id,
                    key.rule,
                    key.series_uid,
                ),
            )

    def drop_share(self, key: ShareKey) -> None:
        """Forget a pending share the rule in force no longer makes (a later match queues it)."""
        with self._file.transaction() as db:
            db.execute(
                "DELETE FROM shares WHERE rule = ? AND series_uid = ? AND state = 'pending'",
                (key.rule, key.series_uid),
            )

    def due_shares(self, rules: Collection[str], *, now: float, limit: int) -> list[ShareJob]:
        """Pending shares of the given rules whose time has come, oldest first."""
        if not rules:
            return []
        marks = ",".join("?" * len(rules))
        with self._file.read() as db:
            rows = db.execute(
                "SELECT * FROM shares WHERE state = 'pending' AND next_attempt <= ?"
                f" AND rule IN ({marks}) ORDER BY next_attempt LIMIT ?",
                (now, *rules, limit),
            ).fetchall()
        return [_job(row) for row in rows]

    def next_due(self, rules: Collection[str]) -> float | None:
        if not rules:
            return None
        marks = ",".join("?" * len(rules))
        with self._file.read() as db:
            row = db.execute(
                "SELECT MIN(next_attempt) AS due FROM shares WHERE state = 'pending'"
                f" AND rule IN ({marks})",
                tuple(rules),
            ).fetchone()
        return None if row["due"] is None else float(row["due"])

    def mark_shared(self, key: ShareKey, *, now: float) -> None:
        with self._file.transaction() as db:
            db.execute(
                "UPDATE shares SET state = 'shared', attempts = attempts + 1, done_at = ?,"
                " last_error = NULL WHERE rule = ? AND series_uid = ?",
                (now, key.rule, key.series_uid),
            )

    def reschedule(
        self, key: ShareKey, *, delay: float, error: str, not_found: bool, now: float
    ) -> None:
        with self._file.transaction() as db:
            db.execute(
                "UPDATE shares SET attempts = attempts + 1, not_found = not_found + ?,"
                " next_attempt = ?, last_error = ? WHERE rule = ? AND series_uid = ?",
                (int(not_found), now + delay, error, key.rule, key.series_uid),
            )

    def mark_failed(self, key: ShareKey, *, reason: str, now: float) -> None:
        with self._file.transaction() as db:
            db.execute(
                "UPDATE shares SET state = 'failed', attempts = attempts + 1, done_at = ?,"
                " last_error = ? WHERE rule = ? AND series_uid = ?",
                (now, reason, key.rule, key.series_uid),
            )
            db.execute(
                "UPDATE rules SET last_error = ?, last_error_at = ? WHERE name = ?",
                (reason, now, key.rule),
            )

    def retry(self, name: str, *, now: float) -> int:
        """The rule is no longer failing; its failed and waiting shares are due now."""
        with self._file.transaction() as db:
            db.execute(
                "UPDATE rules SET failing = NULL, failing_since = NULL WHERE name = ?", (name,)
            )
            return db.execute(
                "UPDATE shares SET state = 'pending', next_attempt = ?, not_found = 0,"
                " done_at = NULL WHERE rule = ? AND state IN ('pending', 'failed')",
                (now, name),
            ).rowcount

    def make_due(self, *, now: float) -> int:
        """KHEOPS is back: every waiting share is tried now rather than after its backoff."""
        with self._file.transaction() as db:
            return db.execute(
                "UPDATE shares SET next_attempt = ? WHERE state = 'pending' AND next_attempt > ?",
                (now, now),
            ).rowcount

    def shares(self, name: str, *, state: str, limit: int, offset: int = 0) -> list[ShareJob]:
        with self._file.read() as db:
            rows = db.execute(
                "SELECT * FROM shares WHERE rule = ? AND state = ?"
                " ORDER BY queued_at LIMIT ? OFFSET ?",
                (name, state, limit, offset),
            ).fetchall()
        return [_job(row) for row in rows]

    def counts(self) -> dict[str, ShareCounts]:
        """Share counts per rule name."""
        with self._file.read() as db:
            rows = db.execute(
                "SELECT rule, state, COUNT(*) AS n FROM shares GROUP BY rule, state"
            ).fetchall()
        grouped: dict[str, dict[str, int]] = {}
        for row in rows:
            grouped.setdefault(row["rule"], {})[row["state"]] = row["n"]
        return {name: ShareCounts(**states) for name, states in grouped.items()}

    # -- meta ----------------------------------------------------------------------------

    def get_meta(self, key: str) -> object | None:
        return self._file.get_meta(key)

    def set_meta(self, key: str, value: object) -> None:
        """Set a value; None deletes the key."""
        self._file.set_meta(key, value)

    def close(self) -> None:
        self._file.close()


def _drop_shares(db: sqlite3.Connection, name: str) -> int:
    """Forget every share row of a rule; the pending ones dropped."""
    pending = db.execute(
        "SELECT COUNT(*) FROM shares WHERE rule = ? AND state = 'pending'", (name,)
    ).fetchone()[0]
    db.execute("DELETE FROM shares WHERE rule = ?", (name,))
    return int(pending)


def _rule(row: sqlite3.Row) -> StoredRule:
    return StoredRule(
        name=row["name"],
        origin=row["origin"],
        document=json.loads(row["document"]),
        destination_album=row["destination_album"],
        source_album=row["source_album"],
        failing=row["failing"],
        failing_since=row["failing_since"],
        last_error=row["last_error"],
        last_error_at=row["last_error_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def tokens(document: Mapping[str, Any]) -> tuple[object, object]:
    """The two tokens of a rule document, to tell whether a change touches them."""
    return document.get("DestinationToken"), document.get("SourceToken")


def destination_identity(token: str) -> str:
    """A digest that tells destination tokens apart without keeping a second clear copy."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:32]


def _row(key: ShareKey, decision: Decision, now: float) -> tuple[object, ...]:
    return (
        key.rule,
        key.study_uid,
        key.series_uid,
        now,
        decision.condition,
        decision.destination,
        decision.instance_id,
    )


def _job(row: sqlite3.Row) -> ShareJob:
    condition = row["condition"]
    return ShareJob(
        key=ShareKey(row["rule"], row["study_uid"], row["series_uid"]),
        state=row["state"],
        attempts=row["attempts"],
        not_found=row["not_found"],
        queued_at=row["queued_at"],
        next_attempt=row["next_attempt"],
        last_error=row["last_error"],
        decision=None
        if condition is None
        else Decision(condition, row["destination"] or "", row["instance_id"]),
    )
