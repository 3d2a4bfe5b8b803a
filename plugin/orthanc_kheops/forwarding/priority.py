"""The forwarder's threads run below Orthanc's own: a store never waits for a send.

On the two cores of `make bench`, the workers' reads and sends take the CPU Orthanc's storing
threads need while an archive pushes studies. Linux schedules each thread by its own nice
value, so a worker thread that raises its own gives way to Orthanc's threads when both want a
core, and still gets every idle cycle: a backlog drains as fast when nothing else runs.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

_LOWEST = 19  # the highest nice value Linux allows


def lower_this_thread(niceness: int) -> None:
    """Raise the calling thread's nice value by `niceness` (0: leave it as it is).

    Only on Linux: elsewhere a thread id given to setpriority names a process, maybe another.
    """
    if niceness <= 0 or sys.platform != "linux":
        return
    thread = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(_LOWEST, current + niceness))
    except OSError as exc:
        log.info("the forwarding threads run at Orthanc's priority: %s", exc)
