"""The durable queue of instances to send: one SQLite database in WAL mode.

Every instance Orthanc stores gets a row here before the store callback
returns. A row moves pending → inflight → sent, or to failed with a reason.
A claim holds its rows for a lease: rows a worker never finished (it hung, or
a write failed) are due again when the lease ends, while Orthanc runs; inflight
rows found at start-up were interrupted by a crash and go back to pending.
Sent rows stay for a retention period (the forwarding status of a study, and
a re-stored instance told from a new one), then are pruned; the counts stay
exact because they are kept in a tally that triggers maintain, never counted.

`Outbox` is the contract the workers and the REST routes use, so that a
PostgreSQL implementation can take over when several Orthanc nodes share one
index; tests/contract runs the same tests against every implementation.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .errors import StoreUnavailable
from .state_file import Migration, StateFile

__all__ = ["STATES", "Outbox", "QueuedInstance", "Retry", "SqliteOutbox", "StoreUnavailable"]

SCHEMA_VERSION = 3
_R = TypeVar("_R", bound="Row")

_TALLY = """
CREATE TABLE IF NOT EXISTS tally (
    name TEXT PRIMARY KEY,
    n    INTEGER NOT NULL
);
INSERT OR IGNORE INTO tally (name, n) VALUES
    ('pending', 0), ('inflight', 0), ('sent', 0), ('failed', 0), ('pruned', 0), ('deleted', 0);
CREATE TRIGGER IF NOT EXISTS tally_insert AFTER INSERT ON instances BEGIN
    UPDATE tally SET n = n + 1 WHERE name = new.state;
END;
CREATE TRIGGER IF NOT EXISTS tally_update AFTER UPDATE OF state ON instances
    WHEN old.state != new.state BEGIN
    UPDATE tally SET n = n - 1 WHERE name = old.state;
    UPDATE tally SET n = n + 1 WHERE name = new.state;
END;
CREATE TRIGGER IF NOT EXISTS tally_delete AFTER DELETE ON instances BEGIN
    UPDATE tally SET n = n - 1 WHERE name = old.state;
END;
"""

# size 0: not known (a file is never empty); such an instance travels alone.
# lease_until: while inflight, when the claim ends if no worker finished it.
# file_uuid: where Orthanc's storage folder held the file when it was queued; NULL: not known.
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS instances (
    orthanc_id   TEXT PRIMARY KEY,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'inflight', 'sent', 'failed')),
    size         INTEGER NOT NULL DEFAULT 0,
    sop_uid      TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    queued_at    REAL NOT NULL,
    next_attempt REAL NOT NULL,
    alone        INTEGER NOT NULL DEFAULT 0,
    restored     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    done_at      REAL,
    lease_until  REAL,
    file_uuid    TEXT
);
CREATE INDEX IF NOT EXISTS instances_due ON instances (state, next_attempt);
CREATE INDEX IF NOT EXISTS instances_done ON instances (state, done_at);
"""
    + _TALLY
)


def _v1_to_v2(db: sqlite3.Connection) -> None:
    """Leases, the index of finished rows, and the tally, filled once from the rows."""
    db.execute("ALTER TABLE instances ADD COLUMN lease_until REAL")
    db.execute("CREATE INDEX instances_done ON instances (state, done_at)")
    for statement in _statements(_TALLY):
        db.execute(statement)
    db.execute(
        "UPDATE tally SET n = (SELECT COUNT(*) FROM instances WHERE state = tally.name)"
        " WHERE name IN ('pending', 'inflight', 'sent', 'failed')"
    )


def _statements(script: str) -> list[str]:
    """The statements of a script whose triggers end with END; (for `execute`, one by one)."""
    parts: list[str] = []
    current = ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \n;"):
                parts.append(current.strip())
            current = ""
    return parts


def _v2_to_v3(db: sqlite3.Connection) -> None:
    """Where each file is in Orthanc's storage folder (rows queued before: not known)."""
    db.execute("ALTER TABLE instances ADD COLUMN file_uuid TEXT")


_MIGRATIONS: dict[int, Migration] = {1: _v1_to_v2, 2: _v2_to_v3}

# Rows make_due changes per transaction: the store callback waits for one step at most,
# never for the whole queue.
_CHUNK = 500

STATES = ("pending", "inflight", "sent", "failed")
COUNTED = (*STATES, "deleted")
"""What `counts()` names: the states, and the instances Orthanc deleted before they were sent."""


@dataclass(frozen=True)
class QueuedInstance:
    orthanc_id: str
    state: str
    size: int
    sop_uid: str | None
    attempts: int
    queued_at: float
    next_attempt: float
    alone: bool
    last_error: str | None
    done_at: float | None
    file_uuid: str | None = None  # the file's name in Orthanc's storage folder, if known

    def as_json(self) -> dict[str, object]:
        return {
            "ID": self.orthanc_id,
            "SOPInstanceUID": self.sop_uid,
            "State": self.state,
            "Attempts": self.attempts,
            "QueuedAt": self.queued_at,
            "NextAttempt": self.next_attempt if self.state == "pending" else None,
            "LastError": self.last_error,
            "DoneAt": self.done_at,
        }


@dataclass(frozen=True)
class Retry:
    orthanc_id: str
    delay: float
    error: str
    alone: bool = False
    counts_as_attempt: bool = True


class Outbox(Protocol):
    """The queue of instances to send: the contract every back-end keeps.

    A row moves pending -> inflight (claimed, with a lease) -> sent, or to failed with a
    reason. Times are seconds on the caller's clock. Every method may raise
    `StoreUnavailable`; a call that raised changed nothing.
    """

    def enqueue(
        self,
        items: Iterable[tuple[str, int]],
        *,
        now: float,
        requeue: bool,
        files: Mapping[str, str] | None = None,
    ) -> int:
        """Queue (Orthanc id, size in bytes; 0 when not known) pairs; the count of rows changed.

        `files` names, by Orthanc id, where some of these files are in Orthanc's storage
        folder (the attachment's UUID), for a worker to read them there.

        `requeue` resets rows already sent or failed (a file stored again); without it rows
        already known are left alone (the reconciler). A row in flight stays with its worker
        and goes back to pending after its verdict.
        """
        ...

    def claim(
        self,
        *,
        now: float,
        lease: float,
        max_count: int,
        max_bytes: int,
        linger: float = 0.0,
        due_by: float | None = None,
    ) -> list[QueuedInstance]:
        """Take the longest-waiting due instances for one request; they are in flight.

        At most `max_count`, and at most `max_bytes` unless one instance alone is larger. A
        batch that is not full is taken only once its oldest instance has been queued for
        `linger` seconds (a backlog made due after an outage goes at once). An instance marked
        `alone`, or of unknown size (0), travels alone.
        The rows stay claimed until `now + lease`: rows whose lease ended unfinished are
        due again first. `due_by` (default `now`) takes instances due until then, before
        their backoff ends (a probe).
        """
        ...

    def mark_sent(
        self, orthanc_ids: Sequence[str], *, now: float, sop_uids: Mapping[str, str] | None = None
    ) -> None:
        """KHEOPS confirmed these instances: sent, one more attempt, no error.

        `sop_uids` (by Orthanc id) are recorded in the same write: the UIDs read from files
        whose row had none (the store callback queues an id and a size only).
        """
        ...

    def mark_failed(self, reasons: Mapping[str, str], *, now: float) -> None:
        """These instances cannot be sent: failed with their reason, until someone retries."""
        ...

    def reschedule(self, retries: Sequence[Retry], *, now: float) -> None:
        """Claimed instances wait `delay` and are tried again; a row not in flight is kept."""
        ...

    def release(self, orthanc_ids: Sequence[str]) -> None:
        """Claimed instances go back to pending untouched (shutdown, paused sending)."""
        ...

    def set_sop_uids(self, uids: Mapping[str, str]) -> None:
        """Remember the SOP Instance UID read from each file (for the queue listing)."""
        ...

    def recover_interrupted(self) -> int:
        """At start-up: rows in flight when the process died are pending again; how many."""
        ...

    def make_due(self, *, now: float) -> int:
        """KHEOPS is back: every waiting instance is due now; how many were waiting.

        Done in small steps: the store callback never waits for the whole queue.
        """
        ...

    def forget_deleted(self, orthanc_ids: Sequence[str]) -> int:
        """Orthanc deleted these instances: unsent ones (pending, failed) leave the queue.

        They are counted under "deleted" in `counts()`. Sent rows leave too, still counted as
        sent (as pruned rows are), so that the instance is sent again if it is stored again
        (Orthanc gives it the same id); inflight rows stay with their worker. Returns how many
        unsent rows left.
        """
        ...

    def prune_sent(self, *, before: float, limit: int) -> int:
        """Delete at most `limit` rows sent before `before`; `counts()` still counts them."""
        ...

    def retry_failed(self, orthanc_ids: Sequence[str] | None, *, now: float) -> int:
        """Failed instances (all, or those named) are pending again with no attempts."""
        ...

    def counts(self) -> dict[str, int]:
        """How many instances are in each state of `COUNTED`, read without counting rows.

        "sent" includes pruned rows: it is every instance ever sent from this queue.
        """
        ...

    def next_due(self) -> float | None:
        """When the earliest pending instance is due; None when nothing is pending."""
        ...

    def entries(self, state: str, *, limit: int, offset: int = 0) -> list[QueuedInstance]:
        """One page of a state: pending by due time, others most recently finished first."""
        ...

    def lookup(self, orthanc_ids: Sequence[str]) -> dict[str, QueuedInstance]:
        """The rows of these Orthanc ids, for those the outbox knows (any number of ids)."""
        ...

    def get_meta(self, key: str) -> object | None:
        """A JSON value kept with the queue (reconciler position, counters); None if unset."""
        ...

    def set_meta(self, key: str, value: object) -> None:
        """Keep a JSON value; None deletes the key."""
        ...

    def close(self) -> None:
        """Release the store; the object is not used afterwards."""
        ...


class SqliteOutbox:
    """Outbox in a local SQLite file (see `StateFile` for how it is written and read).

    What a power cut could take from the last moments is found again in Orthanc's change
    log by the reconciler.
    """

    def __init__(self, path: Path) -> None:
        self._file = StateFile(path, schema=_SCHEMA, version=SCHEMA_VERSION, migrations=_MIGRATIONS)

    def enqueue(
        self,
        items: Iterable[tuple[str, int]],
        *,
        now: float,
        requeue: bool,
        files: Mapping[str, str] | None = None,
    ) -> int:
        """Queue instances; `requeue` also resets rows already sent or failed (a re-stored file).

        A row in flight is marked `restored` instead: the file being sent may be the old
        one, so whatever the verdict, the instance goes back to pending afterwards.
        """
        where = files or {}
        rows = [(orthanc_id, size, where.get(orthanc_id), now, now) for orthanc_id, size in items]
        if requeue:
            sql = (
                "INSERT INTO instances (orthanc_id, state, size, file_uuid, queued_at,"
                " next_attempt) VALUES (?, 'pending', ?, ?, ?, ?)"
                " ON CONFLICT (orthanc_id) DO UPDATE SET"
                " restored = CASE WHEN state = 'inflight' THEN 1 ELSE 0 END,"
                " state = CASE WHEN state = 'inflight' THEN 'inflight' ELSE 'pending' END,"
                " size = excluded.size, file_uuid = excluded.file_uuid, attempts = 0,"
                " queued_at = excluded.queued_at, next_attempt = excluded.next_attempt,"
                " alone = 0, last_error = NULL, done_at = NULL"
            )
        else:
            sql = (
                "INSERT OR IGNORE INTO instances (orthanc_id, state, size, file_uuid, queued_at,"
                " next_attempt) VALUES (?, 'pending', ?, ?, ?, ?)"
            )
        if len(rows) == 1:
            return self._file.write_one(sql, rows[0])
        with self._file.transaction() as db:
            # rowcount sums what each statement changed (not what the tally triggers do).
            return db.executemany(sql, rows).rowcount

    def claim(
        self,
        *,
        now: float,
        lease: float,
        max_count: int,
        max_bytes: int,
        linger: float = 0.0,
        due_by: float | None = None,
    ) -> list[QueuedInstance]:
        """Take due instances for one request (see `Outbox.claim`)."""
        with self._file.transaction() as db:
            db.execute(
                "UPDATE instances SET state = 'pending', restored = 0, lease_until = NULL"
                " WHERE state = 'inflight' AND lease_until <= ?",
                (now,),
            )
            candidates = db.execute(
                "SELECT * FROM instances WHERE state = 'pending' AND next_attempt <= ?"
                " ORDER BY next_attempt LIMIT ?",
                (now if due_by is None else due_by, max_count),
            ).fetchall()
            chosen = choose_batch(
                candidates, now=now, max_count=max_count, max_bytes=max_bytes, linger=linger
            )
            if not chosen:
                return []
            db.execute(
                "UPDATE instances SET state = 'inflight', lease_until = ?"
                f" WHERE orthanc_id IN {_EACH_ID}",
                (now + lease, json.dumps([row["orthanc_id"] for row in chosen])),
            )
        return [_instance(row, state="inflight") for row in chosen]

    def mark_sent(
        self, orthanc_ids: Sequence[str], *, now: float, sop_uids: Mapping[str, str] | None = None
    ) -> None:
        uids = sop_uids or {}
        given = {orthanc_id: uids.get(orthanc_id) for orthanc_id in orthanc_ids}
        with self._file.transaction() as db:
            db.execute(
                _DONE.format(state="sent")
                + ", last_error = NULL, sop_uid = COALESCE(given.uid, instances.sop_uid)"
                " FROM (SELECT key AS id, value AS uid FROM json_each(?)) AS given"
                " WHERE instances.orthanc_id = given.id",
                (now, now, json.dumps(given)),
            )

    def mark_failed(self, reasons: Mapping[str, str], *, now: float) -> None:
        with self._file.transaction() as db:
            db.executemany(
                _DONE.format(state="failed")
                + ", last_error = CASE WHEN restored = 1 THEN NULL ELSE ? END WHERE orthanc_id = ?",
                [(now, now, reason, orthanc_id) for orthanc_id, reason in reasons.items()],
            )

    def reschedule(self, retries: Sequence[Retry], *, now: float) -> None:
        """Put claimed instances back to wait; rows no longer in flight keep their outcome."""
        with self._file.transaction() as db:
            attempts = 0
            for r in retries:
                moved = db.execute(
                    "UPDATE instances SET state = 'pending', next_attempt = ?, last_error = ?,"
                    " alone = ?, attempts = attempts + ?, restored = 0, lease_until = NULL"
                    " WHERE orthanc_id = ? AND state = 'inflight'",
                    (now + r.delay, r.error, int(r.alone), int(r.counts_as_attempt), r.orthanc_id),
                ).rowcount
                if moved and r.counts_as_attempt:
                    attempts += 1
            if attempts:
                self._add(db, "retries", attempts)

    def release(self, orthanc_ids: Sequence[str]) -> None:
        """Put claimed instances back untouched (shutdown, paused token)."""
        with self._file.transaction() as db:
            db.executemany(
                "UPDATE instances SET state = 'pending', restored = 0, lease_until = NULL"
                " WHERE orthanc_id = ? AND state = 'inflight'",
                [(orthanc_id,) for orthanc_id in orthanc_ids],
            )

    def set_sop_uids(self, uids: Mapping[str, str]) -> None:
        with self._file.transaction() as db:
            db.executemany(
                "UPDATE instances SET sop_uid = ? WHERE orthanc_id = ?",
                [(uid, orthanc_id) for orthanc_id, uid in uids.items()],
            )

    def recover_interrupted(self) -> int:
        """At start-up: what was in flight when the process died is pending again."""
        with self._file.transaction() as db:
            return db.execute(
                "UPDATE instances SET state = 'pending', restored = 0, lease_until = NULL"
                " WHERE state = 'inflight'"
            ).rowcount

    def make_due(self, *, now: float) -> int:
        """KHEOPS is back: every waiting instance is tried now rather than after its backoff."""
        total = 0
        while True:
            with self._file.transaction() as db:
                moved = db.execute(
                    "UPDATE instances SET next_attempt = ?1 WHERE orthanc_id IN"
                    " (SELECT orthanc_id FROM instances"
                    "  WHERE state = 'pending' AND next_attempt > ?1 LIMIT ?2)",
                    (now, _CHUNK),
                ).rowcount
            total += moved
            if moved < _CHUNK:
                return total
            time.sleep(0)  # let a waiting writer (the store callback) take the lock first

    def forget_deleted(self, orthanc_ids: Sequence[str]) -> int:
        with self._file.transaction() as db:
            gone = 0
            for orthanc_id in orthanc_ids:
                gone += db.execute(
                    "DELETE FROM instances WHERE orthanc_id = ? AND state IN ('pending', 'failed')",
                    (orthanc_id,),
                ).rowcount
            if gone:
                db.execute("UPDATE tally SET n = n + ? WHERE name = 'deleted'", (gone,))
            sent = 0
            for orthanc_id in orthanc_ids:
                sent += db.execute(
                    "DELETE FROM instances WHERE orthanc_id = ? AND state = 'sent'", (orthanc_id,)
                ).rowcount
            if sent:
                db.execute("UPDATE tally SET n = n + ? WHERE name = 'pruned'", (sent,))
            return gone

    def prune_sent(self, *, before: float, limit: int) -> int:
        with self._file.transaction() as db:
            gone = db.execute(
                "DELETE FROM instances WHERE orthanc_id IN (SELECT orthanc_id FROM instances"
                " WHERE state = 'sent' AND done_at < ? LIMIT ?)",
                (before, limit),
            ).rowcount
            if gone:
                db.execute("UPDATE tally SET n = n + ? WHERE name = 'pruned'", (gone,))
            return gone

    def retry_failed(self, orthanc_ids: Sequence[str] | None, *, now: float) -> int:
        with self._file.transaction() as db:
            if orthanc_ids is None:
                return db.execute(
                    "UPDATE instances SET state = 'pending', next_attempt = ?, attempts = 0,"
                    " queued_at = ?, alone = 0, done_at = NULL WHERE state = 'failed'",
                    (now, now),
                ).rowcount
            moved = 0
            for orthanc_id in orthanc_ids:
                moved += db.execute(
                    "UPDATE instances SET state = 'pending', next_attempt = ?, attempts = 0,"
                    " queued_at = ?, alone = 0, done_at = NULL"
                    " WHERE state = 'failed' AND orthanc_id = ?",
                    (now, now, orthanc_id),
                ).rowcount
            return moved

    def counts(self) -> dict[str, int]:
        with self._file.read() as db:
            tally = {row["name"]: row["n"] for row in db.execute("SELECT name, n FROM tally")}
        counts = {name: tally.get(name, 0) for name in COUNTED}
        counts["sent"] += tally.get("pruned", 0)
        return counts

    def next_due(self) -> float | None:
        with self._file.read() as db:
            row = db.execute(
                "SELECT MIN(next_attempt) AS due FROM instances WHERE state = 'pending'"
            ).fetchone()
        return None if row["due"] is None else float(row["due"])

    def entries(self, state: str, *, limit: int, offset: int = 0) -> list[QueuedInstance]:
        order = "next_attempt" if state == "pending" else "done_at DESC"
        with self._file.read() as db:
            rows = db.execute(
                f"SELECT * FROM instances WHERE state = ? ORDER BY {order} LIMIT ? OFFSET ?",
                (state, limit, offset),
            ).fetchall()
        return [_instance(row) for row in rows]

    def lookup(self, orthanc_ids: Sequence[str]) -> dict[str, QueuedInstance]:
        found: dict[str, QueuedInstance] = {}
        with self._file.read() as db:
            for start in range(0, len(orthanc_ids), 500):
                chunk = list(orthanc_ids[start : start + 500])
                marks = ",".join("?" * len(chunk))
                for row in db.execute(
                    f"SELECT * FROM instances WHERE orthanc_id IN ({marks})", chunk
                ):
                    found[row["orthanc_id"]] = _instance(row)
        return found

    def get_meta(self, key: str) -> object | None:
        return self._file.get_meta(key)

    def set_meta(self, key: str, value: object) -> None:
        self._file.set_meta(key, value)

    @staticmethod
    def _add(db: sqlite3.Connection, key: str, amount: int) -> None:
        db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + ?",
            (key, json.dumps(amount), amount),
        )

    def close(self) -> None:
        self._file.close()


class Row(Protocol):
    """A row of either back-end, read by column name."""

    def __getitem__(self, key: str) -> Any: ...


def choose_batch(
    candidates: Sequence[_R], *, now: float, max_count: int, max_bytes: int, linger: float
) -> list[_R]:
    """The rows of one request among due candidates (oldest first); [] to linger.

    A row marked `alone` (a retry after a 400) or of unknown size (0) goes in a request of its
    own; the bytes limit stops a batch unless it would be empty. A batch stopped by the count,
    the bytes or a lone row is full: waiting cannot make it bigger. One that is not full waits
    until its oldest row has been queued for `linger` seconds, for instances still to come.
    """
    chosen: list[_R] = []
    total = 0
    for row in candidates:
        if row["alone"] or row["size"] <= 0:
            if not chosen:
                chosen.append(row)
            break
        if chosen and total + row["size"] > max_bytes:
            break
        chosen.append(row)
        total += row["size"]
    full = (
        len(chosen) == max_count
        or len(chosen) < len(candidates)
        or any(row["alone"] or row["size"] <= 0 for row in chosen)
    )
    if not chosen or full:
        return chosen
    # Since it was queued, or since it was due when that is earlier (a clock stepped back).
    waited_since = min(min(row["queued_at"], row["next_attempt"]) for row in chosen)
    return [] if waited_since > now - linger else chosen


# A batch's rows are changed in one statement, their ids in a JSON array. Every statement SQLite
# runs gives the GIL away and takes it back, which can wait for another worker (a read holds
# the GIL): with one statement per row, a claim or a verdict of 100 rows took 10-60 ms in a
# drain, and the drain of 2000 instances of 64 KiB 0.46 s instead of 0.25 s.
_EACH_ID = "(SELECT value FROM json_each(?))"

# A verdict (its first two parameters: the done time, the due time):
# a row whose file Orthanc stored again while the old one was being sent is pending again,
# so that the new file is sent.
_DONE = (
    "UPDATE instances SET"
    " state = CASE WHEN restored = 1 THEN 'pending' ELSE '{state}' END,"
    " done_at = CASE WHEN restored = 1 THEN NULL ELSE ? END,"
    " next_attempt = CASE WHEN restored = 1 THEN ? ELSE next_attempt END,"
    " attempts = CASE WHEN restored = 1 THEN 0 ELSE attempts + 1 END,"
    " restored = 0, lease_until = NULL"
)


def _instance(row: sqlite3.Row, *, state: str | None = None) -> QueuedInstance:
    return QueuedInstance(
        orthanc_id=row["orthanc_id"],
        state=state or row["state"],
        size=row["size"],
        sop_uid=row["sop_uid"],
        attempts=row["attempts"],
        queued_at=row["queued_at"],
        next_attempt=row["next_attempt"],
        alone=bool(row["alone"]),
        last_error=row["last_error"],
        done_at=row["done_at"],
        file_uuid=row["file_uuid"],
    )
