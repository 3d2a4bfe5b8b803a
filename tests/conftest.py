"""Fixtures shared by all tests, grouped by what they provide."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orthanc_kheops.state.postgres.database import PgDatabase
from tests.kheops_server import KheopsTestServer
from tests.orthanc_process import OrthancError, OrthancFactory, OrthancProcess, stop_all
from tests.plugin_setup import Album
from tests.postgres_server import PostgresServer

# --- Work directories ------------------------------------------------------------------------


@pytest.fixture
def tmp_workdir(tmp_path: Path) -> Path:
    """A fresh, empty directory for this test."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    return workdir


# --- KHEOPS ------------------------------------------------------------------------------------


@pytest.fixture
def album() -> Iterator[Album]:
    """A main album on a KHEOPS test server of this test's own."""
    with KheopsTestServer() as server:
        yield Album(server)


# --- Orthanc processes -----------------------------------------------------------------------

_ORTHANCS = pytest.StashKey[list[OrthancProcess]]()


@pytest.fixture
def orthanc_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OrthancFactory]:
    """Make (and by default start) OrthancProcess instances; stop them all after the test.

    Teardown fails the test if an Orthanc crashed (exited without `stop` or `kill`), needed
    SIGKILL to stop, or exited non-zero. A failing test's report ends with each log tail.
    """
    created: list[OrthancProcess] = []
    request.node.stash[_ORTHANCS] = created

    def factory(
        workdir: Path | None = None, *, start: bool = True, **kwargs: Any
    ) -> OrthancProcess:
        orthanc = OrthancProcess(workdir or tmp_path / f"orthanc-{len(created)}", **kwargs)
        created.append(orthanc)
        if start:
            orthanc.start()
        return orthanc

    yield factory

    crashed = [orthanc for orthanc in created if orthanc.exited_unexpectedly]
    try:
        stop_all(created)
    finally:
        for orthanc in created:
            orthanc.session.close()
    if crashed:
        details = "\n".join(f"{o!r} exited with code {o.returncode}" for o in crashed)
        raise OrthancError(f"Orthanc exited during the test:\n{details}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for orthanc in item.stash.get(_ORTHANCS, []):
            report.sections.append((f"Orthanc log tail ({orthanc.url})", orthanc.log_tail()))
    return report


# --- PostgreSQL --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL for the whole run, on a free loopback port, deleted at the end."""
    with PostgresServer(Path(tempfile.mkdtemp(prefix="orthanc-kheops-pg-"))) as server:
        yield server


@pytest.fixture(scope="session")
def state_database_dsn(postgres: PostgresServer) -> str:
    """A database for the state back-end's tests; each test gets a schema of its own."""
    return postgres.create_database("kheops_state_tests")


@pytest.fixture
def pg_database(state_database_dsn: str) -> Iterator[PgDatabase]:
    """The plugin's PostgreSQL state, migrated, in a fresh schema dropped after the test."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    db = PgDatabase(state_database_dsn, schema=schema)
    yield db
    db.close()
    with psycopg.connect(state_database_dsn, autocommit=True) as connection:
        connection.execute(f"DROP SCHEMA {schema} CASCADE")
