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

BACKENDS = ["sqlite"]


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


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> OutboxBackend:
    found: OutboxBackend = request.getfixturevalue(f"{request.param}_backend")
    return found


@pytest.fixture
def outbox(backend: OutboxBackend) -> Iterator[Outbox]:
    box = backend.open()
    yield box
    box.close()
