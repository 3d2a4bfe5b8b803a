"""The clock that every time the plugin stores or waits for is read from.

Wall-clock time as it was when the plugin started, moved on by the monotonic clock: a
step of the system clock (NTP, a wrong time fixed by hand) neither stalls the queue (a
step back would leave every instance due an hour later) nor fails it (a step forward would
age every instance past MaximumAgeHours) while Orthanc runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class SteadyClock:
    def __init__(
        self,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._monotonic = monotonic
        self._offset = wall() - monotonic()

    def __call__(self) -> float:
        return self._offset + self._monotonic()
