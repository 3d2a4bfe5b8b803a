"""The intake: new instances from Orthanc's change events, written a burst at a time."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest

from orthanc_kheops.forwarding.intake import Intake
from tests.waiting import wait_until


class Writes:
    """What the intake wrote, write by write; `block` holds a write until released."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.block = threading.Event()
        self.block.set()
        self.entered = threading.Event()
        self.fail_next = False

    def __call__(self, orthanc_ids: Sequence[str]) -> None:
        self.entered.set()
        self.block.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("disk on fire")
        self.batches.append(list(orthanc_ids))

    @property
    def written(self) -> list[str]:
        return [i for batch in self.batches for i in batch]


@pytest.fixture
def writes() -> Writes:
    return Writes()


@pytest.fixture
def intake(writes: Writes) -> Iterator[Intake]:
    intake = Intake(writes, gather=0.05)
    yield intake
    intake.stop()


def test_a_burst_of_new_instances_is_written_in_one_write_in_their_order(
    intake: Intake, writes: Writes
) -> None:
    writes.block.clear()  # the first write waits, so that the rest of the burst gathers
    intake.start()
    intake.add("a")
    wait_until(writes.entered.is_set, message="the first write begun")
    for orthanc_id in ("b", "c", "d"):
        intake.add(orthanc_id)
    writes.block.set()

    wait_until(lambda: writes.written == ["a", "b", "c", "d"], message="all written")
    assert writes.batches == [["a"], ["b", "c", "d"]]


def test_what_arrived_before_start_is_written_once_started(intake: Intake, writes: Writes) -> None:
    intake.add("early")

    intake.start()

    wait_until(lambda: writes.written == ["early"], message="written after start")


def test_flush_writes_at_once_and_stop_writes_what_is_left(writes: Writes) -> None:
    intake = Intake(writes, gather=3600)  # the thread alone would not write in this test
    intake.start()
    intake.add("a")
    intake.flush()
    assert writes.batches == [["a"]]

    intake.add("b")
    intake.stop()

    assert writes.batches == [["a"], ["b"]]


def test_a_failed_write_does_not_stop_the_intake(intake: Intake, writes: Writes) -> None:
    writes.fail_next = True
    intake.start()
    intake.add("lost")  # the reconciler finds it in Orthanc's change log
    wait_until(lambda: not writes.fail_next, message="the failing write done")

    intake.add("next")

    wait_until(lambda: writes.written == ["next"], message="the next one written")


def test_a_change_that_woke_the_thread_waits_for_the_burst_and_a_backlog_does_not() -> None:
    now = [100.0]
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        now[0] += seconds

    intake = Intake(lambda ids: None, gather=0.02, clock=lambda: now[0], sleep=sleep)

    intake.pace()  # the first event: the thread was waiting
    now[0] += 0.00001
    intake.pace()  # the next one, queued meanwhile: at once
    now[0] += 1.0
    intake.pace()  # a second later: waiting again

    assert naps == [0.02, 0.02]
