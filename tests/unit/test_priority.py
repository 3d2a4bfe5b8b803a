"""A forwarding thread lowers its own priority, never its process's other threads'."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from orthanc_kheops.forwarding.priority import lower_this_thread

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="nice values per thread: Linux")


def nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def in_a_thread(*niceness: int) -> int:
    """The nice value a new thread has after lowering itself by each of `niceness`."""
    seen: list[int] = []

    def run() -> None:
        for step in niceness:
            lower_this_thread(step)
        seen.append(nice())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen[0]


def test_a_thread_adds_the_niceness_to_its_own_and_the_others_keep_theirs() -> None:
    before = nice()

    assert in_a_thread(3) == min(19, before + 3)
    assert nice() == before


def test_a_niceness_of_zero_leaves_the_thread_as_it_was() -> None:
    assert in_a_thread(0) == nice()


def test_the_nice_value_stops_at_the_lowest_priority_linux_has() -> None:
    assert in_a_thread(19, 19) == 19
