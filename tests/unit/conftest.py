"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from orthanc_kheops.state.backend import RuleStoreApi
from orthanc_kheops.state.postgres.rule_store import PgRuleStore
from orthanc_kheops.state.rule_store import RuleStore
from tests.recording_server import RecordingServer


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    recording = RecordingServer()
    yield recording
    recording.close()
    assert recording.unexpected == [], "requests the test did not script"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RuleStoreApi]:
    """A rule store: each test that takes it runs on SQLite and on PostgreSQL."""
    opened: RuleStoreApi
    if request.param == "sqlite":
        opened = RuleStore(tmp_path / "state" / "switching.sqlite3")
    else:
        opened = PgRuleStore(
            request.getfixturevalue("pg_database"), node="node-a", lease_seconds=30
        )
    yield opened
    opened.close()
