"""What the forwarder knows about KHEOPS right now, shared by every worker.

Four states: sending; paused because KHEOPS refuses the token or Kheops.Url
redirects (only an introspection that works resumes it); unreachable, where a
single worker probes at growing intervals, at most PROBE_MAXIMUM apart, while the
others wait, so that an outage does not burn every instance's attempts and sending
resumes within seconds of KHEOPS answering; orthanc-unavailable, where the
workers cannot read Orthanc's own REST API and keep trying.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..kheops.backoff import next_delay

_PROBE_INITIAL = 1.0
PROBE_MAXIMUM = 5.0
"""Longest wait between two probes of an unreachable KHEOPS, however long the outage."""


class Turn(enum.Enum):
    SEND = "send"
    PROBE = "probe"


class State(enum.Enum):
    SENDING = "sending"
    PAUSED = "paused"
    UNREACHABLE = "unreachable"
    ORTHANC_UNAVAILABLE = "orthanc-unavailable"


@dataclass(frozen=True)
class Snapshot:
    state: State
    since: float
    detail: str
    last_error: str | None
    last_error_at: float | None
    last_success_at: float | None


class Health:
    def __init__(self, *, now: float, probe_maximum: float = PROBE_MAXIMUM) -> None:
        self._condition = threading.Condition()
        self._state = State.SENDING
        self._since = now
        self._detail = ""
        self._failures = 0
        self._probe_at = 0.0
        self._probing = False
        self._probe_maximum = min(probe_maximum, PROBE_MAXIMUM)
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._last_success_at: float | None = None

    def snapshot(self) -> Snapshot:
        with self._condition:
            return Snapshot(
                state=self._state,
                since=self._since,
                detail=self._detail,
                last_error=self._last_error,
                last_error_at=self._last_error_at,
                last_success_at=self._last_success_at,
            )

    @property
    def state(self) -> State:
        with self._condition:
            return self._state

    def wait_for_turn(self, now: Callable[[], float], stopping: threading.Event) -> Turn | None:
        """Block while sending is not allowed; None once the forwarder stops.

        While KHEOPS is unreachable, one worker at a time gets a PROBE turn when
        the probe delay has passed; it must end with a record_* call or end_probe().
        """
        with self._condition:
            while not stopping.is_set():
                if self._state in (State.SENDING, State.ORTHANC_UNAVAILABLE):
                    return Turn.SEND
                if self._state is State.UNREACHABLE and not self._probing:
                    wait = self._probe_at - now()
                    if wait <= 0:
                        self._probing = True
                        return Turn.PROBE
                    self._condition.wait(min(wait, 1.0))
                else:
                    self._condition.wait(1.0)
            return None

    def end_probe(self) -> None:
        with self._condition:
            if self._probing:
                self._probing = False
                self._condition.notify_all()

    def began_before_recovery(self, started: float) -> bool:
        """Whether a request began before sending last resumed: its failure is from the outage."""
        with self._condition:
            return self._state is State.SENDING and started < self._since

    def record_success(self, now: float, *, started: float | None = None) -> bool:
        """A request went through; True when this ends an outage.

        One that began before the outage did (`started`) tells nothing about its end: the
        probe does.
        """
        with self._condition:
            self._last_success_at = now
            if self._state is State.UNREACHABLE and started is not None and started < self._since:
                return False
            self._probing = False
            self._failures = 0
            if self._state is not State.UNREACHABLE:
                return False
            self._set(State.SENDING, now, "")
            return True

    def record_unavailable(
        self,
        error: str,
        now: float,
        *,
        retry_after: float | None = None,
        detail: str | None = None,
        started: float | None = None,
    ) -> bool:
        """KHEOPS could not be reached; True when this starts an outage.

        The next probe waits the growing probe delay, or `retry_after` when KHEOPS asked
        for longer (bounded by the caller, by RetryMaximumSeconds). A request that began
        before the state last changed (`started`) was in flight when it did: it starts no
        new outage (one outage is one outage in the log) and does not delay the probe.
        """
        with self._condition:
            if started is not None and started < self._since:
                # Began before the outage started (or ended): in flight when it did, it
                # neither starts another one nor pushes the next probe away.
                self._note_error(error, now)
                return False
            self._probing = False
            self._failures += 1
            self._note_error(error, now)
            if self._state is State.PAUSED:
                return False
            starts = self._state is not State.UNREACHABLE
            if starts or detail is not None:
                text = detail or f"KHEOPS unreachable, retrying: {error}"
                self._set(State.UNREACHABLE, now if starts else self._since, text)
            delay = next_delay(
                self._failures,
                initial=min(_PROBE_INITIAL, self._probe_maximum),
                maximum=self._probe_maximum,
            )
            self._probe_at = now + max(delay, retry_after or 0.0)
            return starts

    def record_orthanc_unavailable(self, error: str, now: float) -> bool:
        """Orthanc's own REST API failed; True when this starts such a spell."""
        with self._condition:
            self._note_error(error, now)
            if self._state is not State.SENDING:
                return False
            self._set(State.ORTHANC_UNAVAILABLE, now, f"Orthanc's own REST API fails: {error}")
            return True

    def record_orthanc_available(self, now: float) -> bool:
        """A file was read from Orthanc; True when this ends a spell of failures."""
        with self._condition:
            if self._state is not State.ORTHANC_UNAVAILABLE:
                return False
            self._set(State.SENDING, now, "")
            return True

    def record_refused(
        self, error: str, now: float, *, why: str = "KHEOPS refuses the token"
    ) -> bool:
        """A configuration problem only an administrator can fix; True when this starts a pause."""
        with self._condition:
            self._probing = False
            self._note_error(error, now)
            if self._state is State.PAUSED:
                return False
            self._set(State.PAUSED, now, f"Paused: {why}: {error}")
            return True

    def resume(self, now: float) -> bool:
        """The token works again; True when this ends a pause."""
        with self._condition:
            if self._state is not State.PAUSED:
                return False
            self._set(State.SENDING, now, "")
            return True

    def record_error(self, error: str, now: float) -> None:
        with self._condition:
            self._note_error(error, now)

    def probe_now(self) -> None:
        """Something says KHEOPS may be back: the next probe goes now, not after its delay."""
        with self._condition:
            if self._state is State.UNREACHABLE:
                self._probe_at = 0.0
                self._condition.notify_all()

    def wake_all(self) -> None:
        with self._condition:
            self._condition.notify_all()

    def _note_error(self, error: str, now: float) -> None:
        self._last_error = error
        self._last_error_at = now

    def _set(self, state: State, now: float, detail: str) -> None:
        self._state = state
        self._since = now
        self._detail = detail
        self._condition.notify_all()
