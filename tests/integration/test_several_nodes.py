"""Two Orthanc nodes on one PostgreSQL index, one shared storage folder, and the plugin's state
in that database: every instance arrives once, one set of rules, no stranded queue.

The nodes take their state database from Orthanc's own PostgreSQL section (no
Kheops.PostgreSQL), as a site would configure them.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.corpus import CorpusFile, make_dataset, new_uid, to_bytes
from tests.orthanc_process import (
    PLUGINS_DIRECTORY,
    PYTHON_PLUGIN,
    OrthancFactory,
    OrthancProcess,
    OrthancStartError,
)
from tests.plugin_setup import Album, orthanc_id, single_instance, status, write_corpus
from tests.postgres_server import PostgresServer
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

POSTGRESQL_INDEX = PLUGINS_DIRECTORY / "libOrthancPostgreSQLIndex.so"
LEASE_SECONDS = 3


@dataclass
class Site:
    """Two nodes, the album they feed, and the shared database (to look at the claims)."""

    album: Album
    dsn: str
    make: Callable[[str], OrthancProcess]
    a: OrthancProcess
    b: OrthancProcess

    def sql(self, query: str, *parameters: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            return connection.execute(query, parameters).fetchall()

    def posting(self, node: str) -> set[str]:
        """Orthanc ids in flight on `node`: claimed, so maybe posted without a verdict."""
        rows = self.sql(
            "SELECT orthanc_id FROM kheops.instances WHERE state = 'inflight' AND lease_node = %s",
            node,
        )
        return {row[0] for row in rows}

    def store_counts(self, files: Sequence[CorpusFile]) -> dict[str, int]:
        return {f.sop_uid: self.album.server.store_count(f.sop_uid) for f in files}

    def await_all_sent(self, files: Sequence[CorpusFile]) -> None:
        wanted = {f.sop_uid for f in files}
        wait_until(lambda: self.album.holds(list(wanted)), message="every instance in the album")
        wait_until(
            lambda: status(self.b)["Counts"]["Sent"] == len(files),
            message="every instance recorded as sent",
        )


@pytest.fixture
def site(
    postgres: PostgresServer, album: Album, orthanc_factory: OrthancFactory, tmp_path: Path
) -> Iterator[Site]:
    database = f"site_{uuid.uuid4().hex[:8]}"
    dsn = postgres.create_database(database)
    storage = tmp_path / "shared-storage"

    def make(name: str, **fields: Any) -> OrthancProcess:
        return orthanc_factory(
            tmp_path / name,
            kheops=album.section(
                StateDatabase="postgresql",
                NodeName=name,
                LeaseSeconds=LEASE_SECONDS,
                **fields,
            ),
            extra_config={
                "Plugins": [str(PYTHON_PLUGIN), str(POSTGRESQL_INDEX)],
                "StorageDirectory": str(storage),
                "PostgreSQL": {
                    "EnableIndex": True,
                    "EnableStorage": False,
                    "Host": postgres.host,
                    "Port": postgres.port,
                    "Database": database,
                    "Username": postgres.user,
                    "Lock": False,  # several writers
                },
            },
        )

    yield Site(album=album, dsn=dsn, make=make, a=make("node-a"), b=make("node-b"))


def _storescu_at_once(jobs: Sequence[tuple[OrthancProcess, Sequence[Path]]]) -> None:
    errors: list[Exception] = []

    def run(orthanc: OrthancProcess, paths: Sequence[Path]) -> None:
        try:
            orthanc.storescu(paths)
        except Exception as exc:  # noqa: BLE001 -- raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_half_a_corpus_stored_on_each_node_at_once_arrives_once(site: Site, tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "corpus", studies=2, series=2, instances=8, seed=3)
    half = len(files) // 2
    _, token = site.album.other_album()
    _create_rule(site.a, "all", token, "")
    wait_until(lambda: _follows_current_rules(site.a, "node-b"), message="node B follows")

    _storescu_at_once(
        [(site.a, [f.path for f in files[:half]]), (site.b, [f.path for f in files[half:]])]
    )

    site.await_all_sent(files)
    assert set(site.store_counts(files).values()) == {1}
    series = {f.series_uid for f in files}
    wait_until(lambda: _rule(site.b, "all")["Counts"]["Shared"] == len(series))
    shares = [r.path.rsplit("/", 1)[-1] for r in site.album.server.requests if r.method == "PUT"]
    assert sorted(shares) == sorted(series)  # each (rule, series) shared once
    document = status(site.a)
    assert document["Counts"]["Sent"] == len(files)  # the same answer on either node
    assert {(n["Name"], n["State"]) for n in document["Nodes"]} == {
        ("node-a", "running"),
        ("node-b", "running"),
    }


def _instance(study: str, series: str, modality: str) -> bytes:
    return to_bytes(
        make_dataset(
            patient_id="P-NODES",
            patient_name="NODES^TWO",
            study_uid=study,
            series_uid=series,
            modality=modality,
        )
    )


def _rule(orthanc: OrthancProcess, name: str) -> dict[str, Any]:
    response = orthanc.get(f"/kheops/rules/{name}")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def _create_rule(orthanc: OrthancProcess, name: str, token: str, condition: str) -> None:
    body = {"Name": name, "DestinationToken": token, "Condition": condition}
    response = orthanc.post("/kheops/rules", json=body)
    assert response.status_code == 201, response.text


def _follows_current_rules(orthanc: OrthancProcess, node: str) -> bool:
    return any(n["Name"] == node and n["RulesCurrent"] for n in status(orthanc)["Nodes"])


def test_a_rule_created_on_one_node_is_listed_and_applied_by_the_other(site: Site) -> None:
    destination, token = site.album.other_album()
    _create_rule(site.a, "ct", token, "tagValueIsPresent(#Tag.Modality, 'CT')")
    wait_until(lambda: _follows_current_rules(site.a, "node-b"), message="node B follows")

    assert [r["Name"] for r in site.b.get("/kheops/rules").json()] == ["ct"]
    ct, mr = (new_uid(), new_uid()), (new_uid(), new_uid())
    site.b.upload(_instance(*ct, "CT"))
    site.b.upload(_instance(*mr, "MR"))

    wait_until(
        lambda: ct in site.album.server.album_series(destination), message="CT series shared"
    )
    wait_until(lambda: _rule(site.a, "ct")["Counts"]["Shared"] == 1)
    assert mr not in site.album.server.album_series(destination)


def test_a_rule_narrowed_on_one_node_is_in_force_on_the_other_for_pending_shares(
    site: Site,
) -> None:
    cohort_album, cohort_token = site.album.other_album()
    _create_rule(site.a, "cohort", cohort_token, "")
    wait_until(lambda: _follows_current_rules(site.a, "node-b"), message="node B follows")
    site.album.server.fail_next(10_000, status=503, method="PUT")  # every share waits
    ct, mr = (new_uid(), new_uid()), (new_uid(), new_uid())
    site.b.upload(_instance(*ct, "CT"))
    site.b.upload(_instance(*mr, "MR"))
    wait_until(lambda: _rule(site.b, "cohort")["Counts"]["Pending"] == 2, message="pending")

    narrowed = {"Condition": "tagValueIsPresent(#Tag.Modality, 'CT')"}
    response = site.a.put("/kheops/rules/cohort", json=narrowed)
    assert response.status_code == 200, response.text
    site.a.stop()  # from now on only node B can share
    wait_until(lambda: _follows_current_rules(site.b, "node-b"), message="node B follows")
    site.album.server.reset_faults()

    wait_until(lambda: _rule(site.b, "cohort")["Counts"]["Pending"] == 0, message="decided")
    assert site.album.server.album_series(cohort_album) == {ct}


def test_a_killed_node_leaves_nothing_behind_and_its_restart_sends_no_second_copy(
    site: Site, tmp_path: Path
) -> None:
    files = write_corpus(tmp_path / "corpus", studies=2, series=2, instances=6, seed=5)
    site.album.server.set_latency(0.3)
    site.a.storescu([f.path for f in files])
    wait_until(lambda: site.posting("node-a"), message="node A sending")

    site.a.kill()
    in_flight = site.posting("node-a")  # its leases last LEASE_SECONDS more
    site.album.server.set_latency(0)

    site.await_all_sent(files)
    twice = {uid for uid, count in site.store_counts(files).items() if count > 1}
    assert {orthanc_id(site.b, uid) for uid in twice} <= in_flight  # only lost answers
    site.a.start()
    sop_uid, data = single_instance()
    site.a.upload(data)  # once it is sent, node A has started and recovered
    wait_until(lambda: site.album.holds([sop_uid]), message="node A sends again")
    wait_until(lambda: status(site.a)["Counts"]["Sent"] == len(files) + 1)
    assert {uid for uid, count in site.store_counts(files).items() if count > 1} == twice


def test_a_sqlite_state_directory_of_another_node_stops_orthanc(
    album: Album, orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    state = tmp_path / "shared-state"
    first = orthanc_factory(tmp_path / "first", kheops=album.section(StateDirectory=str(state)))
    second = orthanc_factory(
        tmp_path / "second", start=False, kheops=album.section(StateDirectory=str(state))
    )

    with pytest.raises(OrthancStartError) as refused:
        second.start()

    assert 'set Kheops.StateDatabase to "postgresql"' in str(refused.value)
    assert f":{first.http_port}'" in str(refused.value)
