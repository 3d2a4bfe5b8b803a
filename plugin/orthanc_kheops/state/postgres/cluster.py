"""This node among the others: its heartbeat, its leases, and the rules they all follow.

A thread of the plugin's own beats every second: it records the node's last activity in
`nodes` (the status lists the nodes seen recently), renews the leases of what the node has
in flight, reloads the rules when another node changed them (`rules_version`), and tells
the forwarder when another node has just sent (after an outage, it probes KHEOPS at once
rather than at the end of its backoff). When the
rules in the database stop matching this node's Kheops.SwitchingAlbums, it logs an error
naming each rule that differs: every node must have the same configuration.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ...config import KheopsConfig
from .database import PgDatabase
from .outbox import PgOutbox
from .rule_store import PgRuleStore

log = logging.getLogger(__name__)

BEAT_SECONDS = 1.0
RECENT_SECONDS = 600.0
"""Nodes whose last beat is older than this are no longer listed in the status."""


class Cluster:
    def __init__(
        self,
        db: PgDatabase,
        *,
        outbox: PgOutbox,
        store: PgRuleStore,
        config: KheopsConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._outbox = outbox
        self._store = store
        self.node = config.node_name
        self._lease = config.lease_seconds
        self._clock = clock
        self._config_rules: Mapping[str, Mapping[str, Any]] = {}
        self._on_rules_changed: Callable[[], None] = lambda: None
        self._last_sent: Callable[[], float | None] = lambda: None
        self._on_sent_elsewhere: Callable[[], None] = lambda: None
        self._sent_elsewhere_at: float | None = None
        self._rules_version: int | None = None
        self._reported: frozenset[str] = frozenset()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the rules every node follows ---------------------------------------------------

    def install_config_rules(self, documents: Mapping[str, Mapping[str, Any]]) -> None:
        """Before this node writes its Kheops.SwitchingAlbums: say which rules differ."""
        self._config_rules = dict(documents)
        self._report_differences(self._store.config_differences(documents), at_start=True)
        self._rules_version = self._store.rules_version()

    def _report_differences(self, names: list[str], *, at_start: bool) -> None:
        fresh = frozenset(names) - self._reported
        self._reported = frozenset(names)
        for name in sorted(fresh):
            if at_start:
                log.error(
                    "rule %r in Kheops.SwitchingAlbums differs from the one in the shared state"
                    " database (another node's configuration); this node's replaces it. Give"
                    " every Orthanc node the same configuration",
                    name,
                )
            else:
                log.error(
                    "rule %r in the shared state database differs from this node's"
                    " Kheops.SwitchingAlbums (another node started with another configuration);"
                    " the database's rule is in force. Give every Orthanc node the same"
                    " configuration",
                    name,
                )

    # -- the heartbeat ------------------------------------------------------------------

    def start(
        self,
        *,
        on_rules_changed: Callable[[], None],
        last_sent: Callable[[], float | None],
        on_sent_elsewhere: Callable[[], None] = lambda: None,
    ) -> None:
        """Register this node and beat; `last_sent` is when KHEOPS last stored what this node
        sent, `on_sent_elsewhere` is called when another node has sent since the last beat."""
        self._on_rules_changed = on_rules_changed
        self._last_sent = last_sent
        self._on_sent_elsewhere = on_sent_elsewhere
        now = self._clock()
        self._db.execute(
            "INSERT INTO nodes (name, started_at, last_seen) VALUES (%s, %s, %s)"
            " ON CONFLICT (name) DO UPDATE SET started_at = excluded.started_at,"
            " last_seen = excluded.last_seen, stopped_at = NULL",
            (self.node, now, now),
        )
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="kheops-cluster", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        try:
            self._db.execute(
                "UPDATE nodes SET stopped_at = %s, last_seen = %s WHERE name = %s",
                (self._clock(), self._clock(), self.node),
            )
        except Exception:
            log.exception("could not record that node %s stopped", self.node)

    def _run(self) -> None:
        next_renewal = 0.0
        while not self._stopping.wait(BEAT_SECONDS):
            try:
                now = self._clock()
                self.beat(now)
                if now >= next_renewal:
                    self._outbox.renew_leases(now=now)
                    next_renewal = now + self._lease / 3
                self.follow_rules()
            except Exception:
                log.exception("cluster heartbeat failed; trying again")

    def beat(self, now: float) -> None:
        self._db.execute(
            "UPDATE nodes SET last_seen = %s, last_sent_at = COALESCE(%s, last_sent_at),"
            " rules_version = %s WHERE name = %s",
            (now, self._last_sent(), self._rules_version, self.node),
        )
        row = self._db.fetchone(
            "SELECT MAX(last_sent_at) AS at FROM nodes WHERE name != %s", (self.node,)
        )
        elsewhere = -1.0 if row is None or row["at"] is None else float(row["at"])
        if self._sent_elsewhere_at is not None and elsewhere > self._sent_elsewhere_at:
            self._on_sent_elsewhere()
        self._sent_elsewhere_at = elsewhere  # None until the first beat: nothing to compare

    def follow_rules(self) -> bool:
        """Reload the rules if another node changed them; whether it did."""
        version = self._store.rules_version()
        if version == self._rules_version:
            return False
        self._rules_version = version
        self._on_rules_changed()
        self._report_differences(self._store.config_differences(self._config_rules), at_start=False)
        return True

    # -- what the routes show and the reconciler needs ----------------------------------

    def nodes(self) -> list[dict[str, object]]:
        """The nodes seen recently, with their last activity (times in seconds)."""
        now = self._clock()
        rows = self._db.fetchall(
            "SELECT name, started_at, last_seen, last_sent_at, stopped_at, rules_version,"
            " (SELECT value FROM meta WHERE key = 'rules_version') AS current FROM nodes"
            " WHERE last_seen > %s ORDER BY name",
            (now - RECENT_SECONDS,),
        )
        return [
            {
                "Name": row["name"],
                "This": row["name"] == self.node,
                "State": _state(row, now, self._lease),
                "StartedAt": row["started_at"],
                "LastSeen": row["last_seen"],
                "LastSentAt": row["last_sent_at"],
                # Whether the node follows the rules as they are now, or an older version.
                "RulesCurrent": row["rules_version"] == (row["current"] or 0),
            }
            for row in rows
        ]

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """Whether this node may do `name` now; one node at a time in the whole cluster."""
        with self._db.exclusive(name) as mine:
            yield mine

    def close(self) -> None:
        self._db.close()


def _state(row: Mapping[str, Any], now: float, lease: float) -> str:
    if row["stopped_at"] is not None:
        return "stopped"
    if row["last_seen"] < now - max(5 * BEAT_SECONDS, lease):
        return "silent"  # killed, hung or cut off: its leases expire
    return "running"
