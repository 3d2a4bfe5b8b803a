"""Await a condition with a deadline instead of sleeping a fixed time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "",
) -> T:
    """Call `predicate` until it returns something truthy, and return that value.

    The predicate is called at least once, then every `interval` seconds until `timeout`
    seconds have passed; an exception it raises propagates at once. At the deadline this
    raises `TimeoutError` naming `message` and the predicate's last value.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = message or "condition not met"
            raise TimeoutError(f"{what} (after {timeout:g} s; last value: {value!r})")
        pause.wait(min(interval, remaining))
