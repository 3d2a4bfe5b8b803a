"""Keep the Python thread state of the python plugin's change thread for the plugin's life.

The python plugin enters Python from its change thread with `PyGILState_Ensure` and leaves
with `PyGILState_Release` for every event: a thread with no other hold on its thread state
gets a new one each time, with a stack that is mapped and unmapped (on a virtual machine with
two cores, the unmapping's TLB shootdown is a good part of what an event costs). One more
`PyGILState_Ensure` from inside the first callback keeps the state; `release` gives it back
from the same thread, at ORTHANC_STOPPED, so that the thread ends as the plugin expects.

Where the C API cannot be reached through ctypes, nothing is kept: events cost what they did.
"""

from __future__ import annotations

import ctypes
import logging
import threading

log = logging.getLogger(__name__)

_local = threading.local()


def keep() -> None:
    """Called from a callback, with the GIL held: this thread keeps its thread state."""
    if getattr(_local, "state", None) is not None or getattr(_local, "done", False):
        return
    try:
        ensure = ctypes.pythonapi.PyGILState_Ensure
        ensure.restype = ctypes.c_int
        ensure.argtypes = []
        _local.state = ensure()  # PyGILState_LOCKED: the GIL was held
    except (AttributeError, OSError) as exc:
        _local.done = True
        log.info("the change thread's Python state cannot be kept (%s)", exc)


def release() -> None:
    """Give the kept thread state back (from the thread that kept it, in a callback); this
    thread keeps none again (python plugin 7.1 may still send it events after the stop)."""
    state = getattr(_local, "state", None)
    _local.done = True
    if state is None:
        return
    _local.state = None
    give_back = ctypes.pythonapi.PyGILState_Release
    give_back.restype = None
    give_back.argtypes = [ctypes.c_int]
    give_back(state)
