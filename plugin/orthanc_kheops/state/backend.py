"""Which state back-end the plugin uses, and the rule store's contract.

`open_state` reads Kheops.StateDatabase: SQLite files in the state directory (one node), or
one PostgreSQL schema shared by every node, with this node's registration in it.
`RuleStoreApi` is what the switching code and the REST routes need from a rule store; the
SQLite `RuleStore` and `PgRuleStore` both provide it, checked by the same contract tests.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import KheopsConfig, PostgresSettings
from .node_lock import NodeLock
from .outbox import Outbox, SqliteOutbox
from .postgres.cluster import Cluster
from .postgres.database import PgDatabase
from .postgres.outbox import PgOutbox
from .postgres.rule_store import PgRuleStore
from .rule_store import Decision, RuleStore, ShareCounts, ShareJob, ShareKey, StoredRule


class RuleStoreApi(Protocol):
    def rules(self) -> list[StoredRule]: ...

    def rule(self, name: str) -> StoredRule | None: ...

    def save_rule(
        self,
        name: str,
        *,
        origin: str,
        document: Mapping[str, Any],
        albums: tuple[str, str] | None,
        now: float,
    ) -> int: ...

    def hold_rule(self, name: str) -> AbstractContextManager[StoredRule | None]: ...

    def delete_rule(self, name: str) -> int | None: ...

    def sync_config(
        self, documents: Mapping[str, Mapping[str, Any]], *, now: float
    ) -> list[str]: ...

    def set_albums(self, name: str, albums: tuple[str, str]) -> None: ...

    def set_failing(self, name: str, reason: str | None, *, now: float) -> None: ...

    def note_error(self, name: str, error: str, *, now: float) -> None: ...

    def add_shares(
        self, decided: Mapping[ShareKey, Decision], *, now: float, failed: str | None = None
    ) -> int: ...

    def requeue_shares(self, decided: Mapping[ShareKey, Decision], *, now: float) -> int: ...

    def redecide(self, key: ShareKey, decision: Decision) -> None: ...

    def drop_share(self, key: ShareKey) -> None: ...

    def due_shares(self, rules: Collection[str], *, now: float, limit: int) -> list[ShareJob]: ...

    def next_due(self, rules: Collection[str]) -> float | None: ...

    def mark_shared(self, key: ShareKey, *, now: float) -> None: ...

    def reschedule(
        self, key: ShareKey, *, delay: float, error: str, not_found: bool, now: float
    ) -> None: ...

    def mark_failed(self, key: ShareKey, *, reason: str, now: float) -> None: ...

    def retry(self, name: str, *, now: float) -> int: ...

    def make_due(self, *, now: float) -> int: ...

    def shares(self, name: str, *, state: str, limit: int, offset: int = 0) -> list[ShareJob]: ...

    def counts(self) -> dict[str, ShareCounts]: ...

    def get_meta(self, key: str) -> object | None: ...

    def set_meta(self, key: str, value: object) -> None: ...

    def close(self) -> None: ...


@dataclass
class State:
    """The opened state: the outbox, the rule store, and the cluster (PostgreSQL) or this
    node's lock on the state directory (SQLite)."""

    outbox: Outbox
    store: RuleStoreApi
    cluster: Cluster | None = None
    lock: NodeLock | None = None


def open_state(config: KheopsConfig, *, clock: Callable[[], float]) -> State:
    """Open the configured back-end; raise with a message that says what to do if it cannot.

    `clock` is the plugin's: the cluster's heartbeat and leases are on the same time as the
    claims the workers make.
    """
    if config.postgres is not None:  # StateDatabase "postgresql"
        return _open_postgres(config, config.postgres, clock)
    lock = NodeLock(config.state_directory, config.node_name)
    lock.start()
    return State(
        outbox=SqliteOutbox(config.state_directory / "outbox.sqlite3"),
        store=RuleStore(config.state_directory / "switching.sqlite3"),
        lock=lock,
    )


def _open_postgres(
    config: KheopsConfig, settings: PostgresSettings, clock: Callable[[], float]
) -> State:
    db = PgDatabase(
        settings.conninfo.reveal(),
        schema=settings.schema,
        max_size=config.workers + 6,
    )
    outbox = PgOutbox(db, node=config.node_name, lease_seconds=config.lease_seconds)
    store = PgRuleStore(db, node=config.node_name, lease_seconds=config.lease_seconds)
    cluster = Cluster(db, outbox=outbox, store=store, config=config, clock=clock)
    return State(outbox=outbox, store=store, cluster=cluster)
