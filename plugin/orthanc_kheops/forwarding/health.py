"""What the forwarder knows about KHEOPS right now, shared by every worker.

Three states: sending; paused because KHEOPS refuses the token (only an
introspection that says the token works again resumes it); unreachable, where
a single worker probes at growing intervals while the others wait, so that an
outage does not burn every instance's attempts.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..kheops.backoff import next_delay

_PROBE_INITIAL = 1.0


class Turn(enum.Enum):
    SEND = "send"
    PROBE = "probe"


class State(enum.Enum):
    SENDING = "sending"
    PAUSED = "paused"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class Snapshot:
    state: State
    since: float
    detail: str
    last_error: str | None
    last_error_at: float | None
    last_success_at: float | None


class Health:
    def __init__(self, *, now: float, probe_maximum: float) -> None:
        self._condition = threading.Condition()
        self._state = State.SENDING
        self._since = now
        self._detail = ""
        self._failures = 0
        self._probe_at = 0.0
        self._probing = False
        self._probe_maximum = probe_maximum
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
                if self._state is State.SENDING:
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

    def record_success(self, now: float) -> bool:
        """A request went through; True when this ends an outage."""
        with self._condition:
            self._last_success_at = now
            self._probing = False
            self._failures = 0
            if self._state is not State.UNREACHABLE:
                return False
            self._set(State.SENDING, now, "")
            return True

    def record_unavailable(self, error: str, now: float) -> bool:
        """KHEOPS could not be reached; True when this starts an outage."""
        with self._condition:
            self._probing = False
            self._failures += 1
            self._note_error(error, now)
            if self._state is State.PAUSED:
                return False
            starts = self._state is not State.UNREACHABLE
            if starts:
                self._set(State.UNREACHABLE, now, f"KHEOPS unreachable, retrying: {error}")
            self._probe_at = now + next_delay(
                self._failures,
                initial=min(_PROBE_INITIAL, self._probe_maximum),
                maximum=self._probe_maximum,
            )
            return starts

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
