"""New instances queued from Orthanc's change events, a burst in one write.

Why not the store callback: Orthanc's python plugin makes every callback from a thread of
Orthanc's that has no Python thread state, and builds one and tears it down for each call,
and it wakes its change thread once for every event. On the 2-core machine of `make bench`,
storing 2000 instances by storescu took Orthanc 3.9-4.8 CPU s; a store callback that did
nothing added 0.4-0.8 s, a change callback that did nothing 0.5-1.3 s, mostly in that churn
and those wake-ups (perf: munmap's TLB shootdowns and context switches). So, when Orthanc
cannot store a file again over an instance it has (`OverwriteInstances` false, its default),
instances are taken from the change events alone:

- the change thread notes each new instance in memory and returns (`add`);
- when an event wakes that thread from waiting, it waits `gather` seconds before it returns
  (`pace`): the events that come meanwhile are then handled back to back, without a wake-up
  each;
- a thread of this module writes what gathered, in one write per `gather` seconds.

Nothing is lost if Orthanc dies before a write: its change log has every new instance, and
the reconciler queues what the outbox lacks. With `OverwriteInstances` true Orthanc logs no
change for a file stored over an instance, so the shell keeps the store callback then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

GATHER = 0.02
"""Seconds a burst of events gathers: far below the linger of a batch (500 ms by default)."""
# A callback that comes this long after the previous one returned found the change thread
# waiting: a callback of a backlog comes microseconds after the previous one.
_WOKEN_AFTER = 0.0005


class Intake:
    def __init__(
        self,
        write: Callable[[Sequence[str]], None],
        *,
        gather: float = GATHER,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`write` queues Orthanc ids (and never raises: it handles its own failures)."""
        self._write = write
        self._gather = gather
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._arrived: list[str] = []
        self._waiting = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_return = float("-inf")

    def add(self, orthanc_id: str) -> None:
        """Orthanc stored a new instance (from the change thread)."""
        with self._lock:
            self._arrived.append(orthanc_id)
        self._waiting.set()

    def pace(self) -> None:
        """The end of a change callback: after a wait, let the events of a burst gather."""
        if self._clock() - self._last_return > _WOKEN_AFTER:
            self._sleep(self._gather)
        self._last_return = self._clock()

    def flush(self) -> None:
        """Write what arrived, now (before a deletion is handled, and at the end)."""
        with self._lock:
            arrived, self._arrived = self._arrived, []
        if arrived:
            self._write(arrived)

    def start(self) -> None:
        """Write from now on (the writes need Orthanc started); what came before goes first."""
        self._thread = threading.Thread(target=self._run, name="kheops-intake", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is left and end the thread."""
        self._stopping.set()
        self._waiting.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.flush()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._waiting.wait()
            self._waiting.clear()
            self._stopping.wait(self._gather)
            try:
                self.flush()
            except Exception:
                log.exception("could not queue new instances now; they will be found later")
