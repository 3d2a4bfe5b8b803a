"""Rules and share jobs in the shared PostgreSQL database: one set of rules for every node.

The contract is `RuleStore`'s (see state/rule_store.py). What several nodes add:

- Every change to the rules bumps `rules_version` in the same transaction; each node
  compares it with the version it loaded (`rules_version()`, every second) and reloads, so
  a rule created, changed or deleted on one node is in force on all of them within seconds.
- `due_shares` claims the jobs it returns with a lease (`FOR UPDATE SKIP LOCKED`), so two
  nodes never share one (rule, series) at the same time; a claim that is not finished
  (the node died, or the rule changed meanwhile) expires and the job is due again on any
  node. To its own node a claimed job stays due, as in the SQLite back-end.
- `hold_rule` reads the rule `FOR SHARE` in a transaction kept open for the block: a change
  or a deletion from any node waits on the row until the share in flight has its answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from psycopg.types.json import Jsonb

from ..rule_store import (
    Decision,
    ShareCounts,
    ShareJob,
    ShareKey,
    StoredRule,
    destination_identity,
    tokens,
)
from .database import Connection, PgDatabase
from .outbox import get_meta, set_meta

_RULE_COLUMNS = (
    "name, origin, document, destination_album, source_album, failing, failing_since,"
    " last_error, last_error_at, created_at, updated_at"
)
_SHARE_COLUMNS = (
    "rule, study_uid, series_uid, state, attempts, not_found, queued_at, next_attempt,"
    " last_error, condition, destination, instance_id"
)


class PgRuleStore:
    def __init__(
        self,
        db: PgDatabase,
        *,
        node: str,
        lease_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._node = node
        self._lease = lease_seconds
        self._clock = clock

    # -- rules ---------------------------------------------------------------------------

    def rules(self) -> list[StoredRule]:
        rows = self._db.fetchall(f"SELECT {_RULE_COLUMNS} FROM rules ORDER BY name")
        return [_rule(row) for row in rows]

    def rule(self, name: str) -> StoredRule | None:
        row = self._db.fetchone(f"SELECT {_RULE_COLUMNS} FROM rules WHERE name = %s", (name,))
        return None if row is None else _rule(row)

    def rules_version(self) -> int:
        """A number that changes with every change to the rules, on any node."""
        value = get_meta(self._db, "rules_version")
        return value if isinstance(value, int) else 0

    @contextmanager
    def hold_rule(self, name: str) -> Iterator[StoredRule | None]:
        """The rule as saved now, kept from being changed or deleted until the block ends."""
        with self._db.transaction() as db:
            row = db.execute(
                f"SELECT {_RULE_COLUMNS} FROM rules WHERE name = %s FOR SHARE", (name,)
            ).fetchone()
            yield None if row is None else _rule(row)

    def save_rule(
        self,
        name: str,
        *,
        origin: str,
        document: Mapping[str, Any],
        albums: tuple[str, str] | None,
        now: float,
    ) -> int:
        """Create or replace a rule (see `RuleStore.save_rule`); the pending shares dropped."""
        with self._db.transaction() as db:
            dropped = self._save(db, name, origin=origin, document=document, albums=albums, now=now)
            _bump(db)
        return dropped

    def _save(
        self,
        db: Connection,
        name: str,
        *,
        origin: str,
        document: Mapping[str, Any],
        albums: tuple[str, str] | None,
        now: float,
    ) -> int:
        old = db.execute(
            "SELECT document, destination_album, source_album FROM rules WHERE name = %s"
            " FOR UPDATE",
            (name,),
        ).fetchone()
        previous = old["document"] if old is not None else {}
        dropped = 0
        old_token, new_token = previous.get("DestinationToken"), document.get("DestinationToken")
        if old is not None and old_token != new_token:
            if albums is not None and albums[0] == old["destination_album"]:
                # A new token of the same album: the pending decisions still hold.
                db.execute(
                    "UPDATE shares SET destination = %s WHERE rule = %s AND state = 'pending'"
                    " AND destination = %s",
                    (
                        destination_identity(str(new_token)),
                        name,
                        destination_identity(str(old_token)),
                    ),
                )
                db.execute("DELETE FROM shares WHERE rule = %s AND state != 'pending'", (name,))
            else:
                dropped = _drop_shares(db, name)
        if albums is None and old is not None and tokens(previous) == tokens(document):
            albums = (old["destination_album"], old["source_album"])
        destination, source = albums if albums is not None else (None, None)
        db.execute(
            "INSERT INTO rules (name, origin, document, destination_album, source_album,"
            " created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (name) DO UPDATE SET origin = excluded.origin,"
            " document = excluded.document, destination_album = excluded.destination_album,"
            " source_album = excluded.source_album, failing = NULL, failing_since = NULL,"
            " updated_at = excluded.updated_at",
            (name, origin, Jsonb(dict(document)), destination, source, now, now),
        )
        return dropped

    def delete_rule(self, name: str) -> int | None:
        with self._db.transaction() as db:
            # The row lock first: it waits for a share in flight, whose verdict then counts.
            if db.execute("SELECT 1 FROM rules WHERE name = %s FOR UPDATE", (name,)).rowcount == 0:
                return None
            dropped = _drop_shares(db, name)
            db.execute("DELETE FROM rules WHERE name = %s", (name,))
            _bump(db)
        return dropped

    def config_differences(self, documents: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Rules whose configuration here differs from the one in the database, by name.

        Every node should have the same Kheops.SwitchingAlbums; the database holds the
        configuration of the node that started last.
        """
        stored = {
            row["name"]: row["document"]
            for row in self._db.fetchall("SELECT name, document FROM rules WHERE origin = 'config'")
        }
        names = set(stored) | set(documents)
        return sorted(
            n for n in names if stored.get(n) != (documents.get(n) and dict(documents[n]))
        )

    def sync_config(self, documents: Mapping[str, Mapping[str, Any]], *, now: float) -> list[str]:
        """Make the config rules those given (see `RuleStore.sync_config`)."""
        replaced: list[str] = []
        changed = False
        with self._db.transaction() as db:
            db.execute("LOCK TABLE rules IN SHARE ROW EXCLUSIVE MODE")
            existing = {
                row["name"]: row
                for row in db.execute("SELECT name, origin, document FROM rules").fetchall()
            }
            for name, row in existing.items():
                if row["origin"] == "config" and name not in documents:
                    db.execute("DELETE FROM rules WHERE name = %s", (name,))
                    changed = True
            for name, document in documents.items():
                found = existing.get(name)
                if found is not None and found["origin"] == "api":
                    replaced.append(name)
                    db.execute("DELETE FROM rules WHERE name = %s", (name,))
                    found = None
                if found is not None and found["document"] == dict(document):
                    continue
                self._save(db, name, origin="config", document=document, albums=None, now=now)
                changed = True
            if changed:
                _bump(db)
        return replaced

    def set_albums(self, name: str, albums: tuple[str, str]) -> None:
        self._db.execute(
            "UPDATE rules SET destination_album = %s, source_album = %s WHERE name = %s",
            (*albums, name),
        )

    def set_failing(self, name: str, reason: str | None, *, now: float) -> None:
        """Mark a rule failing (its shares wait, on every node) or clear it with None."""
        with self._db.transaction() as db:
            if reason is None:
                changed = db.execute(
                    "UPDATE rules SET failing = NULL, failing_since = NULL"
                    " WHERE name = %s AND failing IS NOT NULL",
                    (name,),
                ).rowcount
            else:
                changed = db.execute(
                    "UPDATE rules SET failing = %s, failing_since = COALESCE(failing_since, %s),"
                    " last_error = %s, last_error_at = %s WHERE name = %s",
                    (reason, now, reason, now, name),
                ).rowcount
            if changed:
                _bump(db)

    def note_error(self, name: str, error: str, *, now: float) -> None:
        self._db.execute(
            "UPDATE rules SET last_error = %s, last_error_at = %s WHERE name = %s",
            (error, now, name),
        )

    # -- shares --------------------------------------------------------------------------

    def add_shares(
        self, decided: Mapping[ShareKey, Decision], *, now: float, failed: str | None = None
    ) -> int:
        """Queue shares not seen before (the dedupe, across nodes); returns how many are new.

        With `failed`, the rows are recorded failed at once with that reason.
        """
        if not decided:
            return 0
        with self._db.transaction() as db:
            new = db.execute(
                "INSERT INTO shares (rule, study_uid, series_uid, state, queued_at,"
                " next_attempt, condition, destination, instance_id, last_error, done_at)"
                " SELECT k.rule, k.study, k.series, %s, %s, %s, k.condition, k.destination,"
                " k.instance, %s, %s FROM unnest(%s::text[], %s::text[], %s::text[],"
                " %s::text[], %s::text[], %s::text[])"
                " AS k (rule, study, series, condition, destination, instance)"
                " JOIN rules ON rules.name = k.rule ON CONFLICT (rule, series_uid) DO NOTHING",
                (
                    "pending" if failed is None else "failed",
                    now,
                    now,
                    failed,
                    None if failed is None else now,
                    *_columns(decided),
                ),
            ).rowcount
            if failed is not None:
                db.execute(
                    "UPDATE rules SET last_error = %s, last_error_at = %s WHERE name = ANY(%s)",
                    (failed, now, sorted({key.rule for key in decided})),
                )
        return new

    def requeue_shares(self, decided: Mapping[ShareKey, Decision], *, now: float) -> int:
        """Queue shares now whatever their past; a rule deleted meanwhile gets nothing."""
        if not decided:
            return 0
        return self._db.execute(
            "INSERT INTO shares (rule, study_uid, series_uid, state, queued_at, next_attempt,"
            " condition, destination, instance_id)"
            " SELECT k.rule, k.study, k.series, 'pending', %s, %s, k.condition, k.destination,"
            " k.instance FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[],"
            " %s::text[], %s::text[]) AS k (rule, study, series, condition, destination, instance)"
            " JOIN rules ON rules.name = k.rule"
            " ON CONFLICT (rule, series_uid) DO UPDATE SET state = 'pending', attempts = 0,"
            " not_found = 0, queued_at = excluded.queued_at,"
            " next_attempt = excluded.next_attempt, last_error = NULL, done_at = NULL,"
            " condition = excluded.condition, destination = excluded.destination,"
            " instance_id = excluded.instance_id, lease_node = NULL, lease_until = NULL",
            (now, now, *_columns(decided)),
        )

    def redecide(self, key: ShareKey, decision: Decision) -> None:
        """The series was evaluated again under the rule in force, and still matches."""
        self._db.execute(
            "UPDATE shares SET condition = %s, destination = %s, instance_id = %s"
            " WHERE rule = %s AND series_uid = %s AND state = 'pending'",
            (
                decision.condition,
                decision.destination,
                decision.instance_id,
                key.rule,
                key.series_uid,
            ),
        )

    def drop_share(self, key: ShareKey) -> None:
        """Forget a pending share the rule in force no longer makes."""
        self._db.execute(
            "DELETE FROM shares WHERE rule = %s AND series_uid = %s AND state = 'pending'",
            (key.rule, key.series_uid),
        )

    def due_shares(self, rules: Collection[str], *, now: float, limit: int) -> list[ShareJob]:
        """Claim pending shares of the given rules whose time has come, oldest first."""
        if not rules:
            return []
        rows = self._db.fetchall(
            f"UPDATE shares AS s SET lease_node = %s, lease_until = %s"
            f" FROM (SELECT rule, series_uid FROM shares WHERE state = 'pending'"
            f" AND next_attempt <= %s AND rule = ANY(%s)"
            f" AND (lease_until IS NULL OR lease_until < %s OR lease_node = %s)"
            f" ORDER BY next_attempt LIMIT %s FOR UPDATE SKIP LOCKED) AS d"
            f" WHERE s.rule = d.rule AND s.series_uid = d.series_uid"
            f" RETURNING {', '.join('s.' + c.strip() for c in _SHARE_COLUMNS.split(','))}",
            (self._node, now + self._lease, now, list(rules), now, self._node, limit),
        )
        return sorted((_job(row) for row in rows), key=lambda j: (j.next_attempt, j.queued_at))

    def next_due(self, rules: Collection[str]) -> float | None:
        if not rules:
            return None
        row = self._db.fetchone(
            "SELECT MIN(CASE WHEN lease_node = %s THEN next_attempt"
            " ELSE GREATEST(next_attempt, COALESCE(lease_until, 0)) END) AS due FROM shares"
            " WHERE state = 'pending' AND rule = ANY(%s)",
            (self._node, list(rules)),
        )
        return None if row is None or row["due"] is None else float(row["due"])

    def mark_shared(self, key: ShareKey, *, now: float) -> None:
        self._db.execute(
            "UPDATE shares SET state = 'shared', attempts = attempts + 1, done_at = %s,"
            " last_error = NULL, lease_node = NULL, lease_until = NULL"
            " WHERE rule = %s AND series_uid = %s",
            (now, key.rule, key.series_uid),
        )

    def reschedule(
        self, key: ShareKey, *, delay: float, error: str, not_found: bool, now: float
    ) -> None:
        self._db.execute(
            "UPDATE shares SET attempts = attempts + 1, not_found = not_found + %s,"
            " next_attempt = %s, last_error = %s, lease_node = NULL, lease_until = NULL"
            " WHERE rule = %s AND series_uid = %s",
            (int(not_found), now + delay, error, key.rule, key.series_uid),
        )

    def mark_failed(self, key: ShareKey, *, reason: str, now: float) -> None:
        # The rule's row before the share's, as every transaction here takes them: one that
        # waits for a node's `hold_rule` then holds no share row that node may write.
        with self._db.transaction() as db:
            db.execute(
                "UPDATE rules SET last_error = %s, last_error_at = %s WHERE name = %s",
                (reason, now, key.rule),
            )
            db.execute(
                "UPDATE shares SET state = 'failed', attempts = attempts + 1, done_at = %s,"
                " last_error = %s, lease_node = NULL, lease_until = NULL"
                " WHERE rule = %s AND series_uid = %s",
                (now, reason, key.rule, key.series_uid),
            )

    def retry(self, name: str, *, now: float) -> int:
        """The rule is no longer failing; its failed and waiting shares are due now."""
        with self._db.transaction() as db:
            db.execute(
                "UPDATE rules SET failing = NULL, failing_since = NULL WHERE name = %s", (name,)
            )
            _bump(db)
            return db.execute(
                "UPDATE shares SET state = 'pending', next_attempt = %s, not_found = 0,"
                " done_at = NULL, lease_node = NULL, lease_until = NULL"
                " WHERE rule = %s AND state IN ('pending', 'failed')",
                (now, name),
            ).rowcount

    def make_due(self, *, now: float) -> int:
        return self._db.execute(
            "UPDATE shares SET next_attempt = %s WHERE state = 'pending' AND next_attempt > %s",
            (now, now),
        )

    def shares(self, name: str, *, state: str, limit: int, offset: int = 0) -> list[ShareJob]:
        rows = self._db.fetchall(
            f"SELECT {_SHARE_COLUMNS} FROM shares WHERE rule = %s AND state = %s"
            " ORDER BY queued_at, series_uid LIMIT %s OFFSET %s",
            (name, state, limit, offset),
        )
        return [_job(row) for row in rows]

    def counts(self) -> dict[str, ShareCounts]:
        rows = self._db.fetchall(
            "SELECT rule, state, COUNT(*) AS n FROM shares GROUP BY rule, state"
        )
        grouped: dict[str, dict[str, int]] = {}
        for row in rows:
            grouped.setdefault(row["rule"], {})[row["state"]] = row["n"]
        return {name: ShareCounts(**states) for name, states in grouped.items()}

    # -- meta ----------------------------------------------------------------------------

    def get_meta(self, key: str) -> object | None:
        return get_meta(self._db, f"switching.{key}")

    def set_meta(self, key: str, value: object) -> None:
        set_meta(self._db, f"switching.{key}", value)

    def close(self) -> None:
        """The database is closed by whoever opened it (it is shared with the outbox)."""


def _drop_shares(db: Connection, name: str) -> int:
    """Forget every share row of a rule; the pending ones dropped."""
    gone = db.execute(
        "DELETE FROM shares WHERE rule = %s RETURNING state = 'pending' AS pending", (name,)
    ).fetchall()
    return sum(1 for row in gone if row["pending"])


def _bump(db: Connection) -> None:
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('rules_version', '1') ON CONFLICT (key)"
        " DO UPDATE SET value = to_jsonb((meta.value #>> '{}')::bigint + 1)"
    )


def _columns(decided: Mapping[ShareKey, Decision]) -> tuple[list[object], ...]:
    """The columns of `unnest`: rule, study, series, condition, destination, instance."""
    return (
        [k.rule for k in decided],
        [k.study_uid for k in decided],
        [k.series_uid for k in decided],
        [d.condition for d in decided.values()],
        [d.destination for d in decided.values()],
        [d.instance_id for d in decided.values()],
    )


def _rule(row: Mapping[str, Any]) -> StoredRule:
    return StoredRule(
        name=row["name"],
        origin=row["origin"],
        document=row["document"],
        destination_album=row["destination_album"],
        source_album=row["source_album"],
        failing=row["failing"],
        failing_since=row["failing_since"],
        last_error=row["last_error"],
        last_error_at=row["last_error_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _job(row: Mapping[str, Any]) -> ShareJob:
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
