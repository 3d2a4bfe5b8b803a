"""Metric names and values, the forwarder's counters, and the thread that publishes them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from orthanc_kheops.forwarding.health import Health, Snapshot, State
from orthanc_kheops.observability.metrics import (
    MetricsCollector,
    MetricsPublisher,
    RuleFigures,
    labelled,
    metric_values,
    rule_figures,
)
from orthanc_kheops.observability.stats import TransferSnapshot, TransferStats
from orthanc_kheops.state.outbox import Retry, SqliteOutbox
from orthanc_kheops.state.rule_store import Decision, RuleStore, ShareKey
from tests.waiting import wait_until

T0 = 1_700_000_000.0


def snapshot(state: State = State.SENDING) -> Snapshot:
    return Snapshot(
        state=state,
        since=T0,
        detail="",
        last_error=None,
        last_error_at=None,
        last_success_at=None,
    )


def values(
    *,
    queue: dict[str, int] | None = None,
    transfer: TransferSnapshot | None = None,
    state: State = State.SENDING,
    rules: list[RuleFigures] | None = None,
    now: float = T0 + 100,
) -> dict[str, float]:
    return metric_values(
        queue=queue or {},
        retries=7,
        transfer=transfer or TransferSnapshot(started_at=T0),
        health=snapshot(state),
        rules=rules or [],
        now=now,
    )


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({}, "kheops_x"),
        ({"state": "pending"}, 'kheops_x{state="pending"}'),
        ({"rule": "a", "state": "failed"}, 'kheops_x{rule="a",state="failed"}'),
        ({"rule": 'say "hi"\\now\n'}, 'kheops_x{rule="say \\"hi\\"\\\\now\\n"}'),
    ],
)
def test_labels_are_written_and_escaped_as_prometheus_reads_them(
    labels: dict[str, str], expected: str
) -> None:
    assert labelled("kheops_x", **labels) == expected


def test_queue_depth_is_given_by_state_with_absent_states_at_zero() -> None:
    result = values(queue={"pending": 5, "failed": 2, "sent": 100})

    assert result['kheops_queue_instances{state="pending"}'] == 5
    assert result['kheops_queue_instances{state="inflight"}'] == 0
    assert result['kheops_queue_instances{state="failed"}'] == 2
    assert not any('state="sent"' in name for name in result)


def test_counters_come_from_the_transfer_statistics_and_the_outbox() -> None:
    transfer = TransferSnapshot(
        started_at=T0,
        stow_requests={"200": 3, "503": 1, "none": 2},
        stow_seconds=1.5,
        stow_bytes=4096,
        sent=30,
        failed=4,
        last_sent_at=T0 + 90,
    )

    result = values(transfer=transfer)

    assert result["kheops_instances_sent_total"] == 30
    assert result["kheops_instances_failed_total"] == 4
    assert result["kheops_instances_retried_total"] == 7
    assert result['kheops_stow_requests_total{code="200"}'] == 3
    assert result['kheops_stow_requests_total{code="503"}'] == 1
    assert result['kheops_stow_requests_total{code="none"}'] == 2
    assert result["kheops_stow_request_duration_seconds_sum"] == 1.5
    assert result["kheops_stow_request_duration_seconds_count"] == 6
    assert result["kheops_stow_sent_bytes_total"] == 4096
    assert result["kheops_last_send_age_seconds"] == 10


def test_the_age_of_the_last_send_counts_from_the_start_until_something_is_sent() -> None:
    result = values(transfer=TransferSnapshot(started_at=T0), now=T0 + 900)

    assert result["kheops_last_send_age_seconds"] == 900


@pytest.mark.parametrize(
    ("state", "accepted"),
    [(State.SENDING, 1), (State.UNREACHABLE, 1), (State.PAUSED, 0)],
)
def test_the_token_counts_as_refused_only_while_sending_is_paused(
    state: State, accepted: int
) -> None:
    result = values(state=state)

    assert result["kheops_token_accepted"] == accepted
    states = {s.value: result[f'kheops_state{{state="{s.value}"}}'] for s in State}
    assert states == {s.value: int(s is state) for s in State}


def test_each_rule_has_its_share_counts_and_whether_it_is_failing() -> None:
    rules = [
        RuleFigures(name="ct", shared=5, pending=1, failed=0, failing=False),
        RuleFigures(name="mr", shared=0, pending=3, failed=2, failing=True),
    ]

    result = values(rules=rules)

    assert result['kheops_rule_shares{rule="ct",state="shared"}'] == 5
    assert result['kheops_rule_shares{rule="ct",state="pending"}'] == 1
    assert result['kheops_rule_shares{rule="mr",state="failed"}'] == 2
    assert result['kheops_rule_failing{rule="ct"}'] == 0
    assert result['kheops_rule_failing{rule="mr"}'] == 1


def test_every_name_is_in_prometheus_style_with_a_unit_or_total() -> None:
    result = values(
        transfer=TransferSnapshot(started_at=T0, stow_requests={"200": 1}),
        rules=[RuleFigures(name="ct", shared=1, pending=0, failed=0, failing=False)],
    )

    for name in result:
        base = name.split("{")[0]
        assert base.startswith("kheops_") and base == base.lower()
        assert base.endswith(("_total", "_seconds", "_sum", "_count", "_instances")) or base in {
            "kheops_token_accepted",
            "kheops_state",
            "kheops_state_writable",
            "kheops_rule_shares",
            "kheops_rule_failing",
        }, base


# --- the forwarder's counters ----------------------------------------------------------------


def test_transfer_statistics_add_up_requests_from_many_threads() -> None:
    stats = TransferStats(now=T0)

    def send() -> None:
        for _ in range(200):
            stats.record_stow(status=200, seconds=0.01, size=10)
            stats.record_sent(2, now=T0 + 1)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats.record_stow(status=None, seconds=30.0, size=10)
    stats.record_failed(3)

    snapshot = stats.snapshot()
    assert snapshot.stow_requests == {"200": 800, "none": 1}
    assert snapshot.stow_bytes == 8010
    assert snapshot.stow_seconds == pytest.approx(38.0)
    assert snapshot.sent == 1600
    assert snapshot.failed == 3
    assert snapshot.last_sent_at == T0 + 1
    assert snapshot.started_at == T0


# --- collecting from the live objects ----------------------------------------------------------


@pytest.fixture
def outbox(tmp_path: Path) -> SqliteOutbox:
    return SqliteOutbox(tmp_path / "outbox.sqlite3")


def test_the_collector_reads_the_outbox_and_the_forwarder_state(outbox: SqliteOutbox) -> None:
    outbox.enqueue([("a", 10), ("b", 10), ("c", 10)], now=T0, requeue=True)
    outbox.mark_failed({"c": "292"}, now=T0)
    claimed = outbox.claim(now=T0, lease=60, max_count=10, max_bytes=1 << 20)
    outbox.reschedule([Retry(i.orthanc_id, 0.0, "503") for i in claimed], now=T0)
    stats = TransferStats(now=T0)
    stats.record_sent(1, now=T0 + 5)
    health = Health(now=T0, probe_maximum=30)
    health.record_refused("STOW-RS: KHEOPS answered 401", T0 + 1)

    result = MetricsCollector(
        outbox=outbox, stats=stats, health=health, clock=lambda: T0 + 65
    ).values()

    assert result['kheops_queue_instances{state="pending"}'] == 2
    assert result['kheops_queue_instances{state="failed"}'] == 1
    assert result["kheops_instances_retried_total"] == 2
    assert result["kheops_token_accepted"] == 0
    assert result["kheops_last_send_age_seconds"] == 60


def test_rule_figures_count_the_shares_of_each_rule_in_the_store(tmp_path: Path) -> None:
    store = RuleStore(tmp_path / "switching.sqlite3")
    for name in ("ct", "mr"):
        store.save_rule(name, origin="api", document={"Name": name}, albums=None, now=T0)
    decision = Decision("", "destination", None)
    store.add_shares({ShareKey("ct", "1.2", s): decision for s in ("1.2.1", "1.2.2")}, now=T0)
    store.mark_shared(ShareKey("ct", "1.2", "1.2.1"), now=T0)

    figures = rule_figures(store, {"mr": "DestinationToken: is not active"})

    assert figures == [
        RuleFigures(name="ct", shared=1, pending=1, failed=0, failing=False),
        RuleFigures(name="mr", shared=0, pending=0, failed=0, failing=True),
    ]


def test_a_deleted_rules_metrics_drop_to_zero_once(outbox: SqliteOutbox) -> None:
    rounds = [[RuleFigures(name="gone", shared=4, pending=1, failed=0, failing=True)], [], []]
    collector = MetricsCollector(
        outbox=outbox,
        stats=TransferStats(now=T0),
        health=Health(now=T0, probe_maximum=30),
        rules=lambda: rounds.pop(0),
    )

    first, second, third = collector.values(), collector.values(), collector.values()

    assert first['kheops_rule_shares{rule="gone",state="shared"}'] == 4
    assert second['kheops_rule_shares{rule="gone",state="shared"}'] == 0
    assert second['kheops_rule_failing{rule="gone"}'] == 0
    assert not any("gone" in name for name in third)


# --- publishing ------------------------------------------------------------------------------


def test_the_publisher_sets_every_value_as_a_float_and_again_when_woken() -> None:
    published: list[tuple[str, float]] = []
    rounds: list[dict[str, float]] = [{"kheops_a": 1, "kheops_b": 2.5}, {"kheops_a": 3}]

    def collect() -> dict[str, float]:
        return rounds.pop(0) if len(rounds) > 1 else rounds[0]

    publisher = MetricsPublisher(
        collect, lambda name, value: published.append((name, value)), period=60
    )
    publisher.start()
    try:
        wait_until(lambda: ("kheops_b", 2.5) in published, message="first round published")
        publisher.wake()
        wait_until(lambda: ("kheops_a", 3.0) in published, message="woken round published")
    finally:
        publisher.stop()
    assert all(isinstance(value, float) for _, value in published)


def test_a_failing_round_is_logged_once_and_the_thread_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempts: list[int] = []

    def collect() -> dict[str, float]:
        attempts.append(1)
        if len(attempts) < 4:
            raise OSError("database is locked")
        return {"kheops_a": 1}

    published: list[tuple[str, float]] = []
    publisher = MetricsPublisher(collect, lambda n, v: published.append((n, v)), period=60)
    with caplog.at_level("WARNING", logger="orthanc_kheops.observability.metrics"):
        for _ in range(4):
            publisher.publish_once()

    assert published == [("kheops_a", 1.0)]
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["cannot publish the metrics now: OSError: database is locked"]


def test_stopping_the_publisher_ends_its_thread_at_once() -> None:
    publisher = MetricsPublisher(dict, lambda name, value: None, period=3600)
    publisher.start()
    thread = publisher._thread
    assert thread is not None

    publisher.stop(timeout=10)

    assert not thread.is_alive()


def test_instances_deleted_before_they_were_sent_and_a_full_disk_show_in_the_metrics() -> None:
    result = metric_values(
        queue={"pending": 1, "deleted": 4},
        retries=0,
        transfer=TransferSnapshot(started_at=T0),
        health=snapshot(State.SENDING),
        rules=[],
        now=T0,
        store_writable=False,
    )

    assert result["kheops_instances_deleted_unsent_total"] == 4
    assert result["kheops_state_writable"] == 0
    assert values()["kheops_state_writable"] == 1
