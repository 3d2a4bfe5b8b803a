"""Whether the state files can be written right now, for the status, the metrics and the log.

The store callback, the workers and the reconciler all write; the first failure starts a
problem (logged once), the first write that succeeds after it ends it (logged once).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class StoreProblem:
    error: str
    since: float


class StoreHealth:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._problem: StoreProblem | None = None

    def failed(self, error: str, now: float) -> bool:
        """A write failed; True when this starts a problem."""
        with self._lock:
            starts = self._problem is None
            self._problem = StoreProblem(error, self._problem.since if self._problem else now)
            return starts

    def succeeded(self) -> bool:
        """A write went through; True when this ends a problem."""
        with self._lock:
            ends = self._problem is not None
            self._problem = None
            return ends

    @property
    def problem(self) -> StoreProblem | None:
        with self._lock:
            return self._problem
