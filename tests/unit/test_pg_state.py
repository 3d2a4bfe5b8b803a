"""What the PostgreSQL back-end adds for several nodes, on a real PostgreSQL: claims that
hold across nodes, leases that expire, migrations under a lock, one set of rules.

The behaviour both back-ends share is pinned down by test_outbox.py and test_rule_store.py,
which run on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orthanc_kheops.config import KheopsConfig
from orthanc_kheops.observability.masking import Secret
from orthanc_kheops.state.postgres.cluster import Cluster
from orthanc_kheops.state.postgres.database import PgDatabase, StateDatabaseError
from orthanc_kheops.state.postgres.migrations import MIGRATIONS, Migration
from orthanc_kheops.state.postgres.outbox import PgOutbox
from orthanc_kheops.state.postgres.rule_store import PgRuleStore
from orthanc_kheops.state.rule_store import Decision, ShareKey
from tests.waiting import wait_until

T0 = 1_000_000.0
LEASE = 30.0  # the node's lease (Kheops.LeaseSeconds)
CLAIM = 600.0  # how long a worker's claim may last (its requests' timeouts)
MB = 1024 * 1024


@pytest.fixture
def second_database(pg_database: PgDatabase, state_database_dsn: str) -> Iterator[PgDatabase]:
    """Another node's pool on the same schema."""
    db = PgDatabase(state_database_dsn, schema=pg_database.schema)
    yield db
    db.close()


def _outboxes(one: PgDatabase, two: PgDatabase) -> tuple[PgOutbox, PgOutbox]:
    return (
        PgOutbox(one, node="node-a", lease_seconds=LEASE),
        PgOutbox(two, node="node-b", lease_seconds=LEASE),
    )


def _claim(
    outbox: PgOutbox, *, now: float = T0, count: int = 50, claim: float = CLAIM
) -> list[str]:
    claimed = outbox.claim(now=now, lease=claim, max_count=count, max_bytes=MB)
    return sorted(i.orthanc_id for i in claimed)


# --- claims and leases ---------------------------------------------------------------------------


def test_two_nodes_claiming_at_once_take_different_instances(
    pg_database: PgDatabase, second_database: PgDatabase
) -> None:
    a, b = _outboxes(pg_database, second_database)
    a.enqueue([(f"i{n:03}", 1) for n in range(200)], now=T0, requeue=True)
    taken: dict[str, list[str]] = {"a": [], "b": []}

    def drain(name: str, outbox: PgOutbox) -> None:
        while batch := _claim(outbox, count=7):
            taken[name].extend(batch)

    threads = [threading.Thread(target=drain, args=item) for item in (("a", a), ("b", b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(taken["a"] + taken["b"]) == [f"i{n:03}" for n in range(200)]
    assert not set(taken["a"]) & set(taken["b"])


def test_a_claim_whose_lease_expired_is_taken_over_by_another_node(
    pg_database: PgDatabase, second_database: PgDatabase
) -> None:
    a, b = _outboxes(pg_database, second_database)
    a.enqueue([("x", 1)], now=T0, requeue=True)
    assert _claim(a) == ["x"]

    assert _claim(b, now=T0 + LEASE - 1) == []
    assert _claim(b, now=T0 + LEASE + 1) == ["x"]


def test_a_node_that_renews_its_leases_keeps_its_claims(
    pg_database: PgDatabase, second_database: PgDatabase
) -> None:
    a, b = _outboxes(pg_database, second_database)
    a.enqueue([("x", 1)], now=T0, requeue=True)
    _claim(a)

    assert a.renew_leases(now=T0 + LEASE - 1) == 1

    assert _claim(b, now=T0 + LEASE + 1) == []


def test_renewals_never_hold_a_claim_past_the_end_the_worker_asked_for(
    pg_database: PgDatabase, second_database: PgDatabase
) -> None:
    a, b = _outboxes(pg_database, second_database)
    a.enqueue([("x", 1)], now=T0, requeue=True)
    _claim(a, claim=40)  # a hung worker: its node is alive and renews

    a.renew_leases(now=T0 + 29)

    assert _claim(b, now=T0 + 39) == []
    assert _claim(b, now=T0 + 40) == ["x"]


def test_a_node_cannot_put_back_a_claim_it_lost_but_its_verdict_counts(
    pg_database: PgDatabase, second_database: PgDatabase
) -> None:
    a, b = _outboxes(pg_database, second_database)
    a.enqueue([("x", 1), ("y", 1)], now=T0, requeue=True)
    _claim(a)
    assert _claim(b, now=T0 + LEASE + 1) == ["x", "y"]

    a.release(["x"])  # too late: node B holds it now
    a.mark_sent(["y"], now=T0 + LEASE + 2)  # KHEOPS stored it: that is the truth

    rows = b.lookup(["x", "y"])
    assert (rows["x"].state, rows["y"].state) == ("inflight", "sent")


def test_a_restarting_node_takes_back_its_own_claims_only(
    pg_database: PgDatabase, second_database: PgDatabase
) -> None:
    a, b = _outboxes(pg_database, second_database)
    a.enqueue([("mine", 1), ("theirs", 1)], now=T0, requeue=True)
    assert _claim(a, count=1) == ["mine"]
    assert _claim(b, count=1) == ["theirs"]

    assert a.recover_interrupted() == 1

    rows = a.lookup(["mine", "theirs"])
    assert (rows["mine"].state, rows["theirs"].state) == ("pending", "inflight")


def test_queuing_from_the_change_log_on_every_node_queues_each_instance_once(
    pg_database: PgDatabase, second_database: PgDatabase
) -> None:
    a, b = _outboxes(pg_database, second_database)
    a.enqueue([("x", 10)], now=T0, requeue=True)
    _claim(a)
    a.mark_sent(["x"], now=T0)

    assert b.enqueue([("x", 0), ("y", 0)], now=T0 + 1, requeue=False) == 1
    assert a.enqueue([("x", 0), ("y", 0)], now=T0 + 1, requeue=False) == 0
    assert a.counts() == {"pending": 1, "inflight": 0, "sent": 1, "failed": 0, "deleted": 0}


def test_the_store_callbacks_enqueue_is_one_statement_without_a_transaction(
    pg_database: PgDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = PgOutbox(pg_database, node="node-a", lease_seconds=LEASE)
    statements: list[str] = []
    execute = pg_database.execute

    def counted(query: str, parameters: Any = ()) -> int:
        statements.append(query)
        return execute(query, parameters)

    def no_transaction() -> None:
        raise AssertionError("the store callback opened a transaction")

    monkeypatch.setattr(pg_database, "execute", counted)
    monkeypatch.setattr(pg_database, "transaction", no_transaction)

    assert outbox.enqueue([("x", 10)], now=T0, requeue=True) == 1

    assert len(statements) == 1
    assert outbox.lookup(["x"])["x"].state == "pending"


# --- a rule held by a share in flight -----------------------------------------------------------

_DOCUMENT = {"Name": "r", "DestinationToken": "TokenAAAAAAAAAAAAAAAAAAA", "Condition": ""}
_KEY = ShareKey("r", "1.2.3", "1.2.3.4")


def _two_nodes_with_a_pending_share(
    one: PgDatabase, two: PgDatabase
) -> tuple[PgRuleStore, PgRuleStore]:
    here = PgRuleStore(one, node="node-a", lease_seconds=LEASE)
    there = PgRuleStore(two, node="node-b", lease_seconds=LEASE)
    here.save_rule("r", origin="api", document=_DOCUMENT, albums=("D", "S"), now=T0)
    here.add_shares({_KEY: Decision("", "d", "i")}, now=T0)
    return here, there


def _waiting_on_a_rule(db: PgDatabase) -> bool:
    """Whether a transaction waits for a row of this schema's rules (it holds the row's
    tuple lock while it waits for the holder)."""
    row = db.fetchone(
        "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'tuple'"
        " AND relation = to_regclass(%s)",
        (f"{db.schema}.rules",),
    )
    return bool(row and row["n"])


@pytest.mark.parametrize("change", ["delete", "save"])
def test_a_rule_held_by_a_share_in_flight_changes_on_another_node_only_after_it(
    pg_database: PgDatabase, second_database: PgDatabase, change: str
) -> None:
    here, there = _two_nodes_with_a_pending_share(pg_database, second_database)
    changed = {**_DOCUMENT, "Condition": "false"}
    dropped: list[int | None] = []

    def other_node() -> None:
        if change == "delete":
            dropped.append(there.delete_rule("r"))
        else:
            there.save_rule("r", origin="api", document=changed, albums=None, now=T0)

    with here.hold_rule("r") as held:
        changing = threading.Thread(target=other_node)
        changing.start()
        wait_until(lambda: _waiting_on_a_rule(pg_database), message="the change waits")
        seen = here.rule("r")
        here.mark_shared(_KEY, now=T0)  # KHEOPS answered 201 to the share in flight
    changing.join(timeout=30)

    assert held is not None and held.document == _DOCUMENT
    assert seen is not None and seen.document == _DOCUMENT
    after = here.rule("r")
    assert (after and after.document) == (None if change == "delete" else changed)
    assert dropped == ([0] if change == "delete" else [])  # the share was made, not dropped


def test_a_node_failing_a_share_of_a_held_rule_leaves_the_holders_own_writes_free(
    pg_database: PgDatabase, second_database: PgDatabase
) -> None:
    """It waits for the rule's row before it takes the share's: no wait across two nodes."""
    here, there = _two_nodes_with_a_pending_share(pg_database, second_database)

    with here.hold_rule("r"):
        failing = threading.Thread(target=lambda: there.mark_failed(_KEY, reason="x", now=T0))
        failing.start()
        wait_until(lambda: _waiting_on_a_rule(pg_database), message="the other node waits")
        marking = threading.Thread(target=lambda: here.mark_shared(_KEY, now=T0))
        marking.start()
        marking.join(timeout=30)
        assert not marking.is_alive(), "the holder's write waited for the other node"
    failing.join(timeout=30)

    assert not failing.is_alive()


# --- advisory locks and migrations ---------------------------------------------------------------


def test_one_node_at_a_time_holds_an_exclusive_task(
    pg_database: PgDatabase, second_database: PgDatabase
) -> None:
    with (
        pg_database.exclusive("reconcile") as first,
        second_database.exclusive("reconcile") as second,
    ):
        assert (first, second) == (True, False)
    with second_database.exclusive("reconcile") as later:
        assert later


def test_nodes_starting_at_once_apply_each_migration_once(state_database_dsn: str) -> None:
    schema = "t_concurrent_start"
    opened: list[PgDatabase] = []
    errors: list[Exception] = []

    def start() -> None:
        try:
            opened.append(PgDatabase(state_database_dsn, schema=schema))
        except Exception as exc:  # noqa: BLE001 -- asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        with opened[0].connection() as connection:
            rows = connection.execute(f"SELECT version FROM {schema}.schema_migrations").fetchall()
        assert [row["version"] for row in rows] == [m.version for m in MIGRATIONS]
    finally:
        for db in opened:
            db.close()
        with psycopg.connect(state_database_dsn, autocommit=True) as plain:
            plain.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def test_a_new_migration_is_applied_to_a_schema_of_the_previous_version(
    pg_database: PgDatabase, state_database_dsn: str
) -> None:
    newer = (*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "a column", "ALTER TABLE nodes ADD x int"))

    PgDatabase(state_database_dsn, schema=pg_database.schema, migrations=newer).close()

    with pg_database.connection() as connection:
        connection.execute("SELECT x FROM nodes")


def test_a_role_without_create_on_the_database_uses_a_schema_made_for_it(
    state_database_dsn: str,
) -> None:
    role, schema = f"r_{uuid.uuid4().hex[:8]}", f"t_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(state_database_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"CREATE SCHEMA {schema} AUTHORIZATION {role}")
    try:
        limited = state_database_dsn.replace("user=kheops_test", f"user={role}")
        PgDatabase(limited, schema=schema).close()
    finally:
        with psycopg.connect(state_database_dsn, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
            admin.execute(f"DROP ROLE {role}")


def test_a_schema_newer_than_the_plugin_is_refused(
    pg_database: PgDatabase, state_database_dsn: str
) -> None:
    newer = (*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "later", "SELECT 1"))
    PgDatabase(state_database_dsn, schema=pg_database.schema, migrations=newer).close()

    with pytest.raises(StateDatabaseError, match="newer than this plugin's"):
        PgDatabase(state_database_dsn, schema=pg_database.schema)


def test_an_unreachable_database_is_reported_in_words() -> None:
    with pytest.raises(StateDatabaseError, match="cannot connect"):
        PgDatabase("host=127.0.0.1 port=1 user=x dbname=x", schema="kheops", timeout=1)


# --- one set of rules ----------------------------------------------------------------------------


def _stores(one: PgDatabase, two: PgDatabase) -> tuple[PgRuleStore, PgRuleStore]:
    return (
        PgRuleStore(one, node="node-a", lease_seconds=LEASE),
        PgRuleStore(two, node="node-b", lease_seconds=LEASE),
    )


def _doc(name: str, **fields: object) -> dict[str, object]:
    return {"Name": name, "DestinationToken": "TokenAAAAAAAAAAAAAAAAAAA", "Condition": "", **fields}


def test_every_change_to_the_rules_on_one_node_changes_the_version_all_nodes_see(
    pg_database: PgDatabase, second_database: PgDatabase
) -> None:
    a, b = _stores(pg_database, second_database)
    seen = [b.rules_version()]

    a.save_rule("r", origin="api", document=_doc("r"), albums=None, now=T0)
    seen.append(b.rules_version())
    a.set_failing("r", "401", now=T0)
    seen.append(b.rules_version())
    a.retry("r", now=T0)
    seen.append(b.rules_version())
    a.delete_rule("r")
    seen.append(b.rules_version())

    assert len(set(seen)) == len(seen)
    assert b.rules() == []


def test_a_share_claimed_by_one_node_is_not_due_on_another_until_its_lease_expires(
    pg_database: PgDatabase, second_database: PgDatabase
) -> None:
    a, b = _stores(pg_database, second_database)
    a.save_rule("r", origin="api", document=_doc("r"), albums=None, now=T0)
    a.add_shares({ShareKey("r", "1.2", "1.2.3"): Decision("", "destination", "i")}, now=T0)

    assert len(a.due_shares(["r"], now=T0, limit=10)) == 1
    assert b.due_shares(["r"], now=T0 + 1, limit=10) == []
    assert b.next_due(["r"]) == T0 + LEASE
    assert len(b.due_shares(["r"], now=T0 + LEASE + 1, limit=10)) == 1


def test_configuration_rules_that_differ_from_the_database_are_named(
    pg_database: PgDatabase, second_database: PgDatabase
) -> None:
    a, b = _stores(pg_database, second_database)
    a.sync_config({"same": _doc("same"), "changed": _doc("changed")}, now=T0)

    differences = b.config_differences(
        {"same": _doc("same"), "changed": _doc("changed", Enabled=False), "new": _doc("new")}
    )

    assert differences == ["changed", "new"]


# --- the node among the others -------------------------------------------------------------------


def _cluster(db: PgDatabase, node: str) -> Cluster:
    config = KheopsConfig(
        url="https://kheops.example.org",
        token=Secret("TokenAAAAAAAAAAAAAAAAAAA"),
        state_directory=Path("/nonexistent"),
        orthanc_url="http://127.0.0.1:8042",
        node_name=node,
        lease_seconds=LEASE,
    )
    return Cluster(
        db,
        outbox=PgOutbox(db, node=node, lease_seconds=LEASE),
        store=PgRuleStore(db, node=node, lease_seconds=LEASE),
        config=config,
        clock=lambda: T0,
    )


def test_a_node_reloads_the_rules_when_another_node_changed_them(
    pg_database: PgDatabase, second_database: PgDatabase
) -> None:
    a = _cluster(pg_database, "node-a")
    a.install_config_rules({})
    reloads: list[int] = []
    a.start(on_rules_changed=lambda: reloads.append(1), last_sent=lambda: None)
    a.stop()  # the heartbeat would call follow_rules by itself
    store_b = PgRuleStore(second_database, node="node-b", lease_seconds=LEASE)

    assert not a.follow_rules()
    store_b.save_rule("r", origin="api", document=_doc("r"), albums=None, now=T0)

    assert a.follow_rules()
    assert reloads == [1]
    assert not a.follow_rules()


def test_configuration_rules_unlike_the_databases_are_logged_as_errors_naming_them(
    pg_database: PgDatabase, second_database: PgDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    PgRuleStore(second_database, node="node-b", lease_seconds=LEASE).sync_config(
        {"cohort": _doc("cohort")}, now=T0
    )

    _cluster(pg_database, "node-a").install_config_rules(
        {"cohort": _doc("cohort", Condition="tagIsPresent('00100010')")}
    )

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "rule 'cohort' in Kheops.SwitchingAlbums differs" in errors[0]
    assert "same configuration" in errors[0]


def test_the_status_lists_the_nodes_seen_with_their_state(
    pg_database: PgDatabase, second_database: PgDatabase
) -> None:
    a, b = _cluster(pg_database, "node-a"), _cluster(second_database, "node-b")
    for cluster in (a, b):
        cluster.install_config_rules({})
        cluster.start(on_rules_changed=lambda: None, last_sent=lambda: T0 - 5)
        cluster.beat(T0)
    b.stop()
    a.stop()
    with pg_database.connection() as connection:  # node A was killed: its beat is old
        connection.execute(
            "UPDATE nodes SET stopped_at = NULL, last_seen = %s WHERE name = 'node-a'",
            (T0 - 60,),
        )

    nodes = {n["Name"]: n for n in a.nodes()}

    assert {name: n["State"] for name, n in nodes.items()} == {
        "node-a": "silent",
        "node-b": "stopped",
    }
    assert nodes["node-b"]["LastSentAt"] == T0 - 5
    assert nodes["node-a"]["This"] and not nodes["node-b"]["This"]


def test_a_node_hears_when_another_node_has_just_sent(
    pg_database: PgDatabase, second_database: PgDatabase
) -> None:
    a, b = _cluster(pg_database, "node-a"), _cluster(second_database, "node-b")
    heard: list[str] = []
    sent_by_b: list[float | None] = [None]
    a.start(on_rules_changed=lambda: None, last_sent=lambda: None,
            on_sent_elsewhere=lambda: heard.append("b sent"))  # fmt: skip
    b.start(on_rules_changed=lambda: None, last_sent=lambda: sent_by_b[0])
    a.stop()  # beats are driven by hand below
    b.stop()

    b.beat(T0)
    a.beat(T0)
    sent_by_b[0] = T0 + 1
    b.beat(T0 + 1)
    a.beat(T0 + 1)
    a.beat(T0 + 2)

    assert heard == ["b sent"]
