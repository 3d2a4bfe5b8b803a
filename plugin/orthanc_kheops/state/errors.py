"""The one error of the durable state that callers handle, whatever the back-end."""

from __future__ import annotations


class StoreUnavailable(Exception):
    """The store cannot be read or written right now (disk full, I/O error, lost connection).

    Back-ends raise this rather than their driver's own errors, so that callers can report
    the problem and make the same call again; a call that raised it changed nothing.
    """
