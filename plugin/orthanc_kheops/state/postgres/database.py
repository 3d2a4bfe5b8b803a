"""A pool of connections to the shared state database, its migrations and advisory locks.

Every connection is in autocommit mode with `search_path` set to the plugin's schema, so
that a single statement (the store callback's) costs one round trip; several statements go
in `transaction()`. A lost connection, a database that does not answer, a full disk on the
server are raised as `StoreUnavailable`, as the SQLite back-end does; the pool replaces a
broken connection by itself. Migrations run when the pool opens, under an advisory lock, so that
nodes starting at the same moment apply each version once and in order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import StoreUnavailable
from .migrations import MIGRATIONS, Migration

log = logging.getLogger(__name__)

Connection = psycopg.Connection[DictRow]


class StateDatabaseError(RuntimeError):
    """The state database cannot be reached or is not one this plugin can use."""


class PgDatabase:
    def __init__(
        self,
        conninfo: str,
        *,
        schema: str,
        max_size: int = 8,
        timeout: float = 10.0,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> None:
        """Open the pool and bring the schema to the newest version; raise if either fails."""
        self.schema = schema
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=max_size,
            timeout=timeout,
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "options": f"-c search_path={schema}",
                "connect_timeout": max(1, round(timeout)),
                "application_name": "orthanc-kheops",
            },
            open=False,
            name="kheops-state",
        )
        try:
            self._pool.open(wait=True, timeout=timeout)
        except PoolTimeout as exc:
            self._pool.close()
            raise StateDatabaseError(
                f"cannot connect to the PostgreSQL state database within {timeout:g} s"
            ) from exc
        try:
            migrate(self, migrations)
        except BaseException:
            self._pool.close()
            raise

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        with _unavailable(), self._pool.connection() as connection:
            yield connection

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction, committed at the end, rolled back on error."""
        with _unavailable(), self._pool.connection() as connection, connection.transaction():
            yield connection

    def execute(self, query: str, parameters: Sequence[Any] | dict[str, Any] = ()) -> int:
        """One statement, committed on its own; the count of rows it changed."""
        with self.connection() as connection:
            return connection.execute(query, parameters).rowcount

    def fetchall(
        self, query: str, parameters: Sequence[Any] | dict[str, Any] = ()
    ) -> list[DictRow]:
        with self.connection() as connection:
            return connection.execute(query, parameters).fetchall()

    def fetchone(
        self, query: str, parameters: Sequence[Any] | dict[str, Any] = ()
    ) -> DictRow | None:
        with self.connection() as connection:
            return connection.execute(query, parameters).fetchone()

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """Whether this node holds the cluster-wide lock `name` (it is held inside the block).

        A session-level advisory lock, tried and never waited for: a node that does not get
        it skips the work that another node is doing. PostgreSQL frees it if the node dies.
        """
        key = f"orthanc-kheops {self.schema} {name}"
        with self.connection() as connection:
            row = connection.execute(
                "SELECT pg_try_advisory_lock(hashtext(%s)) AS mine", (key,)
            ).fetchone()
            mine = bool(row and row["mine"])
            try:
                yield mine
            finally:
                if mine:
                    connection.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))

    def close(self) -> None:
        self._pool.close()


@contextmanager
def _unavailable() -> Iterator[None]:
    """The driver's errors of reach and resources, as the state's own error."""
    try:
        yield
    except PoolTimeout as exc:
        raise StoreUnavailable(f"state database: no connection within the timeout ({exc})") from exc
    except (psycopg.OperationalError, psycopg.errors.DiskFull) as exc:
        raise StoreUnavailable(f"state database: {exc}") from exc


def migrate(db: PgDatabase, migrations: Sequence[Migration]) -> None:
    """Create the schema and apply the versions it lacks, in one transaction, under a lock."""
    newest = max(m.version for m in migrations)
    with db.transaction() as connection:
        connection.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"orthanc-kheops {db.schema} migrate",)
        )
        found = connection.execute(
            "SELECT 1 FROM pg_namespace WHERE nspname = %s", (db.schema,)
        ).fetchone()
        if found is None:  # a role without CREATE on the database may use a schema made for it
            connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(db.schema)))
        connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, description text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {
            row["version"]
            for row in connection.execute("SELECT version FROM schema_migrations").fetchall()
        }
        if done and max(done) > newest:
            raise StateDatabaseError(
                f"the state schema {db.schema!r} is at version {max(done)}, newer than this"
                f" plugin's {newest}: run the same plugin version on every node"
            )
        for migration in sorted(migrations, key=lambda m: m.version):
            if migration.version in done:
                continue
            connection.execute(migration.sql)
            connection.execute(
                "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)",
                (migration.version, migration.description),
            )
            log.warning(
                "state schema %s: applied migration %d (%s)",
                db.schema,
                migration.version,
                migration.description,
            )
