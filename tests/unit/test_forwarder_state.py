"""The forwarder and its durable state: full disks, deletions, sizes, pruning, clock steps.

Same rig as test_forwarder.py: fakes of KHEOPS and Orthanc, a real SqliteOutbox, a frozen
clock. A full disk is an outbox whose writes raise StoreUnavailable while `full` is set, as
SqliteOutbox does when SQLite answers "database or disk is full".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from orthanc_kheops.config import KheopsConfig
from orthanc_kheops.forwarding import forwarder as forwarder_module
from orthanc_kheops.forwarding.forwarder import Forwarder, SentInstance
from orthanc_kheops.forwarding.health import State
from orthanc_kheops.state.clock import SteadyClock
from orthanc_kheops.state.errors import StoreUnavailable
from orthanc_kheops.state.outbox import QueuedInstance, SqliteOutbox
from tests.unit import test_forwarder
from tests.unit.test_forwarder import (
    ALBUM_WRITE,
    T0,
    TIMEOUT,
    TOKEN,
    Clock,
    FakeKheops,
    FakeOrthanc,
    RigFactory,
    dicom_file,
    orthanc_id,
    sop_uid,
    started,
    store_all,
    unavailable,
)
from tests.waiting import wait_until

make_rig = test_forwarder.make_rig  # the fixture, with its fakes

FULL = "outbox.sqlite3: database or disk is full"


class DiskFullOutbox(SqliteOutbox):
    """A real outbox whose writes fail, as on a full disk, while `full` is set."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.full = threading.Event()
        self.refused: list[str] = []

    def _check(self, what: str) -> None:
        if self.full.is_set():
            self.refused.append(what)
            raise StoreUnavailable(FULL)

    def claim(self, **kwargs: Any) -> list[QueuedInstance]:
        self._check("claim")
        return super().claim(**kwargs)

    def mark_sent(
        self, orthanc_ids: Sequence[str], *, now: float, sop_uids: Mapping[str, str] | None = None
    ) -> None:
        self._check("mark_sent")
        super().mark_sent(orthanc_ids, now=now, sop_uids=sop_uids)

    def reschedule(self, retries: Any, *, now: float) -> None:
        self._check("reschedule")
        super().reschedule(retries, now=now)


@pytest.fixture(autouse=True)
def quick_write_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes refused by a full disk are tried again every 50 ms rather than every 2 s."""
    monkeypatch.setattr(forwarder_module, "_WRITE_RETRY", 0.05)


def _errors(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.message for r in caplog.records if r.levelno >= logging.ERROR and text in r.message]


# --- a full disk -----------------------------------------------------------------------------------


def test_a_verdict_that_cannot_be_written_is_written_once_the_disk_has_room(
    make_rig: RigFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = DiskFullOutbox(tmp_path / "full.sqlite3")
    handed: list[SentInstance] = []

    def after_store(sent: Sequence[SentInstance]) -> None:
        handed.extend(sent)
        outbox.full.set()  # the disk fills between the upload and its verdict

    rig = make_rig(outbox=outbox, after_store=after_store)
    rig.kheops.then = store_all
    rig.add(1, 2)
    started(rig)

    wait_until(lambda: "mark_sent" in outbox.refused, timeout=TIMEOUT, message="write refused")
    problem = rig.forwarder.store_health.problem
    assert problem is not None and "database or disk is full" in problem.error
    assert rig.outbox.counts()["inflight"] == 2  # not sent, not lost: in flight, from the store
    assert len(_errors(caplog, "cannot write the queue")) == 1

    outbox.full.clear()

    rig.await_counts("verdict written", sent=2, inflight=0, pending=0)
    # the problem clears once the write that failed has gone through, just after its commit
    wait_until(
        lambda: rig.forwarder.store_health.problem is None, timeout=TIMEOUT, message="cleared"
    )
    assert rig.kheops.stored == [sop_uid(1), sop_uid(2)]  # uploaded once
    assert sorted(s.orthanc_id for s in handed) == [orthanc_id(1), orthanc_id(2)]  # shared once
    assert len(_errors(caplog, "cannot write the queue")) == 1  # logged once, not per retry


def test_share_jobs_that_cannot_be_written_are_written_before_the_instance_counts_as_sent(
    make_rig: RigFactory,
) -> None:
    attempts: list[int] = []

    def after_store(sent: Sequence[SentInstance]) -> None:
        attempts.append(len(sent))
        if len(attempts) < 3:
            raise StoreUnavailable("switching.sqlite3: database or disk is full")

    rig = make_rig(after_store=after_store)
    rig.kheops.then = store_all
    rig.add(1)
    started(rig)

    rig.await_counts("sent", sent=1)
    assert attempts == [1, 1, 1]
    assert rig.kheops.stored == [sop_uid(1)]


def test_a_claim_that_cannot_be_written_is_reported_once_and_tried_again(
    make_rig: RigFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = DiskFullOutbox(tmp_path / "full.sqlite3")
    outbox.full.set()
    rig = make_rig(outbox=outbox)
    rig.kheops.then = store_all
    rig.add(1)
    started(rig)
    wait_until(lambda: len(outbox.refused) >= 2, timeout=TIMEOUT, message="claims refused")

    outbox.full.clear()

    rig.await_counts("sent", sent=1)
    assert len(_errors(caplog, "cannot write the queue")) == 1


def test_a_claim_no_worker_finishes_is_sent_after_its_lease(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.kheops.then = store_all
    rig.add(1)
    lost = rig.outbox.claim(now=T0, lease=60, max_count=1, max_bytes=1 << 20)  # a worker that hung
    assert [i.orthanc_id for i in lost] == [orthanc_id(1)]
    started(rig)

    rig.move_clock(61)

    rig.await_counts("sent after the lease", sent=1, inflight=0)


# --- sizes -----------------------------------------------------------------------------------------


def test_a_batch_never_holds_more_bytes_than_the_bound_even_when_queued_sizes_are_wrong(
    make_rig: RigFactory,
) -> None:
    size = len(dicom_file(1))
    rig = make_rig(batch_max_bytes=size, batch_max_instances=10)
    rig.kheops.then = store_all
    rig.add(1, 2, 3, queue=False)
    rig.outbox.enqueue([(orthanc_id(n), 1) for n in (1, 2, 3)], now=T0, requeue=True)
    started(rig)

    rig.await_counts("sent", sent=3)
    assert rig.kheops.request_sizes() == [1, 1, 1]


# --- pruning and the first start -------------------------------------------------------------------


def test_sent_instances_are_forgotten_after_the_retention_and_still_counted(
    make_rig: RigFactory,
) -> None:
    rig = make_rig(sent_retention=3600.0)
    rig.kheops.then = store_all
    rig.add(1, 2)
    started(rig)
    rig.await_counts("sent", sent=2)

    rig.move_clock(3601 + 60)  # past the retention and the next reconciliation

    wait_until(lambda: rig.outbox.lookup([orthanc_id(1)]) == {}, timeout=TIMEOUT, message="pruned")
    assert rig.outbox.counts()["sent"] == 2


def test_a_new_queue_over_an_orthanc_that_holds_instances_says_how_many_are_not_queued(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig()
    rig.orthanc.statistics = {"CountInstances": 1200}
    caplog.set_level(logging.WARNING)

    started(rig)

    wait_until(
        lambda: any("1200 instances that are not queued" in r.message for r in caplog.records),
        timeout=TIMEOUT,
        message="warning about the instances not queued",
    )
    line = next(r.message for r in caplog.records if "not queued" in r.message)
    assert "POST /kheops/send" in line


def test_an_outbox_that_knows_where_the_change_log_stands_does_not_warn(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig()
    rig.outbox.set_meta("last_change", 0)
    rig.orthanc.statistics = {"CountInstances": 1200}

    started(rig)
    rig.forwarder.reconcile()

    assert not any("not queued" in r.message for r in caplog.records)


# --- clock steps -----------------------------------------------------------------------------------


def test_a_wall_clock_step_back_neither_stalls_nor_fails_the_backlog(tmp_path: Path) -> None:
    wall, monotonic = Clock(T0), Clock(0.0)
    clock = SteadyClock(wall=wall, monotonic=monotonic)
    config = KheopsConfig(
        url="https://kheops.example.org",
        token=TOKEN,
        state_directory=tmp_path,
        orthanc_url="http://127.0.0.1:8042",
        workers=1,
        batch_linger=0.0,
        retry_initial=2.0,
        maximum_age=1800.0,
    )
    kheops, orthanc = FakeKheops(), FakeOrthanc()
    kheops.introspection = ALBUM_WRITE
    kheops.script(unavailable)
    kheops.then = store_all
    outbox = SqliteOutbox(tmp_path / "outbox.sqlite3")
    forwarder = Forwarder(config, outbox=outbox, orthanc=orthanc, kheops=kheops, clock=clock)
    orthanc.files[orthanc_id(1)] = dicom_file(1)
    outbox.enqueue([(orthanc_id(1), len(dicom_file(1)))], now=clock(), requeue=True)
    forwarder.start()
    try:
        # The failed attempt is rescheduled before the outage is recorded: step the clocks only
        # once both are done, or the retry would be reckoned from the stepped clock.
        wait_until(
            lambda: forwarder.health.state is State.UNREACHABLE,
            timeout=TIMEOUT,
            message="first attempt failed",
        )

        wall.advance(-3600)  # NTP steps the system clock back an hour
        monotonic.advance(3)  # past the retry delay and the probe
        forwarder.health.wake_all()
        forwarder.wake()

        wait_until(lambda: outbox.counts()["sent"] == 1, timeout=TIMEOUT, message="sent")
        wall.advance(7200)  # and an hour forward: nothing ages past MaximumAgeHours
        assert outbox.counts()["failed"] == 0
    finally:
        forwarder.stop(timeout=TIMEOUT)
        outbox.close()
    assert kheops.unexpected == []


def test_the_steady_clock_follows_the_monotonic_clock_from_the_wall_time_at_start() -> None:
    wall, monotonic = Clock(T0), Clock(100.0)
    clock = SteadyClock(wall=wall, monotonic=monotonic)

    wall.advance(-3600)
    monotonic.advance(5)

    assert clock() == T0 + 5


def test_a_clock_stepped_back_while_orthanc_was_stopped_does_not_stall_the_backlog(
    make_rig: RigFactory,
) -> None:
    rig = make_rig()
    rig.outbox.set_meta("clock", T0 + 3600)  # the plugin last ran an hour "later"
    rig.add(1, queue=False)
    rig.outbox.enqueue([(orthanc_id(1), len(dicom_file(1)))], now=T0 + 3600, requeue=True)
    rig.kheops.then = store_all

    started(rig)

    rig.await_counts("sent without waiting an hour", sent=1)
