"""The back-ends of the outbox contract: every test in this folder runs against each.

A back-end is a fixture named `<name>_backend` that gives an `OutboxBackend`; adding one is
one more name in `BACKENDS` and its fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from orthanc_kheops.state.outbox import Outbox, SqliteOutbox
from orthanc_kheops.state.postgres.database import PgDatabase
from orthanc_kheops.state.postgres.outbox import PgOutbox

BACKENDS = ["sqlite", "postgresql"]


class OutboxBackend(Protocol):
    def open(self) -> Outbox:
        """Open the store this back-end holds; opening it again is a restart of the plugin."""
        ...


class SqliteBackend:
    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self) -> Outbox:
        return SqliteOutbox(self.path)


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> SqliteBackend:
    return SqliteBackend(tmp_path / "state" / "outbox.sqlite3")


class PostgresBackend:
    """One node's outbox on a schema of its own; its node lease never cuts a claim short."""

    def __init__(self, db: PgDatabase) -> None:
        self.db = db

    def open(self) -> Outbox:
        return PgOutbox(self.db, node="node-a", lease_seconds=86400)


@pytest.fixture
def postgresql_backend(pg_database: PgDatabase) -> PostgresBackend:
    return PostgresBackend(pg_database)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> OutboxBackend:
    found: OutboxBackend = request.getfixturevalue(f"{request.param}_backend")
    return found


@pytest.fixture
def outbox(backend: OutboxBackend) -> Iterator[Outbox]:
    box = backend.open()
    yield box
    box.close()
