"""The outbox contract (`Outbox`), the same tests for every back-end (see conftest.py)."""

from __future__ import annotations

import pytest

from orthanc_kheops.state.outbox import Outbox, Retry
from tests.contract.conftest import OutboxBackend

T0 = 1_000_000.0
MB = 1024 * 1024
LEASE = 600.0


def _claim(outbox: Outbox, *, now: float = T0, count: int = 50, size: int = 64 * MB) -> list[str]:
    return [
        i.orthanc_id for i in outbox.claim(lease=LEASE, now=now, max_count=count, max_bytes=size)
    ]


def _state(outbox: Outbox, orthanc_id: str) -> str:
    return outbox.lookup([orthanc_id])[orthanc_id].state


# --- enqueue and claim ---------------------------------------------------------------------------


def test_enqueued_instances_are_pending_and_due_at_once(outbox: Outbox) -> None:
    added = outbox.enqueue([("a", 10), ("b", 20)], now=T0, requeue=True)

    assert added == 2
    assert outbox.counts() == {"pending": 2, "inflight": 0, "sent": 0, "failed": 0, "deleted": 0}
    row = outbox.lookup(["a"])["a"]
    assert (row.state, row.size, row.attempts, row.queued_at, row.next_attempt) == (
        "pending",
        10,
        0,
        T0,
        T0,
    )
    assert outbox.next_due() == T0


def test_a_claimed_instance_carries_where_its_file_was_when_queued(outbox: Outbox) -> None:
    outbox.enqueue([("a", 10), ("b", 20)], now=T0, requeue=False, files={"a": "uuid-of-a"})
    outbox.enqueue([("c", 10), ("d", 10)], now=T0, requeue=True, files={"c": "uuid-of-c"})
    outbox.enqueue([("e", 10)], now=T0, requeue=True, files={"e": "uuid-of-e"})

    claimed = outbox.claim(lease=LEASE, now=T0, max_count=50, max_bytes=64 * MB)

    assert {i.orthanc_id: i.file_uuid for i in claimed} == {
        "a": "uuid-of-a",
        "b": None,
        "c": "uuid-of-c",
        "d": None,
        "e": "uuid-of-e",
    }


def test_a_file_queued_again_keeps_no_place_it_no_longer_has(outbox: Outbox) -> None:
    outbox.enqueue([("a", 10), ("b", 10)], now=T0, requeue=True, files={"a": "old", "b": "old"})
    outbox.enqueue([("a", 10)], now=T0 + 1, requeue=True)  # stored again: a new file
    outbox.enqueue([("b", 10)], now=T0 + 1, requeue=True, files={"b": "new"})

    assert outbox.lookup(["a"])["a"].file_uuid is None
    assert outbox.lookup(["b"])["b"].file_uuid == "new"


def test_claim_takes_at_most_the_maximum_count(outbox: Outbox) -> None:
    outbox.enqueue([(f"i{n}", 1) for n in range(7)], now=T0, requeue=True)

    assert len(_claim(outbox, count=3)) == 3
    assert len(_claim(outbox, count=3)) == 3
    assert len(_claim(outbox, count=3)) == 1
    assert _claim(outbox, count=3) == []


def test_claim_stops_before_the_byte_limit(outbox: Outbox) -> None:
    outbox.enqueue([("a", 40), ("b", 40), ("c", 40)], now=T0, requeue=True)

    assert sorted(_claim(outbox, size=100)) == ["a", "b"]
    assert _claim(outbox, size=100) == ["c"]


def test_an_instance_larger_than_the_byte_limit_still_goes_alone(outbox: Outbox) -> None:
    outbox.enqueue([("huge", 500)], now=T0, requeue=True)
    outbox.enqueue([("small", 1)], now=T0 + 1, requeue=True)

    assert _claim(outbox, now=T0 + 1, size=100) == ["huge"]
    assert _claim(outbox, now=T0 + 1, size=100) == ["small"]


def test_claim_takes_only_instances_that_are_due(outbox: Outbox) -> None:
    outbox.enqueue([("now", 1)], now=T0, requeue=True)
    outbox.enqueue([("later", 1)], now=T0 + 60, requeue=True)

    assert _claim(outbox, now=T0 + 30) == ["now"]
    assert _claim(outbox, now=T0 + 30) == []
    assert _claim(outbox, now=T0 + 60) == ["later"]


def test_claim_takes_the_longest_waiting_first(outbox: Outbox) -> None:
    outbox.enqueue([("third", 1)], now=T0 + 2, requeue=True)
    outbox.enqueue([("first", 1)], now=T0, requeue=True)
    outbox.enqueue([("second", 1)], now=T0 + 1, requeue=True)

    assert _claim(outbox, now=T0 + 5, count=2) == ["first", "second"]


def test_claimed_instances_are_inflight_and_not_claimed_again(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1), ("b", 1)], now=T0, requeue=True)

    claimed = outbox.claim(lease=LEASE, now=T0, max_count=50, max_bytes=MB)

    assert {i.state for i in claimed} == {"inflight"}
    assert {_state(outbox, i.orthanc_id) for i in claimed} == {"inflight"}
    assert outbox.counts()["inflight"] == 2
    assert _claim(outbox) == []
    assert outbox.next_due() is None


def test_instances_marked_to_go_alone_are_claimed_one_per_request(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1), ("b", 1), ("c", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.reschedule(
        [Retry(x, 0.0, "400", alone=True, counts_as_attempt=False) for x in ("a", "b", "c")],
        now=T0,
    )

    batches = [_claim(outbox), _claim(outbox), _claim(outbox)]

    assert sorted(b[0] for b in batches) == ["a", "b", "c"]
    assert all(len(b) == 1 for b in batches)


def test_an_alone_instance_ends_a_batch_that_already_has_others(outbox: Outbox) -> None:
    outbox.enqueue([("alone", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.reschedule([Retry("alone", 1.0, "400", alone=True)], now=T0)
    outbox.enqueue([("before", 1)], now=T0, requeue=True)
    outbox.enqueue([("after", 1)], now=T0 + 2, requeue=True)

    assert _claim(outbox, now=T0 + 2) == ["before"]
    assert _claim(outbox, now=T0 + 2) == ["alone"]
    assert _claim(outbox, now=T0 + 2) == ["after"]


def test_a_batch_that_is_not_full_waits_until_its_oldest_instance_has_lingered(
    outbox: Outbox,
) -> None:
    outbox.enqueue([("first", 1)], now=T0, requeue=True)
    outbox.enqueue([("second", 1)], now=T0 + 0.3, requeue=True)

    assert outbox.claim(lease=LEASE, now=T0 + 0.4, max_count=3, max_bytes=MB, linger=0.5) == []
    assert _state(outbox, "first") == "pending"
    claimed = outbox.claim(lease=LEASE, now=T0 + 0.5, max_count=3, max_bytes=MB, linger=0.5)
    assert [i.orthanc_id for i in claimed] == ["first", "second"]


def test_a_backlog_made_due_after_an_outage_is_taken_without_lingering(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1), ("b", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.reschedule([Retry("a", 100.0, "503"), Retry("b", 100.0, "503")], now=T0)

    claimed = outbox.claim(lease=LEASE, now=T0 + 100, max_count=3, max_bytes=MB, linger=0.5)

    assert [i.orthanc_id for i in claimed] == ["a", "b"]  # queued long ago: nothing to wait for


def test_a_full_batch_is_taken_without_lingering(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1), ("b", 1), ("c", 1)], now=T0, requeue=True)

    claimed = outbox.claim(lease=LEASE, now=T0, max_count=2, max_bytes=MB, linger=60)

    assert [i.orthanc_id for i in claimed] == ["a", "b"]


def test_a_batch_that_reached_the_byte_limit_is_taken_without_lingering(
    outbox: Outbox,
) -> None:
    outbox.enqueue([("a", 40), ("b", 40), ("c", 40)], now=T0, requeue=True)

    claimed = outbox.claim(lease=LEASE, now=T0, max_count=50, max_bytes=100, linger=60)

    assert [i.orthanc_id for i in claimed] == ["a", "b"]


def test_an_instance_retried_alone_is_taken_without_lingering(outbox: Outbox) -> None:
    outbox.enqueue([("alone", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.reschedule([Retry("alone", 0.0, "400", alone=True)], now=T0)

    claimed = outbox.claim(lease=LEASE, now=T0, max_count=50, max_bytes=MB, linger=60)

    assert [i.orthanc_id for i in claimed] == ["alone"]


# --- outcomes ------------------------------------------------------------------------------------


def test_sent_instances_count_their_attempt_and_clear_the_error(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.reschedule([Retry("a", 5.0, "503")], now=T0)
    _claim(outbox, now=T0 + 5)

    outbox.mark_sent(["a"], now=T0 + 6)

    row = outbox.lookup(["a"])["a"]
    assert (row.state, row.attempts, row.last_error, row.done_at) == ("sent", 2, None, T0 + 6)


def test_failed_instances_keep_their_reason(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1), ("b", 1)], now=T0, requeue=True)
    _claim(outbox)

    outbox.mark_failed({"a": "not authorized (292)"}, now=T0 + 1)

    row = outbox.lookup(["a"])["a"]
    assert (row.state, row.attempts, row.last_error, row.done_at) == (
        "failed",
        1,
        "not authorized (292)",
        T0 + 1,
    )
    assert _state(outbox, "b") == "inflight"


def test_rescheduled_instances_wait_their_delay_and_count_an_attempt(
    outbox: Outbox,
) -> None:
    outbox.enqueue([("a", 1), ("b", 1)], now=T0, requeue=True)
    _claim(outbox)

    outbox.reschedule(
        [Retry("a", 10.0, "503"), Retry("b", 1.0, "orthanc busy", counts_as_attempt=False)],
        now=T0,
    )

    a, b = outbox.lookup(["a"])["a"], outbox.lookup(["b"])["b"]
    assert (a.state, a.attempts, a.next_attempt, a.last_error) == ("pending", 1, T0 + 10, "503")
    assert (b.state, b.attempts, b.next_attempt) == ("pending", 0, T0 + 1)
    assert outbox.get_meta("retries") == 1
    assert _claim(outbox, now=T0 + 5) == ["b"]
    assert _claim(outbox, now=T0 + 10) == ["a"]


def test_released_instances_are_pending_again_with_their_attempts_unchanged(
    outbox: Outbox,
) -> None:
    outbox.enqueue([("a", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.reschedule([Retry("a", 0.0, "503")], now=T0)
    _claim(outbox)

    outbox.release(["a"])

    row = outbox.lookup(["a"])["a"]
    assert (row.state, row.attempts) == ("pending", 1)
    assert _claim(outbox) == ["a"]


def test_release_leaves_instances_that_are_not_inflight_alone(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.mark_sent(["a"], now=T0)

    outbox.release(["a"])

    assert _state(outbox, "a") == "sent"


def test_a_late_retry_does_not_send_again_an_instance_already_sent(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1), ("b", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.mark_sent(["a"], now=T0)
    outbox.mark_failed({"b": "262"}, now=T0)

    outbox.reschedule(
        [Retry("a", 1.0, "internal error"), Retry("b", 1.0, "internal error")], now=T0
    )

    assert _state(outbox, "a") == "sent"
    assert _state(outbox, "b") == "failed"
    assert outbox.get_meta("retries") is None


def test_sop_uids_are_recorded(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1)], now=T0, requeue=True)

    outbox.set_sop_uids({"a": "1.2.3"})

    assert outbox.lookup(["a"])["a"].sop_uid == "1.2.3"


def test_sop_uids_given_with_the_verdict_are_recorded_and_known_ones_kept(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1), ("b", 1)], now=T0, requeue=True)
    outbox.set_sop_uids({"b": "1.2.9"})
    _claim(outbox)

    outbox.mark_sent(["a", "b"], now=T0 + 1, sop_uids={"a": "1.2.3"})

    found = outbox.lookup(["a", "b"])
    assert (found["a"].state, found["a"].sop_uid) == ("sent", "1.2.3")
    assert (found["b"].state, found["b"].sop_uid) == ("sent", "1.2.9")


# --- requeue -------------------------------------------------------------------------------------


@pytest.mark.parametrize("finished", ["sent", "failed"])
def test_a_re_stored_instance_goes_back_to_pending(outbox: Outbox, finished: str) -> None:
    outbox.enqueue([("a", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.reschedule([Retry("a", 0.0, "503", alone=True)], now=T0)
    _claim(outbox)
    if finished == "sent":
        outbox.mark_sent(["a"], now=T0 + 1)
    else:
        outbox.mark_failed({"a": "262"}, now=T0 + 1)

    changed = outbox.enqueue([("a", 99)], now=T0 + 100, requeue=True)

    row = outbox.lookup(["a"])["a"]
    assert changed == 1
    assert (row.state, row.size, row.attempts, row.queued_at, row.next_attempt) == (
        "pending",
        99,
        0,
        T0 + 100,
        T0 + 100,
    )
    assert (row.alone, row.last_error, row.done_at) == (False, None, None)


def test_requeue_leaves_an_inflight_instance_to_its_worker(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1)], now=T0, requeue=True)
    _claim(outbox)

    outbox.enqueue([("a", 1)], now=T0 + 1, requeue=True)

    assert _state(outbox, "a") == "inflight"
    assert _claim(outbox) == []


@pytest.mark.parametrize("verdict", ["sent", "failed"])
def test_an_instance_stored_again_while_in_flight_is_sent_again_after_its_verdict(
    outbox: Outbox, verdict: str
) -> None:
    outbox.enqueue([("a", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.enqueue([("a", 2)], now=T0 + 1, requeue=True)

    if verdict == "sent":
        outbox.mark_sent(["a"], now=T0 + 2)
    else:
        outbox.mark_failed({"a": "292"}, now=T0 + 2)

    row = outbox.lookup(["a"])["a"]
    assert (row.state, row.size, row.attempts, row.last_error) == ("pending", 2, 0, None)
    assert _claim(outbox, now=T0 + 2) == ["a"]


def test_a_verdict_on_an_instance_not_stored_again_is_final(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.enqueue([("b", 1)], now=T0 + 1, requeue=True)

    outbox.mark_sent(["a"], now=T0 + 2)

    assert _state(outbox, "a") == "sent"


def test_the_reconciler_does_not_touch_instances_already_in_the_outbox(
    outbox: Outbox,
) -> None:
    outbox.enqueue([("sent", 1), ("failed", 1), ("waiting", 1)], now=T0, requeue=True)
    _claim(outbox, count=2)  # sent, failed (insertion order for equal due times)
    outbox.mark_sent(["sent"], now=T0)
    outbox.mark_failed({"failed": "292"}, now=T0)
    outbox.reschedule([], now=T0)

    changed = outbox.enqueue(
        [("sent", 0), ("failed", 0), ("waiting", 0), ("new", 0)], now=T0 + 50, requeue=False
    )

    assert changed == 1
    found = outbox.lookup(["sent", "failed", "waiting", "new"])
    assert {k: v.state for k, v in found.items()} == {
        "sent": "sent",
        "failed": "failed",
        "waiting": "pending",
        "new": "pending",
    }
    assert found["waiting"].queued_at == T0
    assert found["waiting"].size == 1


def test_queuing_one_instance_counts_whether_it_changed_the_outbox(outbox: Outbox) -> None:
    # One instance at a time is the store callback's path: one statement, no transaction.
    assert outbox.enqueue([("a", 1)], now=T0, requeue=False) == 1
    assert outbox.enqueue([("a", 2)], now=T0 + 1, requeue=False) == 0
    assert outbox.lookup(["a"])["a"].size == 1
    assert outbox.enqueue([("a", 3)], now=T0 + 2, requeue=True) == 1
    assert outbox.lookup(["a"])["a"].size == 3


# --- crash recovery and durability -----------------------------------------------------------------


def test_instances_in_flight_during_a_crash_are_pending_after_restart(
    backend: OutboxBackend,
) -> None:
    first = backend.open()
    first.enqueue([("a", 1), ("b", 1), ("c", 1)], now=T0, requeue=True)
    first.claim(lease=LEASE, now=T0, max_count=50, max_bytes=MB)
    first.reschedule([Retry("a", 0.0, "503"), Retry("b", 0.0, "503")], now=T0)
    first.claim(
        lease=LEASE, now=T0, max_count=1, max_bytes=MB
    )  # "a" in flight again, with 1 attempt
    first.close()

    second = backend.open()
    try:
        recovered = second.recover_interrupted()
        rows = second.lookup(["a", "b", "c"])
    finally:
        second.close()

    assert recovered == 2  # "a" and "c"
    assert {k: (v.state, v.attempts) for k, v in rows.items()} == {
        "a": ("pending", 1),
        "b": ("pending", 1),
        "c": ("pending", 0),
    }


def test_a_committed_row_is_there_after_reopening_the_store(backend: OutboxBackend) -> None:
    first = backend.open()
    first.enqueue([("a", 123)], now=T0, requeue=True)
    first.set_meta("last_change", 42)
    first.close()

    second = backend.open()
    try:
        assert second.lookup(["a"])["a"].size == 123
        assert second.get_meta("last_change") == 42
    finally:
        second.close()


# --- make_due and retry_failed ---------------------------------------------------------------------


def test_make_due_brings_every_waiting_instance_forward(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1), ("b", 1), ("c", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.reschedule([Retry("a", 100.0, "503"), Retry("b", 300.0, "503")], now=T0)
    outbox.mark_sent(["c"], now=T0)

    woken = outbox.make_due(now=T0 + 1)

    assert woken == 2
    assert sorted(_claim(outbox, now=T0 + 1)) == ["a", "b"]
    assert _state(outbox, "c") == "sent"


def _two_failed_one_sent(outbox: Outbox) -> None:
    outbox.enqueue([("f1", 1), ("f2", 1), ("s", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.mark_failed({"f1": "292", "f2": "262"}, now=T0)
    outbox.mark_sent(["s"], now=T0)


def test_retry_failed_without_ids_queues_every_failed_instance(outbox: Outbox) -> None:
    _two_failed_one_sent(outbox)

    moved = outbox.retry_failed(None, now=T0 + 10)

    assert moved == 2
    rows = outbox.lookup(["f1", "f2", "s"])
    assert {k: (v.state, v.attempts) for k, v in rows.items()} == {
        "f1": ("pending", 0),
        "f2": ("pending", 0),
        "s": ("sent", 1),
    }
    assert rows["f1"].next_attempt == T0 + 10
    assert rows["f1"].queued_at == T0 + 10
    assert rows["f1"].done_at is None


def test_retry_failed_with_ids_queues_only_those_that_failed(outbox: Outbox) -> None:
    _two_failed_one_sent(outbox)

    moved = outbox.retry_failed(["f2", "s", "unknown"], now=T0 + 10)

    assert moved == 1
    states = {k: v.state for k, v in outbox.lookup(["f1", "f2", "s"]).items()}
    assert states == {"f1": "failed", "f2": "pending", "s": "sent"}


# --- listing -------------------------------------------------------------------------------------


def test_counts_name_every_state(outbox: Outbox) -> None:
    assert outbox.counts() == {"pending": 0, "inflight": 0, "sent": 0, "failed": 0, "deleted": 0}
    _two_failed_one_sent(outbox)
    outbox.enqueue([("p", 1)], now=T0, requeue=True)

    assert outbox.counts() == {"pending": 1, "inflight": 0, "sent": 1, "failed": 2, "deleted": 0}


def test_pending_entries_are_listed_by_due_time(outbox: Outbox) -> None:
    outbox.enqueue([("c", 1)], now=T0 + 3, requeue=True)
    outbox.enqueue([("a", 1)], now=T0 + 1, requeue=True)
    outbox.enqueue([("b", 1)], now=T0 + 2, requeue=True)

    assert [e.orthanc_id for e in outbox.entries("pending", limit=10)] == ["a", "b", "c"]
    assert [e.orthanc_id for e in outbox.entries("pending", limit=1, offset=1)] == ["b"]


def test_finished_entries_are_listed_most_recent_first(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1), ("b", 1), ("c", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.mark_sent(["b"], now=T0 + 1)
    outbox.mark_sent(["c"], now=T0 + 3)
    outbox.mark_sent(["a"], now=T0 + 2)

    assert [e.orthanc_id for e in outbox.entries("sent", limit=10)] == ["c", "a", "b"]
    assert [e.orthanc_id for e in outbox.entries("failed", limit=10)] == []


def test_entries_as_json_show_the_next_attempt_only_while_pending(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1), ("b", 1)], now=T0, requeue=True)
    outbox.set_sop_uids({"a": "1.2.3"})
    outbox.claim(lease=LEASE, now=T0, max_count=1, max_bytes=MB)
    outbox.mark_failed({"a": "292"}, now=T0 + 1)

    failed = outbox.entries("failed", limit=10)[0].as_json()
    pending = outbox.entries("pending", limit=10)[0].as_json()

    assert failed == {
        "ID": "a",
        "SOPInstanceUID": "1.2.3",
        "State": "failed",
        "Attempts": 1,
        "QueuedAt": T0,
        "NextAttempt": None,
        "LastError": "292",
        "DoneAt": T0 + 1,
    }
    assert pending["NextAttempt"] == T0


def test_lookup_finds_known_ids_in_any_number(outbox: Outbox) -> None:
    ids = [f"id{n:04}" for n in range(1200)]
    outbox.enqueue([(i, 1) for i in ids], now=T0, requeue=True)

    found = outbox.lookup([*ids, "unknown"])

    assert set(found) == set(ids)


# --- meta and counters ---------------------------------------------------------------------------


def test_meta_values_round_trip_as_json(outbox: Outbox) -> None:
    assert outbox.get_meta("missing") is None
    outbox.set_meta("last_change", 17)
    outbox.set_meta("doc", {"a": [1, "b"]})
    outbox.set_meta("last_change", 18)

    assert outbox.get_meta("last_change") == 18
    assert outbox.get_meta("doc") == {"a": [1, "b"]}


# --- leases ----------------------------------------------------------------------------------------


def test_a_claim_that_no_worker_finishes_is_due_again_when_its_lease_ends(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1), ("b", 1)], now=T0, requeue=True)
    assert sorted(
        i.orthanc_id for i in outbox.claim(now=T0, lease=60, max_count=50, max_bytes=MB)
    ) == [
        "a",
        "b",
    ]

    assert outbox.claim(now=T0 + 59, lease=60, max_count=50, max_bytes=MB) == []
    assert outbox.counts()["inflight"] == 2
    again = outbox.claim(now=T0 + 60, lease=60, max_count=50, max_bytes=MB)

    assert sorted(i.orthanc_id for i in again) == ["a", "b"]
    assert {i.attempts for i in again} == {0}
    assert outbox.counts()["inflight"] == 2


def test_a_verdict_after_the_lease_ended_still_counts(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1)], now=T0, requeue=True)
    outbox.claim(now=T0, lease=60, max_count=50, max_bytes=MB)
    outbox.claim(now=T0 + 61, lease=60, max_count=50, max_bytes=MB)

    outbox.mark_sent(["a"], now=T0 + 62)

    assert _state(outbox, "a") == "sent"
    assert outbox.counts()["inflight"] == 0


def test_a_probe_takes_the_oldest_instance_before_its_backoff_ends(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1), ("b", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.reschedule([Retry("a", 300.0, "503"), Retry("b", 600.0, "503")], now=T0)

    probe = outbox.claim(now=T0 + 1, lease=60, max_count=1, max_bytes=0, due_by=float("inf"))

    assert [i.orthanc_id for i in probe] == ["a"]
    assert _state(outbox, "b") == "pending"


def test_a_probe_does_not_end_the_leases_of_other_claims(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1), ("b", 1)], now=T0, requeue=True)
    outbox.claim(now=T0, lease=60, max_count=1, max_bytes=MB)

    outbox.claim(now=T0 + 1, lease=60, max_count=1, max_bytes=0, due_by=float("inf"))

    assert outbox.counts()["inflight"] == 2


def test_an_instance_of_unknown_size_travels_alone(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1)], now=T0, requeue=True)
    outbox.enqueue([("unknown", 0)], now=T0 + 1, requeue=True)
    outbox.enqueue([("b", 1)], now=T0 + 2, requeue=True)

    assert _claim(outbox, now=T0 + 2) == ["a"]
    assert _claim(outbox, now=T0 + 2) == ["unknown"]
    assert _claim(outbox, now=T0 + 2) == ["b"]


# --- deletions, pruning and exact counts -----------------------------------------------------------


def test_instances_deleted_before_they_were_sent_leave_the_queue_counted(outbox: Outbox) -> None:
    for n, name in enumerate(("failed", "sent", "inflight", "pending")):
        outbox.enqueue([(name, 1)], now=T0 + n, requeue=True)
    assert _claim(outbox, now=T0 + 3, count=3) == ["failed", "sent", "inflight"]
    outbox.mark_failed({"failed": "292"}, now=T0 + 3)
    outbox.mark_sent(["sent"], now=T0 + 3)

    gone = outbox.forget_deleted(["pending", "failed", "sent", "inflight", "unknown"])

    assert gone == 2
    remaining = outbox.lookup(["pending", "failed", "sent", "inflight"])
    assert {k: v.state for k, v in remaining.items()} == {"inflight": "inflight"}
    assert outbox.counts() == {"pending": 0, "inflight": 1, "sent": 1, "failed": 0, "deleted": 2}


def test_a_sent_instance_deleted_then_stored_again_is_queued_again(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.mark_sent(["a"], now=T0 + 1)
    outbox.forget_deleted(["a"])

    queued = outbox.enqueue([("a", 2)], now=T0 + 2, requeue=False)  # its new change event

    assert queued == 1
    assert outbox.lookup(["a"])["a"].state == "pending"
    assert outbox.counts()["sent"] == 1


def test_sent_rows_are_pruned_after_the_retention_and_still_counted(outbox: Outbox) -> None:
    outbox.enqueue(
        [(f"old{n}", 1) for n in range(5)] + [("new", 1), ("failed", 1)], now=T0, requeue=True
    )
    _claim(outbox)
    outbox.mark_sent([f"old{n}" for n in range(5)], now=T0)
    outbox.mark_sent(["new"], now=T0 + 100)
    outbox.mark_failed({"failed": "292"}, now=T0)

    first = outbox.prune_sent(before=T0 + 50, limit=3)
    second = outbox.prune_sent(before=T0 + 50, limit=3)

    assert (first, second) == (3, 2)
    assert outbox.prune_sent(before=T0 + 50, limit=3) == 0
    assert set(outbox.lookup([f"old{n}" for n in range(5)] + ["new", "failed"])) == {
        "new",
        "failed",
    }
    assert outbox.counts() == {"pending": 0, "inflight": 0, "sent": 6, "failed": 1, "deleted": 0}


def test_a_pruned_instance_stored_again_is_queued_again(outbox: Outbox) -> None:
    outbox.enqueue([("a", 1)], now=T0, requeue=True)
    _claim(outbox)
    outbox.mark_sent(["a"], now=T0)
    outbox.prune_sent(before=T0 + 1, limit=10)

    assert outbox.enqueue([("a", 1)], now=T0 + 2, requeue=True) == 1
    assert _claim(outbox, now=T0 + 2) == ["a"]


def test_counts_follow_every_move_and_survive_a_restart(backend: OutboxBackend) -> None:
    first = backend.open()
    first.enqueue([(f"i{n}", 1) for n in range(10)], now=T0, requeue=True)
    claimed = [i.orthanc_id for i in first.claim(now=T0, lease=LEASE, max_count=6, max_bytes=MB)]
    first.mark_sent(claimed[:2], now=T0)
    first.mark_failed({claimed[2]: "292"}, now=T0)
    first.reschedule([Retry(claimed[3], 5.0, "503")], now=T0)
    first.enqueue([(claimed[0], 1)], now=T0 + 1, requeue=True)  # stored again: pending
    first.retry_failed(None, now=T0 + 2)
    first.close()

    second = backend.open()
    try:
        second.recover_interrupted()
        assert second.counts() == {
            "pending": 9,
            "inflight": 0,
            "sent": 1,
            "failed": 0,
            "deleted": 0,
        }
    finally:
        second.close()


def test_make_due_brings_forward_more_instances_than_one_step_takes(outbox: Outbox) -> None:
    ids = [f"i{n:04}" for n in range(1234)]
    outbox.enqueue([(i, 1) for i in ids], now=T0, requeue=True)
    for _ in range(0, len(ids), 500):
        claimed = outbox.claim(now=T0, lease=LEASE, max_count=500, max_bytes=10 * MB)
        outbox.reschedule([Retry(i.orthanc_id, 300.0, "503") for i in claimed], now=T0)

    assert outbox.make_due(now=T0 + 1) == 1234
    assert outbox.next_due() == T0 + 1
