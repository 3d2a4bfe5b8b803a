"""The change thread's Python thread state is kept through the C API, and given back once."""

from __future__ import annotations

import logging
import threading

import pytest

from orthanc_kheops import thread_state


def test_a_thread_keeps_its_state_and_gives_it_back_once(caplog: pytest.LogCaptureFixture) -> None:
    errors: list[BaseException] = []

    def callback_thread() -> None:
        try:
            thread_state.keep()
            thread_state.keep()  # every later event: nothing more is taken
            thread_state.release()
            thread_state.keep()  # events after the stop keep nothing again
            thread_state.release()
        except BaseException as exc:  # noqa: BLE001 -- reported by the test thread
            errors.append(exc)

    with caplog.at_level(logging.INFO, logger="orthanc_kheops.thread_state"):
        thread = threading.Thread(target=callback_thread)
        thread.start()
        thread.join(timeout=10)

    assert not thread.is_alive()
    assert errors == []
    assert "cannot be kept" not in caplog.text  # the C API was reached through ctypes
