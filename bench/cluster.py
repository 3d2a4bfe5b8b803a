"""`PYTHONPATH=plugin python -m bench.cluster [--instances N]`: the PostgreSQL state back-end
against SQLite.

Every run is in this one invocation, on one corpus, one KHEOPS test server (its own process)
and one PostgreSQL (Debian's, in a temporary folder, loopback only):

- store callback: the outbox write the callback makes for one instance, SQLite and
  PostgreSQL, median over many;
- ingest: storescu of the corpus into one Orthanc while KHEOPS is down (the plugin only
  queues), with the state in SQLite and in PostgreSQL;
- drain: the backlog left by that ingest, from the first instance KHEOPS takes once it is
  back (a node's probe) until it stored every instance: SQLite on one node, PostgreSQL on
  one node, PostgreSQL on two nodes.

Every Orthanc keeps its index in PostgreSQL (orthanc-postgresql), so that only the plugin's
state differs between runs. The report (Markdown) goes to stdout.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import corpus as corpora
from bench.kheops import KheopsProcess
from orthanc_kheops.state.outbox import Outbox, SqliteOutbox
from orthanc_kheops.state.postgres.database import PgDatabase
from orthanc_kheops.state.postgres.outbox import PgOutbox
from tests.orthanc_process import PLUGINS_DIRECTORY, PYTHON_PLUGIN, OrthancProcess
from tests.postgres_server import PostgresServer
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
WORKDIR = ROOT / "build" / "bench-cluster"
POSTGRESQL_INDEX = PLUGINS_DIRECTORY / "libOrthancPostgreSQLIndex.so"


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def callback_cost(outbox: Outbox, count: int) -> float:
    """Median seconds of the store callback's write, one new instance at a time."""
    times = []
    for n in range(count):
        started = time.perf_counter()
        outbox.enqueue([(f"bench-{n}", 512 * 1024)], now=time.time(), requeue=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class Site:
    """Orthanc nodes on one PostgreSQL index and storage, with the plugin's state chosen."""

    def __init__(self, postgres: PostgresServer, kheops: KheopsProcess, state: str) -> None:
        self.database = f"bench_{uuid.uuid4().hex[:8]}"
        postgres.create_database(self.database)
        self.postgres = postgres
        self.kheops = kheops
        self.state = state
        self.folder = WORKDIR / self.database
        self.nodes: list[OrthancProcess] = []

    def add_node(self) -> OrthancProcess:
        name = f"node-{len(self.nodes) + 1}"
        node = OrthancProcess(
            self.folder / name,
            kheops={**self.kheops.plugin_settings(), "StateDatabase": self.state,
                    "NodeName": name},
            extra_config={
                "Plugins": [str(PYTHON_PLUGIN), str(POSTGRESQL_INDEX)],
                "StorageDirectory": str(self.folder / "storage"),
                "PostgreSQL": {
                    "EnableIndex": True, "EnableStorage": False, "Lock": False,
                    "Host": self.postgres.host, "Port": self.postgres.port,
                    "Database": self.database, "Username": self.postgres.user,
                },
            },
            verbose=False,
        )  # fmt: skip
        node.start()
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def ingest_and_drain(site: Site, corpus: corpora.Corpus, nodes: int) -> tuple[float, float]:
    """Seconds to C-STORE the corpus while KHEOPS is down, then to drain it once it is back."""
    for _ in range(nodes):
        site.add_node()
    site.kheops.set_down(True)
    started = time.monotonic()
    site.nodes[0].storescu(list(corpus.paths))
    ingest = time.monotonic() - started
    before = site.kheops.stores()
    site.kheops.set_down(False)
    # From the first instance KHEOPS takes: the wait for a node's next probe is not the drain.
    wait_until(lambda: site.kheops.stores() > before, timeout=120, interval=0.01)
    started = time.monotonic()
    wait_until(
        lambda: site.kheops.stores() - before >= len(corpus),
        timeout=600,
        interval=0.02,
        message="drain",
    )
    return ingest, time.monotonic() - started


def _best(runs: int, measure: Callable[[], tuple[float, float]]) -> tuple[float, float]:
    results = [measure() for _ in range(runs)]
    return min(r[0] for r in results), min(r[1] for r in results)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The PostgreSQL state back-end against SQLite.")
    parser.add_argument("--instances", type=int, default=600)
    parser.add_argument("--size", type=int, default=256, help="rows and columns of each image")
    parser.add_argument("--repeat", type=int, default=2)
    options = parser.parse_args(argv)
    corpus = corpora.ensure(options.instances, size=options.size)
    _progress(f"corpus: {corpus.describe()}")
    rows: list[tuple[str, Any]] = []
    with ExitStack() as stack:
        postgres = stack.enter_context(
            PostgresServer(Path(tempfile.mkdtemp(prefix="orthanc-kheops-bench-pg-")))
        )
        kheops = stack.enter_context(KheopsProcess(WORKDIR / "kheops"))

        dsn = postgres.create_database("callback")
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kheops-bench-")))
        sqlite = SqliteOutbox(scratch / "outbox.sqlite3")
        db = PgDatabase(dsn, schema="kheops")
        pg = PgOutbox(db, node="bench", lease_seconds=30)
        cost = {"sqlite": callback_cost(sqlite, 2000), "postgresql": callback_cost(pg, 2000)}
        sqlite.close()
        db.close()
        for name, seconds in cost.items():
            rows.append((f"store callback's write, {name}", f"{seconds * 1e6:.0f} µs"))

        figures: dict[tuple[str, int], tuple[float, float]] = {}
        for state, nodes in (("sqlite", 1), ("postgresql", 1), ("postgresql", 2)):

            def run(state: str = state, nodes: int = nodes) -> tuple[float, float]:
                site = Site(postgres, kheops, state)
                try:
                    return ingest_and_drain(site, corpus, nodes)
                finally:
                    site.stop()

            _progress(f"{state}, {nodes} node(s)")
            figures[(state, nodes)] = _best(options.repeat, run)
        for (state, nodes), (ingest, drain) in figures.items():
            if nodes == 1:
                rows.append((f"ingest while KHEOPS is down, {state}", f"{ingest:.2f} s"))
            rows.append((f"drain, {state}, {nodes} node(s)", f"{drain:.2f} s"))
        sqlite_ingest, sqlite_drain = figures[("sqlite", 1)]
        pg_ingest, pg_drain = figures[("postgresql", 1)]
        rows.append(("ingest time, PostgreSQL / SQLite", f"{pg_ingest / sqlite_ingest:.2f}×"))
        rows.append(("drain time, PostgreSQL / SQLite", f"{pg_drain / sqlite_drain:.2f}×"))
        rows.append(
            ("drain speed, two nodes / one", f"{pg_drain / figures[('postgresql', 2)][1]:.2f}×")
        )
    print(f"Corpus: {corpus.describe()}; best of {options.repeat}.\n")
    print("| measure | value |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
