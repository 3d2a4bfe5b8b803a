"""The outbox in the shared PostgreSQL database: every node's workers claim from one queue.

The contract is `Outbox`'s (see state/outbox.py). What several nodes add:

- A claim is `SELECT … FOR UPDATE SKIP LOCKED`: two nodes claiming at once take different
  rows, and neither waits for the other. A claimed row carries a lease: the claiming node's
  name and an expiry, at most `lease_seconds` (Kheops.LeaseSeconds) ahead, which the node's
  heartbeat renews (`renew_leases`) up to the end of the claim the worker asked for. A row
  whose lease expired belonged to a node that died, hung or lost its worker: the next claim,
  on any node, takes it back to pending first, so the work goes on without a restart.
- Only the node holding a lease puts the row back (`reschedule`, `release`), so a node that
  lost its lease cannot undo another node's claim; a verdict (`mark_sent`, `mark_failed`)
  is recorded whoever holds it, since it says what KHEOPS did.
- `recover_interrupted` at start-up takes back this node's own claims only; other nodes'
  claims are theirs until their leases expire.
- The store callback's enqueue is a single statement on an autocommit connection.
- `counts()` counts rows (an index-only scan) rather than keeping a tally row: one row that
  every node's every write updates would serialise the store callbacks of the whole site.
  Pruned and deleted rows are counted in `meta`, in the transaction that removes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from psycopg.types.json import Jsonb

from ..outbox import COUNTED, QueuedInstance, Retry, choose_batch
from .database import Connection, PgDatabase

_COLUMNS = (
    "orthanc_id, state, size, sop_uid, attempts, queued_at, next_attempt, alone, last_error,"
    " done_at, file_uuid"
)
_REQUEUE = (
    "INSERT INTO instances (orthanc_id, state, size, file_uuid, queued_at, next_attempt)"
    " {values} ON CONFLICT (orthanc_id) DO UPDATE SET"
    " restored = (instances.state = 'inflight'),"
    " state = CASE WHEN instances.state = 'inflight' THEN 'inflight' ELSE 'pending' END,"
    " size = excluded.size, file_uuid = excluded.file_uuid, attempts = 0,"
    " queued_at = excluded.queued_at, next_attempt = excluded.next_attempt, alone = false,"
    " last_error = NULL, done_at = NULL"
)
_ADD = (
    "INSERT INTO instances (orthanc_id, state, size, file_uuid, queued_at, next_attempt)"
    " {values} ON CONFLICT (orthanc_id) DO NOTHING"
)
_CHUNK = 500  # rows one write touches when it goes through the whole queue
_ONE = "VALUES (%s, 'pending', %s, %s, %s, %s)"
_MANY = (
    "SELECT id, 'pending', size, file, %s, %s"
    " FROM unnest(%s::text[], %s::bigint[], %s::text[]) AS t (id, size, file)"
)


class PgOutbox:
    def __init__(self, db: PgDatabase, *, node: str, lease_seconds: float) -> None:
        self._db = db
        self._node = node
        self._lease = lease_seconds

    def enqueue(
        self,
        items: Iterable[tuple[str, int]],
        *,
        now: float,
        requeue: bool,
        files: Mapping[str, str] | None = None,
    ) -> int:
        """Queue instances (see `SqliteOutbox.enqueue`); idempotent across nodes."""
        rows = dict(items)  # one statement cannot touch a row twice
        where = files or {}
        statement = _REQUEUE if requeue else _ADD
        if len(rows) == 1:
            ((orthanc_id, size),) = rows.items()
            return self._db.execute(
                statement.format(values=_ONE), (orthanc_id, size, where.get(orthanc_id), now, now)
            )
        if not rows:
            return 0
        return self._db.execute(
            statement.format(values=_MANY),
            (now, now, list(rows), list(rows.values()), [where.get(i) for i in rows]),
        )

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
        """Take due instances for one request (see `Outbox.claim`), with this node's lease."""
        with self._db.transaction() as db:
            _take_back_expired(db, now)
            candidates = db.execute(
                f"SELECT {_COLUMNS} FROM instances WHERE state = 'pending'"
                " AND next_attempt <= %s ORDER BY next_attempt LIMIT %s FOR UPDATE SKIP LOCKED",
                (now if due_by is None else due_by, max_count),
            ).fetchall()
            chosen = choose_batch(
                candidates, now=now, max_count=max_count, max_bytes=max_bytes, linger=linger
            )
            if chosen:
                db.execute(
                    "UPDATE instances SET state = 'inflight', lease_node = %s, lease_until = %s,"
                    " claim_ends = %s WHERE orthanc_id = ANY(%s)",
                    (
                        self._node,
                        now + min(lease, self._lease),
                        now + lease,
                        [row["orthanc_id"] for row in chosen],
                    ),
                )
        return [_instance(row, state="inflight") for row in chosen]

    def renew_leases(self, *, now: float) -> int:
        """This node is alive: its claims last another lease, up to the end of each claim."""
        return self._db.execute(
            "UPDATE instances SET lease_until = LEAST(%s, claim_ends)"
            " WHERE state = 'inflight' AND lease_node = %s",
            (now + self._lease, self._node),
        )

    def mark_sent(
        self, orthanc_ids: Sequence[str], *, now: float, sop_uids: Mapping[str, str] | None = None
    ) -> None:
        """Sent, unless Orthanc stored a new file meanwhile: then that one is pending."""
        uids = sop_uids or {}
        self._db.execute(
            "UPDATE instances AS i SET"
            " state = CASE WHEN i.restored THEN 'pending' ELSE 'sent' END,"
            " done_at = CASE WHEN i.restored THEN NULL ELSE %(now)s END,"
            " next_attempt = CASE WHEN i.restored THEN %(now)s ELSE i.next_attempt END,"
            " attempts = CASE WHEN i.restored THEN 0 ELSE i.attempts + 1 END,"
            " last_error = NULL, sop_uid = COALESCE(u.uid, i.sop_uid), restored = false,"
            " lease_node = NULL, lease_until = NULL, claim_ends = NULL"
            " FROM unnest(%(ids)s::text[], %(uids)s::text[]) AS u (id, uid)"
            " WHERE i.orthanc_id = u.id",
            {
                "now": now,
                "ids": list(orthanc_ids),
                "uids": [uids.get(orthanc_id) for orthanc_id in orthanc_ids],
            },
        )

    def mark_failed(self, reasons: Mapping[str, str], *, now: float) -> None:
        self._db.execute(
            "UPDATE instances AS i SET"
            " state = CASE WHEN i.restored THEN 'pending' ELSE 'failed' END,"
            " done_at = CASE WHEN i.restored THEN NULL ELSE %(now)s END,"
            " next_attempt = CASE WHEN i.restored THEN %(now)s ELSE i.next_attempt END,"
            " attempts = CASE WHEN i.restored THEN 0 ELSE i.attempts + 1 END,"
            " last_error = CASE WHEN i.restored THEN NULL ELSE r.reason END,"
            " restored = false, lease_node = NULL, lease_until = NULL, claim_ends = NULL"
            " FROM unnest(%(ids)s::text[], %(reasons)s::text[]) AS r (id, reason)"
            " WHERE i.orthanc_id = r.id",
            {"now": now, "ids": list(reasons), "reasons": list(reasons.values())},
        )

    def reschedule(self, retries: Sequence[Retry], *, now: float) -> None:
        """Put this node's claims back to wait; rows it no longer holds keep their state."""
        if not retries:
            return
        with self._db.transaction() as db:
            moved = db.execute(
                "UPDATE instances AS i SET state = 'pending', next_attempt = %s + r.delay,"
                " last_error = r.error, alone = r.alone, attempts = i.attempts + r.counts::int,"
                " restored = false, lease_node = NULL, lease_until = NULL, claim_ends = NULL"
                " FROM unnest(%s::text[], %s::float8[], %s::text[], %s::bool[], %s::bool[])"
                " AS r (id, delay, error, alone, counts)"
                " WHERE i.orthanc_id = r.id AND i.state = 'inflight' AND i.lease_node = %s"
                " RETURNING r.counts",
                (
                    now,
                    [r.orthanc_id for r in retries],
                    [r.delay for r in retries],
                    [r.error for r in retries],
                    [r.alone for r in retries],
                    [r.counts_as_attempt for r in retries],
                    self._node,
                ),
            ).fetchall()
            attempts = sum(1 for row in moved if row["counts"])
            if attempts:
                _add(db, "retries", attempts)

    def release(self, orthanc_ids: Sequence[str]) -> None:
        """Put this node's claims back untouched (shutdown, paused token)."""
        self._db.execute(
            "UPDATE instances SET state = 'pending', restored = false, lease_node = NULL,"
            " lease_until = NULL WHERE orthanc_id = ANY(%s) AND state = 'inflight'"
            " AND lease_node = %s",
            (list(orthanc_ids), self._node),
        )

    def set_sop_uids(self, uids: Mapping[str, str]) -> None:
        self._db.execute(
            "UPDATE instances AS i SET sop_uid = u.uid"
            " FROM unnest(%s::text[], %s::text[]) AS u (id, uid) WHERE i.orthanc_id = u.id",
            (list(uids), list(uids.values())),
        )

    def recover_interrupted(self) -> int:
        """At start-up: what this node had in flight when it died is pending again."""
        return self._db.execute(
            "UPDATE instances SET state = 'pending', restored = false, lease_node = NULL,"
            " lease_until = NULL WHERE state = 'inflight' AND lease_node = %s",
            (self._node,),
        )

    def make_due(self, *, now: float) -> int:
        """KHEOPS is back: every waiting instance is due now, in steps of `_CHUNK` rows."""
        total = 0
        while True:
            moved = self._db.execute(
                "UPDATE instances SET next_attempt = %(now)s WHERE orthanc_id IN"
                " (SELECT orthanc_id FROM instances WHERE state = 'pending'"
                " AND next_attempt > %(now)s LIMIT %(chunk)s FOR UPDATE SKIP LOCKED)",
                {"now": now, "chunk": _CHUNK},
            )
            total += moved
            if moved < _CHUNK:
                return total

    def forget_deleted(self, orthanc_ids: Sequence[str]) -> int:
        """Orthanc deleted these: unsent rows leave the queue, counted under "deleted"; sent
        rows leave too, still counted as sent (see `Outbox.forget_deleted`)."""
        with self._db.transaction() as db:
            gone = db.execute(
                "DELETE FROM instances WHERE orthanc_id = ANY(%s)"
                " AND state IN ('pending', 'failed')",
                (list(orthanc_ids),),
            ).rowcount
            if gone:
                _add(db, "deleted", gone)
            sent = db.execute(
                "DELETE FROM instances WHERE orthanc_id = ANY(%s) AND state = 'sent'",
                (list(orthanc_ids),),
            ).rowcount
            if sent:
                _add(db, "pruned", sent)
        return gone

    def prune_sent(self, *, before: float, limit: int) -> int:
        """Delete at most `limit` rows sent before `before`; `counts()` still counts them."""
        with self._db.transaction() as db:
            gone = db.execute(
                "DELETE FROM instances WHERE orthanc_id IN (SELECT orthanc_id FROM instances"
                " WHERE state = 'sent' AND done_at < %s LIMIT %s FOR UPDATE SKIP LOCKED)",
                (before, limit),
            ).rowcount
            if gone:
                _add(db, "pruned", gone)
        return gone

    def retry_failed(self, orthanc_ids: Sequence[str] | None, *, now: float) -> int:
        query = (
            "UPDATE instances SET state = 'pending', next_attempt = %s, attempts = 0,"
            " queued_at = %s, alone = false, done_at = NULL WHERE state = 'failed'"
        )
        if orthanc_ids is None:
            return self._db.execute(query, (now, now))
        return self._db.execute(query + " AND orthanc_id = ANY(%s)", (now, now, list(orthanc_ids)))

    def counts(self) -> dict[str, int]:
        rows = self._db.fetchall(
            "SELECT state, COUNT(*) AS n FROM instances GROUP BY state UNION ALL"
            " SELECT key, (value #>> '{}')::bigint FROM meta WHERE key IN ('pruned', 'deleted')"
        )
        found = {row["state"]: int(row["n"]) for row in rows}
        counts = {name: found.get(name, 0) for name in COUNTED}
        counts["sent"] += found.get("pruned", 0)
        return counts

    def next_due(self) -> float | None:
        row = self._db.fetchone(
            "SELECT MIN(next_attempt) AS due FROM instances WHERE state = 'pending'"
        )
        return None if row is None or row["due"] is None else float(row["due"])

    def entries(self, state: str, *, limit: int, offset: int = 0) -> list[QueuedInstance]:
        order = "next_attempt" if state == "pending" else "done_at DESC"
        rows = self._db.fetchall(
            f"SELECT {_COLUMNS} FROM instances WHERE state = %s"
            f" ORDER BY {order}, orthanc_id LIMIT %s OFFSET %s",
            (state, limit, offset),
        )
        return [_instance(row) for row in rows]

    def lookup(self, orthanc_ids: Sequence[str]) -> dict[str, QueuedInstance]:
        rows = self._db.fetchall(
            f"SELECT {_COLUMNS} FROM instances WHERE orthanc_id = ANY(%s)", (list(orthanc_ids),)
        )
        return {row["orthanc_id"]: _instance(row) for row in rows}

    def get_meta(self, key: str) -> object | None:
        return get_meta(self._db, key)

    def set_meta(self, key: str, value: object) -> None:
        set_meta(self._db, key, value)

    def close(self) -> None:
        """The database is closed by whoever opened it (it is shared with the rule store)."""


def _take_back_expired(db: Connection, now: float) -> None:
    """Claims whose node stopped renewing them are pending again (skipping rows being changed)."""
    db.execute(
        "UPDATE instances SET state = 'pending', restored = false, lease_node = NULL,"
        " lease_until = NULL, claim_ends = NULL WHERE orthanc_id IN (SELECT orthanc_id"
        " FROM instances WHERE state = 'inflight' AND lease_until <= %s FOR UPDATE SKIP LOCKED)",
        (now,),
    )


def get_meta(db: PgDatabase, key: str) -> object | None:
    row = db.fetchone("SELECT value FROM meta WHERE key = %s", (key,))
    return None if row is None else row["value"]


def set_meta(db: PgDatabase, key: str, value: object) -> None:
    """Set a value; None deletes the key."""
    if value is None:
        db.execute("DELETE FROM meta WHERE key = %s", (key,))
    else:
        db.execute(
            "INSERT INTO meta (key, value) VALUES (%s, %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, Jsonb(value)),
        )


def _add(db: Connection, key: str, amount: int) -> None:
    db.execute(
        "INSERT INTO meta (key, value) VALUES (%s, to_jsonb(%s::bigint)) ON CONFLICT (key)"
        " DO UPDATE SET value = to_jsonb((meta.value #>> '{}')::bigint + %s)",
        (key, amount, amount),
    )


def _instance(row: Mapping[str, Any], *, state: str | None = None) -> QueuedInstance:
    return QueuedInstance(
        orthanc_id=row["orthanc_id"],
        state=state or row["state"],
        size=row["size"],
        sop_uid=row["sop_uid"],
        attempts=row["attempts"],
        queued_at=row["queued_at"],
        next_attempt=row["next_attempt"],
        alone=bool(row["alone"]),
        file_uuid=row["file_uuid"],
        last_error=row["last_error"],
        done_at=row["done_at"],
    )
