"""A real PostgreSQL for tests: Debian's server binaries, a temporary cluster, loopback only.

    with PostgresServer(folder) as server:
        server.dsn("orthanc")            # a conninfo string for one database of its own
        server.create_database("node_index")

initdb and postgres refuse to run as root, so when the tests run as root the cluster folder
belongs to the `postgres` user and the commands run through `runuser -u postgres`. Peer and
password authentication are not needed: the server listens on 127.0.0.1 only (no Unix socket
in a shared folder) and trusts local TCP connections; it is stopped and deleted at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg

from tests.orthanc_process import free_ports
from tests.waiting import wait_until


def _binaries() -> Path:
    """Debian's PostgreSQL of this release (15 on bookworm, 17 on trixie, 18 on forky)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
    )
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


BINARIES = _binaries()
SUPERUSER = "kheops_test"


class PostgresError(RuntimeError):
    """The test PostgreSQL did not start or stop."""


class PostgresServer:
    def __init__(self, folder: Path) -> None:
        """`folder` must be reachable by the postgres user (a fresh folder under /tmp is)."""
        self.folder = Path(folder)
        self.data = self.folder / "data"
        self.log_path = self.folder / "postgres.log"
        (self.port,) = free_ports(1)
        self.host = "127.0.0.1"
        self.user = SUPERUSER

    def dsn(self, database: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its conninfo string."""
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._own_folder()
        self._run(
            BINARIES / "initdb", "-D", self.data, "-U", self.user, "--auth=trust",
            "--encoding=UTF8", "--no-sync",
        )  # fmt: skip
        options = (
            f"-c listen_addresses={self.host} -c port={self.port} -c unix_socket_directories=''"
            " -c fsync=off -c max_connections=200"
        )
        self._run(BINARIES / "pg_ctl", "-D", self.data, "-l", self.log_path, "-o", options, "start")
        wait_until(self._answers, timeout=30, message="PostgreSQL did not accept connections")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(BINARIES / "pg_ctl", "-D", self.data, "-m", "immediate", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _answers(self) -> bool:
        try:
            psycopg.connect(self.dsn(), connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def _own_folder(self) -> None:
        if os.geteuid() != 0:
            return
        shutil.chown(self.folder, "postgres", "postgres")

    def _run(self, *command: object) -> None:
        argv = [str(part) for part in command]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise PostgresError(
                f"{' '.join(argv)} exited with {result.returncode}:\n{result.stdout}{result.stderr}"
                f"\n{self.log_tail()}"
            )

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
