"""Counters the forwarder bumps as it works, for the metrics Orthanc publishes.

They count since the plugin started, as Prometheus counters do (a restart is a reset, which
`rate()` and `increase()` handle). Every sender thread writes here, so one lock guards them.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

NO_ANSWER = "none"
"""The `code` of a STOW-RS request that got no HTTP answer (timeout, refused, reset)."""


@dataclass(frozen=True)
class TransferSnapshot:
    started_at: float
    stow_requests: dict[str, int] = field(default_factory=dict)
    stow_seconds: float = 0.0
    stow_bytes: int = 0
    sent: int = 0
    failed: int = 0
    last_sent_at: float | None = None


class TransferStats:
    """What the senders did since `started_at`; thread-safe."""

    def __init__(self, *, now: float) -> None:
        self._lock = threading.Lock()
        self._started_at = now
        self._requests: Counter[str] = Counter()
        self._seconds = 0.0
        self._bytes = 0
        self._sent = 0
        self._failed = 0
        self._last_sent_at: float | None = None

    def record_stow(self, *, status: int | None, seconds: float, size: int) -> None:
        """One STOW-RS request, whatever its outcome; `status` None when nothing answered."""
        code = NO_ANSWER if status is None else str(status)
        with self._lock:
            self._requests[code] += 1
            self._seconds += seconds
            self._bytes += size

    def record_sent(self, count: int, *, now: float) -> None:
        """KHEOPS confirmed it stored `count` instances."""
        with self._lock:
            self._sent += count
            self._last_sent_at = now

    def record_failed(self, count: int) -> None:
        """`count` instances moved to the failed list (they need a person)."""
        with self._lock:
            self._failed += count

    def snapshot(self) -> TransferSnapshot:
        with self._lock:
            return TransferSnapshot(
                started_at=self._started_at,
                stow_requests=dict(self._requests),
                stow_seconds=self._seconds,
                stow_bytes=self._bytes,
                sent=self._sent,
                failed=self._failed,
                last_sent_at=self._last_sent_at,
            )
