"""The forwarder's workers and supervisor, driven against in-memory fakes of KHEOPS and Orthanc.

The outbox is a real SqliteOutbox in a temporary folder; the clock is frozen and moves only when
a test moves it, so backoff delays and probes happen when the test says so. Threads are real:
outcomes are awaited with `wait_until`, never with fixed sleeps.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest

from orthanc_kheops.config import KheopsConfig
from orthanc_kheops.forwarding import files as files_module
from orthanc_kheops.forwarding.forwarder import (
    RECHECK_CHANGES,
    AfterStore,
    Forwarder,
    SentInstance,
    token_problem,
)
from orthanc_kheops.forwarding.health import State
from orthanc_kheops.kheops.client import (
    Introspection,
    KheopsApi,
    KheopsError,
    KheopsRejected,
    KheopsUnauthorized,
    KheopsUnavailable,
)
from orthanc_kheops.kheops.stow import StowAnswer
from orthanc_kheops.observability.masking import Secret
from orthanc_kheops.orthanc_rest import (
    Change,
    ChangePage,
    OrthancNotFound,
    OrthancRest,
    OrthancUnavailable,
    StoredInstance,
)
from orthanc_kheops.state.outbox import QueuedInstance, SqliteOutbox
from tests.corpus import make_dataset, to_bytes
from tests.waiting import wait_until

TOKEN = Secret("KbSVRVsa0rTCh6D5l9JnAb")
T0 = 1_700_000_000.0
TIMEOUT = 15.0

ALBUM_WRITE = Introspection(
    active=True, scopes=frozenset({"read", "write", "send"}), album_id="hx7S6Q2nv0"
)
INACTIVE = Introspection(active=False, scopes=frozenset(), album_id=None)
USER_TOKEN = Introspection(active=True, scopes=frozenset({"user", "read", "write"}), album_id=None)
READ_ONLY = Introspection(active=True, scopes=frozenset({"read", "send"}), album_id="hx7S6Q2nv0")


# --- test doubles --------------------------------------------------------------------------------


class Clock:
    """Time that stands still until a test moves it; counts how often it was read."""

    def __init__(self, start: float = T0) -> None:
        self._lock = threading.Lock()
        self._now = start
        self.reads = 0

    def __call__(self) -> float:
        with self._lock:
            self.reads += 1
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


Step = Callable[[list[str]], StowAnswer]
"""What the fake KHEOPS does with one STOW-RS request, given the SOP Instance UIDs it carries."""


def store_all(uids: list[str]) -> StowAnswer:
    return StowAnswer(status=200, stored=frozenset(uids), failed={}, other_failures=())


def refuse(reasons: dict[str, int]) -> Step:
    """202: the named instances refused with their FailureReason, the others stored."""

    def step(uids: list[str]) -> StowAnswer:
        stored = frozenset(u for u in uids if u not in reasons)
        failed = {u: r for u, r in reasons.items() if u in uids}
        return StowAnswer(status=202, stored=stored, failed=failed, other_failures=())

    return step


def raising(kind: type[KheopsError], message: str, status: int | None = None) -> Step:
    def step(uids: list[str]) -> StowAnswer:
        raise kind(message, status=status)

    return step


def unavailable(uids: list[str]) -> StowAnswer:
    raise KheopsUnavailable("STOW-RS: KHEOPS answered 503 (Service Unavailable)", status=503)


def unauthorized(uids: list[str]) -> StowAnswer:
    raise KheopsUnauthorized("STOW-RS: KHEOPS answered 401", status=401)


class FakeKheops:
    """KheopsApi in memory: each STOW-RS request runs the next scripted step, then `then`.

    A call nobody scripted raises NotImplementedError and is noted in `unexpected`, which the
    fixture checks after the test (a worker thread swallows the exception itself).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._script: deque[Step] = deque()
        self.then: Step | None = None
        self.introspection: Introspection | Exception | None = None
        self.requests: list[list[str]] = []
        self.tokens: set[str] = set()
        self.introspections = 0
        self.unexpected: list[str] = []

    def script(self, *steps: Step) -> None:
        with self._lock:
            self._script.extend(steps)

    @property
    def stored(self) -> list[str]:
        """Every SOP Instance UID of every request, in order (a re-sent instance twice)."""
        with self._lock:
            return [uid for request in self.requests for uid in request]

    def request_sizes(self) -> list[int]:
        with self._lock:
            return [len(r) for r in self.requests]

    def stow(self, token: Secret, parts: Sequence[bytes]) -> StowAnswer:
        uids = [
            str(pydicom.dcmread(BytesIO(p), stop_before_pixels=True).SOPInstanceUID) for p in parts
        ]
        with self._lock:
            self.requests.append(uids)
            self.tokens.add(token.reveal())
            step = self._script.popleft() if self._script else self.then
            if step is None:
                self.unexpected.append(f"stow {uids}")
        if step is None:
            raise NotImplementedError(f"no STOW-RS answer scripted for {uids}")
        return step(uids)

    def introspect(self, token: Secret) -> Introspection:
        with self._lock:
            self.introspections += 1
            self.tokens.add(token.reveal())
            result = self.introspection
            if result is None:
                self.unexpected.append("introspect")
        if result is None:
            raise NotImplementedError("no introspection scripted")
        if isinstance(result, Exception):
            raise result
        return result

    def share_series(
        self, *, destination: Secret, source: Secret, study_uid: str, series_uid: str
    ) -> None:
        with self._lock:
            self.unexpected.append("share_series")
        raise NotImplementedError("share_series")


def _check_protocol(kheops: FakeKheops) -> KheopsApi:
    return kheops  # mypy checks that the fake implements the contract


class FakeOrthanc(OrthancRest):
    """Orthanc's REST API in memory: stored files and the change log.

    A file that is not in `files` reads as deleted (404). `read_errors` are raised, one per
    read, before the file is served. Every other call raises NotImplementedError.
    """

    def __init__(self) -> None:  # no HTTP session: nothing of the base class is used
        self._lock = threading.Lock()
        self.files: dict[str, bytes] = {}
        self.read_errors: dict[str, deque[Exception]] = {}
        self.reads: list[str] = []
        self.read_from: dict[str, str | None] = {}  # the file UUID each read was given
        self.change_log: list[Change] | None = []
        self.page_size = 1000
        self.last_change_error: Exception | None = None
        self.last_change_calls = 0
        self.pages_read: list[int] = []
        self.statistics: dict[str, int] = {"CountInstances": 0}
        self.system_error: Exception | None = None

    def fail_reads(self, orthanc_id: str, *errors: Exception) -> None:
        with self._lock:
            self.read_errors.setdefault(orthanc_id, deque()).extend(errors)

    def read_file(self, orthanc_id: str, *, size: int = 0, file_uuid: str | None = None) -> bytes:
        with self._lock:
            self.reads.append(orthanc_id)
            self.read_from[orthanc_id] = file_uuid
            errors = self.read_errors.get(orthanc_id)
            error = errors.popleft() if errors else None
            data = self.files.get(orthanc_id)
        if error is not None:
            raise error
        if data is None:
            raise OrthancNotFound(f"Orthanc REST /instances/{orthanc_id}/file: not found")
        return data

    def check_api(self) -> None:
        """As OrthancRest.check_api: /system answering 404 means OrthancUrl is wrong."""
        try:
            self.get_json("/system")
        except OrthancNotFound:
            raise OrthancUnavailable(
                "Orthanc's REST API is not at http://127.0.0.1:8042/wrong: /system answered 404"
                " (check Kheops.OrthancUrl and its path)"
            ) from None

    def last_change(self) -> int:
        with self._lock:
            self.last_change_calls += 1
            log, error = self.change_log, self.last_change_error
        if error is not None:
            raise error
        if log is None:
            raise NotImplementedError("last_change")
        return log[-1].seq if log else 0

    def changes(self, since: int, *, limit: int = 1000) -> ChangePage:
        with self._lock:
            log = self.change_log
            self.pages_read.append(since)
        if log is None:
            raise NotImplementedError("changes")
        later = [c for c in log if c.seq > since]
        page = later[: min(limit, self.page_size)]
        return ChangePage(
            changes=tuple(page),
            last=page[-1].seq if page else since,
            done=len(page) == len(later),
        )

    def get_json(self, path: str) -> object:
        if path == "/system":  # Orthanc answers: its REST API is where OrthancUrl says
            if self.system_error is not None:
                raise self.system_error
            return {"Version": "1.10.1"}
        if path == "/statistics":
            return self.statistics
        raise NotImplementedError(f"get_json {path}")

    def resource_level(self, orthanc_id: str) -> str:
        raise NotImplementedError("resource_level")

    def instances_of(self, level: str, orthanc_id: str) -> list[StoredInstance]:
        if level != "instances":
            raise NotImplementedError(f"instances_of {level}")
        with self._lock:
            data = self.files.get(orthanc_id)
        if data is None:
            raise OrthancNotFound(f"Orthanc REST /instances/{orthanc_id}: not found")
        return [StoredInstance(orthanc_id, len(data))]


def sop_uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.10.1.{n}"


def orthanc_id(n: int) -> str:
    return f"orthanc-{n:03}"


def dicom_file(n: int) -> bytes:
    """A tiny valid instance; instances 1-99 in one series, 100+ in a second one."""
    series = "1.2.826.0.1.3680043.10.3.1" if n < 100 else "1.2.826.0.1.3680043.10.3.2"
    dataset = make_dataset(
        patient_id="P1",
        patient_name="DOE^JANE",
        study_uid="1.2.826.0.1.3680043.10.2",
        series_uid=series,
        sop_uid=sop_uid(n),
        instance_number=n,
        rows=4,
        columns=4,
    )
    return to_bytes(dataset)


@dataclass
class Rig:
    forwarder: Forwarder
    outbox: SqliteOutbox
    kheops: FakeKheops
    orthanc: FakeOrthanc
    clock: Clock
    after_store: list[SentInstance] = field(default_factory=list)

    def add(self, *numbers: int, queue: bool = True) -> None:
        """Store instances in the fake Orthanc and, by default, queue them as the callback does."""
        for n in numbers:
            self.orthanc.files[orthanc_id(n)] = dicom_file(n)
        if queue:
            self.queue(*numbers)

    def queue(self, *numbers: int) -> None:
        sizes = [(orthanc_id(n), len(self.orthanc.files.get(orthanc_id(n), b""))) for n in numbers]
        self.outbox.enqueue(sizes, now=self.clock(), requeue=True)
        self.forwarder.wake()

    def store(self, *numbers: int) -> None:
        """As Orthanc's store callback does: queue each instance alone, then tell the forwarder."""
        for n in numbers:
            self.add(n, queue=False)
            self.outbox.enqueue(
                [(orthanc_id(n), len(self.orthanc.files[orthanc_id(n)]))],
                now=self.clock(),
                requeue=True,
            )
            self.forwarder.instances_stored()

    def row(self, n: int) -> QueuedInstance:
        return self.outbox.lookup([orthanc_id(n)])[orthanc_id(n)]

    def states(self, *numbers: int) -> dict[int, str]:
        found = self.outbox.lookup([orthanc_id(n) for n in numbers])
        return {n: found[orthanc_id(n)].state for n in numbers}

    def await_counts(self, message: str, **expected: int) -> None:
        def matches() -> bool:
            counts = self.outbox.counts()
            return all(counts[state] == n for state, n in expected.items())

        wait_until(matches, timeout=TIMEOUT, message=f"{message}: {self.outbox.counts()}")

    def await_state(self, state: State) -> None:
        wait_until(
            lambda: self.forwarder.health.state is state,
            timeout=TIMEOUT,
            message=f"health {state.value}",
        )

    def move_clock(self, seconds: float) -> None:
        """Move time on, and let waiting workers see it at once."""
        self.clock.advance(seconds)
        self.forwarder.health.wake_all()
        self.forwarder.wake()


RigFactory = Callable[..., Rig]


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[RigFactory]:
    rigs: list[Rig] = []

    def factory(
        *,
        outbox: SqliteOutbox | None = None,
        after_store: AfterStore | None = None,
        header_needed: Callable[[], bool] = lambda: True,
        exclusive: Callable[[str], AbstractContextManager[bool]] | None = None,
        **settings: Any,
    ) -> Rig:
        config = KheopsConfig(
            url="https://kheops.example.org",
            token=TOKEN,
            state_directory=tmp_path,
            orthanc_url="http://127.0.0.1:8042",
            **{
                "workers": 1,
                "batch_linger": 0.0,
                "retry_initial": 2.0,
                "retry_maximum": 300.0,
                **settings,
            },
        )
        clock = Clock()
        kheops = FakeKheops()
        orthanc = FakeOrthanc()
        box = outbox or SqliteOutbox(tmp_path / f"outbox-{len(rigs)}.sqlite3")
        received: list[SentInstance] = []
        forwarder = Forwarder(
            config,
            outbox=box,
            orthanc=orthanc,
            kheops=_check_protocol(kheops),
            after_store=after_store or received.extend,
            header_needed=header_needed,
            clock=clock,
            exclusive=exclusive,
        )
        rig = Rig(forwarder, box, kheops, orthanc, clock, received)
        rigs.append(rig)
        return rig

    yield factory

    for rig in rigs:
        rig.forwarder.stop(timeout=TIMEOUT)
        rig.outbox.close()
    for rig in rigs:
        assert rig.kheops.unexpected == [], "calls the test did not script"


def started(rig: Rig, introspection: Introspection = ALBUM_WRITE) -> Rig:
    """Start the forwarder; return once the start-up token check is over.

    The supervisor reconciles right after that check, so the first read of Orthanc's change log
    tells that the check is done.
    """
    rig.kheops.introspection = introspection
    rig.forwarder.start()
    wait_until(
        lambda: rig.orthanc.last_change_calls >= 1,
        timeout=TIMEOUT,
        message="start-up token check",
    )
    return rig


# --- sending -------------------------------------------------------------------------------------


def test_every_instance_kheops_stores_ends_up_sent(make_rig: RigFactory) -> None:
    rig = make_rig(workers=3)
    rig.kheops.then = store_all
    rig.add(1, 2, 3, 100, 101)

    started(rig)

    rig.await_counts("all sent", sent=5, pending=0, inflight=0)
    assert sorted(rig.kheops.stored) == sorted(sop_uid(n) for n in (1, 2, 3, 100, 101))
    assert rig.kheops.tokens == {TOKEN.reveal()}
    assert {r.attempts for r in rig.outbox.lookup([orthanc_id(1), orthanc_id(101)]).values()} == {1}
    assert rig.row(1).sop_uid == sop_uid(1)
    assert rig.row(1).done_at == T0
    assert rig.forwarder.health.snapshot().last_success_at == T0


def test_each_file_is_read_where_the_queue_says_it_was_stored(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.kheops.then = store_all
    rig.add(1, 2, queue=False)
    files = {orthanc_id(1): "3554f9d0-ef03-44c1-9c73-997861bdc220"}
    sizes = [(orthanc_id(n), len(rig.orthanc.files[orthanc_id(n)])) for n in (1, 2)]
    rig.outbox.enqueue(sizes, now=rig.clock(), requeue=False, files=files)

    started(rig)

    rig.await_counts("all sent", sent=2, pending=0, inflight=0)
    assert rig.orthanc.read_from == {**files, orthanc_id(2): None}


def test_batches_hold_at_most_the_maximum_count_of_instances(make_rig: RigFactory) -> None:
    rig = make_rig(batch_max_instances=3)
    rig.kheops.then = store_all
    rig.add(*range(1, 8))

    started(rig)

    rig.await_counts("all sent", sent=7)
    assert rig.kheops.request_sizes() == [3, 3, 1]
    assert sorted(rig.kheops.stored) == sorted(sop_uid(n) for n in range(1, 8))


def test_batches_stop_before_the_byte_limit(make_rig: RigFactory) -> None:
    size = len(dicom_file(1))
    rig = make_rig(batch_max_bytes=2 * size + 10)
    rig.kheops.then = store_all
    rig.add(1, 2, 3, 4, 5)

    started(rig)

    rig.await_counts("all sent", sent=5)
    assert rig.kheops.request_sizes() == [2, 2, 1]


def test_stored_instances_are_handed_on_with_their_study_and_series(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.kheops.then = store_all
    rig.add(1, 100)

    started(rig)

    rig.await_counts("all sent", sent=2)
    handed = {s.orthanc_id: s for s in rig.after_store}
    assert set(handed) == {orthanc_id(1), orthanc_id(100)}
    assert handed[orthanc_id(1)].sop_uid == sop_uid(1)
    assert handed[orthanc_id(1)].study_uid == "1.2.826.0.1.3680043.10.2"
    assert handed[orthanc_id(1)].series_uid == "1.2.826.0.1.3680043.10.3.1"
    assert handed[orthanc_id(100)].series_uid == "1.2.826.0.1.3680043.10.3.2"
    assert handed[orthanc_id(100)].dataset.PatientID == "P1"


def test_without_a_rule_that_reads_headers_only_the_file_meta_is_read_and_nothing_handed_on(
    make_rig: RigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[object] = []

    class CountingPydicom:
        Dataset = pydicom.Dataset

        @staticmethod
        def dcmread(*args: Any, **kwargs: Any) -> pydicom.Dataset:
            parsed.append(args)
            return pydicom.dcmread(*args, **kwargs)

    monkeypatch.setattr(files_module, "pydicom", CountingPydicom)
    rig = make_rig(header_needed=lambda: False)
    rig.kheops.then = store_all
    rig.add(1, 2)

    started(rig)

    rig.await_counts("all sent", sent=2)
    assert rig.after_store == []
    assert parsed == []


def test_a_rule_enabled_after_the_file_was_read_still_gets_its_header(
    make_rig: RigFactory,
) -> None:
    answers = iter([False])  # no rule when the file is read, one when KHEOPS has stored it
    rig = make_rig(header_needed=lambda: next(answers, True))
    rig.kheops.then = store_all
    rig.add(1)

    started(rig)

    rig.await_counts("sent", sent=1)
    (handed,) = rig.after_store
    assert handed.study_uid == "1.2.826.0.1.3680043.10.2"
    assert handed.dataset.PatientID == "P1"


def test_instances_queued_while_running_are_sent(make_rig: RigFactory) -> None:
    rig = started(make_rig())
    rig.kheops.then = store_all

    rig.add(1)
    rig.await_counts("first sent", sent=1)
    rig.add(2, 3)

    rig.await_counts("all sent", sent=3)


def test_instance_refused_with_292_is_failed_while_the_rest_are_sent(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.kheops.script(refuse({sop_uid(2): 292}))
    rig.add(1, 2, 3)

    started(rig)

    rig.await_counts("verdicts recorded", sent=2, failed=1)
    assert rig.states(1, 2, 3) == {1: "sent", 2: "failed", 3: "sent"}
    reason = rig.row(2).last_error or ""
    assert "not authorized (292, 0x0124)" in reason
    assert rig.row(2).attempts == 1
    assert {s.orthanc_id for s in rig.after_store} == {orthanc_id(1), orthanc_id(3)}
    assert rig.forwarder.health.snapshot().last_error == reason
    assert rig.forwarder.health.state is State.SENDING


def test_instance_refused_for_a_reason_retrying_can_fix_is_retried(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.kheops.script(refuse({sop_uid(2): 0xA700}))
    rig.kheops.then = store_all
    rig.add(1, 2)

    started(rig)
    rig.await_counts("first answer recorded", sent=1, pending=1)
    assert rig.row(2).attempts == 1
    assert "out of resources" in (rig.row(2).last_error or "")
    assert rig.row(2).next_attempt > T0

    rig.move_clock(300)

    rig.await_counts("retried", sent=2)
    assert rig.row(2).attempts == 2
    assert rig.kheops.request_sizes() == [2, 1]


def test_a_batch_kheops_cannot_read_is_split_and_only_the_bad_instance_fails(
    make_rig: RigFactory,
) -> None:
    bad = sop_uid(2)

    def kheops_400(uids: list[str]) -> StowAnswer:
        if len(uids) > 1 or uids == [bad]:
            raise KheopsRejected("STOW-RS: KHEOPS answered 400 (no boundary)", status=400)
        return store_all(uids)

    rig = make_rig()
    rig.kheops.then = kheops_400
    rig.add(1, 2, 3)

    started(rig)

    rig.await_counts("each instance judged alone", sent=2, failed=1)
    assert rig.states(1, 2, 3) == {1: "sent", 2: "failed", 3: "sent"}
    assert rig.row(2).last_error == "STOW-RS: KHEOPS answered 400 (no boundary)"
    assert rig.kheops.request_sizes() == [3, 1, 1, 1]
    assert sorted(rig.kheops.stored[3:]) == sorted(sop_uid(n) for n in (1, 2, 3))
    assert {rig.row(n).attempts for n in (1, 2, 3)} == {1}


def test_an_instance_deleted_from_orthanc_before_it_was_sent_leaves_the_queue_quietly(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig()
    rig.kheops.then = store_all
    rig.add(1, 2)
    del rig.orthanc.files[orthanc_id(2)]

    started(rig)

    rig.await_counts("verdicts recorded", sent=1, failed=0, deleted=1, pending=0)
    assert rig.outbox.lookup([orthanc_id(2)]) == {}
    assert rig.kheops.stored == [sop_uid(1)]
    assert [
        r for r in caplog.records if r.levelno >= logging.WARNING and "deleted" in r.message
    ] == []


def test_a_404_for_everything_is_not_taken_for_deletions(make_rig: RigFactory) -> None:
    """A wrong OrthancUrl prefix answers 404 for every file and for /system too."""
    rig = make_rig()
    rig.queue(1)
    rig.orthanc.system_error = OrthancNotFound("Orthanc REST /system: not found")

    started(rig)

    wait_until(lambda: rig.orthanc.reads, timeout=TIMEOUT, message="file read")
    rig.await_counts("kept", pending=1, deleted=0)
    assert "OrthancUrl" in (rig.row(1).last_error or "")


def test_deleting_instances_in_orthanc_takes_the_unsent_ones_off_the_queue(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(storage_recycling="MaximumPatientCount 1")
    rig.add(1, 2)

    gone = rig.forwarder.instances_deleted([orthanc_id(1), orthanc_id(2), "never-queued"])

    assert gone == 2
    assert rig.outbox.counts()["deleted"] == 2
    errors = [r.message for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "storage recycling (MaximumPatientCount 1)" in errors[0]
    assert "never reached KHEOPS" in errors[0]


def test_a_file_that_is_not_dicom_is_failed(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.orthanc.files[orthanc_id(1)] = b"not a DICOM file"
    rig.queue(1)

    started(rig)

    rig.await_counts("failed", failed=1)
    assert "not a DICOM file" in (rig.row(1).last_error or "")
    assert rig.kheops.requests == []


def test_orthanc_busy_is_retried_without_counting_an_attempt(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.kheops.then = store_all
    rig.add(1)
    rig.orthanc.fail_reads(orthanc_id(1), OrthancUnavailable("Orthanc REST: HTTP 503"))

    started(rig)
    wait_until(
        lambda: rig.row(1).last_error == "Orthanc REST: HTTP 503" and rig.row(1).state == "pending",
        timeout=TIMEOUT,
        message="rescheduled after Orthanc's 503",
    )
    assert rig.row(1).attempts == 0

    rig.move_clock(2)

    rig.await_counts("sent", sent=1)
    assert rig.row(1).attempts == 1


# --- lingering -----------------------------------------------------------------------------------


class _WatchedOutbox(SqliteOutbox):
    """Counts the claims that left waiting instances where they were."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.held = 0

    def claim(self, **kwargs: Any) -> list[QueuedInstance]:
        batch = super().claim(**kwargs)
        if not batch and self.counts()["pending"]:
            self.held += 1
        return batch


def test_instances_stored_one_by_one_travel_together_once_the_first_has_lingered(
    make_rig: RigFactory, tmp_path: Path
) -> None:
    outbox = _WatchedOutbox(tmp_path / "watched.sqlite3")
    rig = started(make_rig(outbox=outbox, batch_linger=0.5, batch_max_instances=10))
    rig.kheops.then = store_all
    rig.store(1)
    wait_until(lambda: outbox.held >= 1, timeout=TIMEOUT, message="first instance left to linger")
    rig.store(2, 3)

    rig.move_clock(0.5)

    rig.await_counts("sent", sent=3)
    assert rig.kheops.request_sizes() == [3]


def test_a_full_batch_is_sent_without_waiting_for_the_linger(make_rig: RigFactory) -> None:
    rig = started(make_rig(batch_linger=3600.0, batch_max_instances=2))
    rig.kheops.then = store_all

    rig.store(1, 2, 3)

    rig.await_counts("a full batch sent, the rest lingering", sent=2, pending=1)
    assert rig.kheops.request_sizes() == [2]


# --- KHEOPS unreachable --------------------------------------------------------------------------


def test_kheops_unavailable_is_retried_and_recovery_makes_the_backlog_due(
    make_rig: RigFactory,
) -> None:
    # Backoff far longer than the probe: only the recovery can make the failed batch due.
    rig = make_rig(batch_max_instances=2, retry_initial=600.0, retry_maximum=600.0)
    rig.kheops.script(unavailable)
    rig.kheops.then = store_all
    rig.add(1, 2, 3, 4)

    started(rig)

    wait_until(
        lambda: (
            sum(
                r.attempts
                for r in rig.outbox.lookup([orthanc_id(n) for n in (1, 2, 3, 4)]).values()
            )
            == 2
        ),
        timeout=TIMEOUT,
        message="first batch rescheduled",
    )
    first = rig.kheops.requests[0]
    failed = [n for n in (1, 2, 3, 4) if sop_uid(n) in first]
    assert len(failed) == 2
    for n in failed:
        row = rig.row(n)
        assert (row.state, row.attempts) == ("pending", 1)
        assert row.next_attempt >= T0 + 300
        assert "503" in (row.last_error or "")
    assert rig.outbox.get_meta("retries") == 2
    rig.await_state(State.UNREACHABLE)  # rescheduled first, then the outage is recorded
    health = rig.forwarder.health.snapshot()
    assert health.state is State.UNREACHABLE
    assert "503" in (health.last_error or "")
    assert rig.outbox.counts()["pending"] == 4

    rig.move_clock(60)  # past the first probe (1 s at most), far before the backoff (300 s)

    rig.await_counts("backlog sent after recovery", sent=4)
    assert rig.forwarder.health.state is State.SENDING
    assert {rig.row(n).attempts for n in failed} == {2}
    # The probe carried one instance, one that had not failed yet: the oldest waiting.
    assert rig.kheops.request_sizes() == [2, 1, 2, 1]
    assert rig.kheops.requests[1][0] not in {sop_uid(n) for n in failed}
    assert {sop_uid(n) for n in failed} <= set(rig.kheops.requests[2] + rig.kheops.requests[3])


def test_the_start_and_the_end_of_an_outage_are_logged_once_each(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="orthanc_kheops.forwarding.forwarder")
    rig = make_rig(batch_max_instances=1)
    rig.kheops.script(unavailable, unavailable)
    rig.kheops.then = store_all
    rig.add(1, 2)
    started(rig)
    rig.await_state(State.UNREACHABLE)

    rig.move_clock(60)
    wait_until(lambda: len(rig.kheops.requests) >= 2, timeout=TIMEOUT, message="a failed probe")
    rig.move_clock(60)
    rig.await_counts("sent after the outage", sent=2)

    messages = [r.getMessage() for r in caplog.records]
    assert sum("KHEOPS is unreachable" in m for m in messages) == 1
    assert sum("KHEOPS is reachable again" in m for m in messages) == 1


def test_a_failed_probe_keeps_kheops_unreachable_and_counts_another_attempt(
    make_rig: RigFactory,
) -> None:
    rig = make_rig()
    rig.kheops.script(unavailable, unavailable)
    rig.kheops.then = store_all
    rig.add(1)

    started(rig)
    wait_until(lambda: rig.row(1).attempts == 1, timeout=TIMEOUT, message="first failure")
    rig.await_state(State.UNREACHABLE)  # rescheduled first, then the outage is recorded

    rig.move_clock(2)  # past the first probe (1 s at most)
    wait_until(lambda: rig.row(1).attempts == 2, timeout=TIMEOUT, message="probe failed")
    assert rig.forwarder.health.state is State.UNREACHABLE

    rig.move_clock(60)
    rig.await_counts("sent", sent=1)
    assert rig.row(1).attempts == 3
    assert rig.forwarder.health.state is State.SENDING


def test_an_instance_older_than_the_maximum_age_is_failed_with_gave_up(
    make_rig: RigFactory,
) -> None:
    rig = make_rig(maximum_age=3600.0)
    rig.kheops.then = unavailable
    rig.add(1)
    rig.clock.advance(2 * 3600)

    started(rig)

    rig.await_counts("given up", failed=1)
    reason = rig.row(1).last_error or ""
    assert reason.startswith("gave up after 1 attempts over 2.0 h: ")
    assert "503" in reason


def test_an_instance_younger_than_the_maximum_age_is_retried(make_rig: RigFactory) -> None:
    rig = make_rig(maximum_age=3600.0)
    rig.kheops.script(unavailable)
    rig.kheops.then = store_all
    rig.add(1)
    rig.clock.advance(3000)

    started(rig)

    wait_until(lambda: rig.row(1).attempts == 1, timeout=TIMEOUT, message="retried")
    assert rig.row(1).state == "pending"


def test_an_outage_with_nothing_to_send_ends_when_introspection_answers(
    make_rig: RigFactory,
) -> None:
    rig = make_rig(maximum_age=60.0)
    rig.kheops.then = unavailable
    rig.add(1)
    rig.clock.advance(120)
    started(rig)
    rig.await_counts("given up", failed=1)
    rig.await_state(State.UNREACHABLE)
    introspections = rig.kheops.introspections

    rig.move_clock(60)

    rig.await_state(State.SENDING)
    assert rig.kheops.introspections > introspections


# --- KHEOPS refuses the token --------------------------------------------------------------------


def test_refused_token_pauses_sending_and_nothing_is_lost(make_rig: RigFactory) -> None:
    rig = started(make_rig())
    rig.kheops.script(unauthorized)
    rig.kheops.then = store_all
    rig.add(1, 2, 3)

    rig.await_state(State.PAUSED)

    rig.await_counts("released", pending=3, inflight=0)
    assert {rig.row(n).attempts for n in (1, 2, 3)} == {0}
    assert rig.outbox.get_meta("retries") is None
    health = rig.forwarder.health.snapshot()
    assert "refuses the token" in health.detail
    assert "401" in (health.last_error or "")


@pytest.mark.parametrize("status", [404, 405])
def test_a_stow_endpoint_that_does_not_exist_pauses_sending_and_nothing_is_lost(
    make_rig: RigFactory, status: int
) -> None:
    def wrong_url(uids: list[str]) -> StowAnswer:
        raise KheopsRejected(f"STOW-RS: KHEOPS answered {status}", status=status)

    rig = started(make_rig())
    rig.kheops.script(wrong_url)
    rig.kheops.then = store_all
    rig.add(1, 2, 3)

    rig.await_state(State.PAUSED)

    rig.await_counts("released", pending=3, inflight=0)
    assert rig.outbox.counts()["failed"] == 0
    assert "check Kheops.Url" in rig.forwarder.health.snapshot().detail


@pytest.mark.parametrize("still_wrong", [INACTIVE, USER_TOKEN, READ_ONLY])
def test_paused_sending_resumes_only_when_introspection_says_active_album_and_write(
    make_rig: RigFactory, still_wrong: Introspection
) -> None:
    rig = started(make_rig())
    rig.kheops.script(unauthorized)
    rig.kheops.then = store_all
    rig.add(1, 2, 3)
    rig.await_state(State.PAUSED)
    rig.await_counts("released", pending=3)

    rig.kheops.introspection = still_wrong
    rig.forwarder.check_token_now()
    assert rig.forwarder.health.state is State.PAUSED
    assert rig.forwarder.introspection == still_wrong

    rig.kheops.introspection = ALBUM_WRITE
    rig.forwarder.check_token_now()

    rig.await_counts("sent after resuming", sent=3)
    assert rig.forwarder.health.state is State.SENDING
    assert {rig.row(n).attempts for n in (1, 2, 3)} == {1}
    assert rig.kheops.request_sizes() == [3, 3]


def test_a_token_refused_at_start_up_pauses_before_anything_is_sent(make_rig: RigFactory) -> None:
    rig = started(make_rig(), introspection=INACTIVE)
    rig.await_state(State.PAUSED)
    assert "is not active" in rig.forwarder.health.snapshot().detail
    rig.kheops.then = store_all
    rig.add(1, 2)

    rig.kheops.introspection = ALBUM_WRITE
    rig.forwarder.check_token_now()

    rig.await_counts("sent after resuming", sent=2)
    assert rig.kheops.request_sizes() == [2]


def test_the_supervisor_checks_a_paused_token_again_on_its_own(make_rig: RigFactory) -> None:
    rig = started(make_rig(token_recheck=30.0), introspection=INACTIVE)
    rig.await_state(State.PAUSED)
    rig.kheops.then = store_all
    rig.add(1)
    rig.kheops.introspection = ALBUM_WRITE

    rig.move_clock(31)

    rig.await_counts("sent after the periodic check", sent=1)


def test_checking_the_token_now_does_nothing_while_sending(make_rig: RigFactory) -> None:
    rig = started(make_rig())
    calls = rig.kheops.introspections

    rig.forwarder.check_token_now()

    assert rig.kheops.introspections == calls


@pytest.mark.parametrize(
    ("introspection", "problem"),
    [
        (ALBUM_WRITE, None),
        (Introspection(active=True, scopes=frozenset({"write"}), album_id="a"), None),
        (INACTIVE, "is not active (expired, revoked or unknown)"),
        (Introspection(active=False, scopes=frozenset({"write"}), album_id="a"), "is not active"),
        (USER_TOKEN, "is a user token, not an album token"),
        (READ_ONLY, "lacks the write permission"),
        (Introspection(active=True, scopes=frozenset({"writer"}), album_id="a"), "lacks the write"),
    ],
    ids=[
        "album-write",
        "write-only",
        "inactive",
        "inactive-despite-scope",
        "user",
        "read",
        "writer",
    ],
)
def test_token_problem_names_why_a_token_cannot_feed_the_album(
    introspection: Introspection, problem: str | None
) -> None:
    found = token_problem(introspection)

    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem)


# --- reconciliation ------------------------------------------------------------------------------


def _changes(*entries: tuple[int, str, str]) -> list[Change]:
    return [Change(seq=seq, change_type=kind, resource_id=rid) for seq, kind, rid in entries]


def test_reconcile_sets_a_baseline_on_its_first_run(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.orthanc.change_log = _changes((1, "NewInstance", "old-1"), (2, "NewInstance", "old-2"))

    assert rig.forwarder.reconcile() == 0

    assert rig.outbox.get_meta("last_change") == 2
    assert rig.outbox.counts()["pending"] == 0
    assert rig.forwarder.reconcile() == 0  # the window read again stops at the baseline
    assert rig.outbox.counts()["pending"] == 0


def test_reconcile_queues_new_instances_missing_from_the_outbox(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.outbox.set_meta("last_change", 3)
    rig.outbox.enqueue([("already-sent", 10)], now=T0, requeue=True)
    rig.outbox.claim(now=T0, lease=60, max_count=1, max_bytes=100)
    rig.outbox.mark_sent(["already-sent"], now=T0)
    rig.orthanc.page_size = 2
    rig.orthanc.change_log = _changes(
        (3, "NewInstance", "before-baseline"),
        (4, "NewInstance", "missing-1"),
        (5, "NewSeries", "a-series"),
        (6, "NewInstance", "already-sent"),
        (7, "StableStudy", "a-study"),
        (8, "NewInstance", "missing-2"),
        (9, "NewInstance", "deleted-since"),
    )
    rig.orthanc.files["missing-1"] = dicom_file(1)
    rig.orthanc.files["missing-2"] = dicom_file(2) * 3

    queued = rig.forwarder.reconcile()

    assert queued == 2
    found = rig.outbox.lookup(["missing-1", "missing-2", "already-sent", "before-baseline"])
    assert {k: v.state for k, v in found.items()} == {
        "missing-1": "pending",
        "missing-2": "pending",
        "already-sent": "sent",
    }
    # With their real size, so that the byte bound of a request holds for them too.
    assert found["missing-2"].size == 3 * len(dicom_file(2))
    assert rig.outbox.get_meta("last_change") == 9
    assert rig.orthanc.pages_read == [3, 5, 7]
    assert rig.forwarder.reconcile() == 0


def test_only_the_node_holding_the_reconcile_lock_reads_the_change_log(
    make_rig: RigFactory,
) -> None:
    asked: list[str] = []

    def elsewhere(name: str) -> AbstractContextManager[bool]:
        asked.append(name)
        return nullcontext(False)  # another node holds it

    rig = make_rig(exclusive=elsewhere)
    rig.outbox.set_meta("last_change", 0)
    rig.orthanc.change_log = _changes((1, "NewInstance", "missing"))

    assert rig.forwarder.reconcile() == 0
    assert (asked, rig.orthanc.pages_read, rig.outbox.counts()["pending"]) == (["reconcile"], [], 0)


def test_reconcile_reads_again_a_window_of_changes_behind_its_cursor(
    make_rig: RigFactory,
) -> None:
    rig = make_rig()
    rig.outbox.set_meta("first_change", 0)
    rig.outbox.set_meta("last_change", RECHECK_CHANGES + 10)
    rig.orthanc.change_log = _changes(
        (5, "NewInstance", "too-old"),
        (11, "NewInstance", "committed-late"),
        (RECHECK_CHANGES + 10, "NewInstance", "at-the-cursor"),
    )
    rig.outbox.enqueue([("at-the-cursor", 1)], now=T0, requeue=True)
    rig.orthanc.files["too-old"] = rig.orthanc.files["committed-late"] = dicom_file(1)

    assert rig.forwarder.reconcile() == 1
    # Behind the cursor, but read again: another writer's change can commit late.
    assert set(rig.outbox.lookup(["too-old", "committed-late"])) == {"committed-late"}
    assert rig.orthanc.pages_read[0] == 10


def test_reconcile_starts_a_new_baseline_when_orthanc_has_a_younger_change_log(
    make_rig: RigFactory,
) -> None:
    rig = make_rig()
    rig.outbox.set_meta("last_change", 500)
    rig.orthanc.change_log = _changes((1, "NewInstance", "x"), (2, "NewInstance", "y"))

    assert rig.forwarder.reconcile() == 0

    assert rig.outbox.get_meta("last_change") == 2


def test_instances_found_by_reconciliation_are_sent(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.kheops.then = store_all
    rig.add(1, 2, queue=False)
    rig.outbox.set_meta("last_change", 0)
    rig.orthanc.change_log = _changes(
        (1, "NewInstance", orthanc_id(1)), (2, "NewInstance", orthanc_id(2))
    )

    started(rig)

    rig.await_counts("reconciled and sent", sent=2)
    assert rig.outbox.get_meta("last_change") == 2


# --- robustness ----------------------------------------------------------------------------------


class _FlakyOutbox(SqliteOutbox):
    """Its first claim fails as a full disk would."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.claims = 0

    def claim(self, **kwargs: Any) -> list[QueuedInstance]:
        self.claims += 1
        if self.claims == 1:
            raise OSError("database or disk is full")
        return super().claim(**kwargs)


def test_a_worker_exception_does_not_kill_the_thread(make_rig: RigFactory, tmp_path: Path) -> None:
    rig = make_rig(outbox=_FlakyOutbox(tmp_path / "flaky.sqlite3"))
    rig.kheops.then = store_all
    rig.add(1, 2)

    started(rig)

    rig.await_counts("sent by the same worker", sent=2)


def test_an_unexpected_error_in_a_batch_retries_it(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.kheops.then = store_all
    rig.add(1)
    rig.orthanc.fail_reads(orthanc_id(1), RuntimeError("boom"))

    started(rig)
    wait_until(lambda: rig.row(1).attempts == 1, timeout=TIMEOUT, message="retried")
    assert rig.row(1).last_error == "internal error: RuntimeError: boom"
    assert rig.row(1).state == "pending"

    rig.move_clock(300)

    rig.await_counts("sent", sent=1)


def test_instances_are_handed_on_before_they_are_marked_sent(make_rig: RigFactory) -> None:
    states_seen: list[dict[str, str]] = []
    rig = make_rig(after_store=lambda sent: states_seen.append(outbox_states(sent)))
    outbox = rig.outbox

    def outbox_states(sent: Sequence[SentInstance]) -> dict[str, str]:
        found = outbox.lookup([i.orthanc_id for i in sent])
        return {orthanc_id: row.state for orthanc_id, row in found.items()}

    rig.kheops.then = store_all
    rig.add(1, 2)
    started(rig)

    rig.await_counts("sent", sent=2)

    # A crash between the two steps costs a second upload, never a share.
    assert states_seen == [{orthanc_id(1): "inflight", orthanc_id(2): "inflight"}]


def test_instances_whose_shares_cannot_be_recorded_are_sent_and_handed_on_again(
    make_rig: RigFactory,
) -> None:
    handed: list[list[str]] = []

    def after_store(sent: Sequence[SentInstance]) -> None:
        handed.append([i.orthanc_id for i in sent])
        if len(handed) == 1:
            raise OSError("disk full")

    rig = make_rig(after_store=after_store)
    rig.kheops.script(refuse({sop_uid(2): 262}))
    rig.kheops.then = store_all
    rig.add(1, 2)
    started(rig)

    rig.await_counts("the stored one waits for another try", pending=1, failed=1)
    assert "could not record its shares" in (rig.row(1).last_error or "")
    rig.move_clock(3600)
    rig.await_counts("sent on the second try", sent=1, failed=1)

    assert handed == [[orthanc_id(1)], [orthanc_id(1)]]
    assert rig.kheops.request_sizes() == [2, 1]


def test_an_unexpected_error_in_the_start_up_token_check_does_not_stop_the_supervisor(
    make_rig: RigFactory,
) -> None:
    rig = make_rig()
    rig.kheops.introspection = RuntimeError("unexpected")

    rig.forwarder.start()

    # The baseline is the reconciliation's last step: waiting for the call to Orthanc's
    # change log alone would read the meta value before it is written.
    wait_until(
        lambda: rig.outbox.get_meta("last_change") == 0,
        timeout=TIMEOUT,
        message="reconciliation after a failed start-up check",
    )


def test_a_failing_reconciliation_waits_its_interval_before_the_next_try(
    make_rig: RigFactory,
) -> None:
    # No worker: only the supervisor reads the clock, once per loop; a short token recheck
    # makes it loop often while the frozen clock keeps the next reconciliation far away.
    rig = make_rig(workers=0, token_recheck=0.001, reconcile_interval=60.0)
    rig.kheops.introspection = ALBUM_WRITE
    rig.orthanc.last_change_error = OrthancUnavailable("Orthanc REST /changes: ConnectionError")
    rig.forwarder.start()
    wait_until(lambda: rig.orthanc.last_change_calls >= 1, timeout=TIMEOUT, message="first try")
    reads = rig.clock.reads

    wait_until(lambda: rig.clock.reads >= reads + 10, timeout=TIMEOUT, message="supervisor loops")

    assert rig.orthanc.last_change_calls == 1
    rig.orthanc.last_change_error = None
    rig.clock.advance(61)
    wait_until(lambda: rig.orthanc.last_change_calls == 2, timeout=TIMEOUT, message="next try")


# --- stopping ------------------------------------------------------------------------------------


def test_stop_lets_the_current_request_finish_and_leaves_the_rest_pending(
    make_rig: RigFactory,
) -> None:
    entered = threading.Event()
    release = threading.Event()

    def slow_store(uids: list[str]) -> StowAnswer:
        entered.set()
        release.wait(TIMEOUT)
        return store_all(uids)

    rig = make_rig(batch_max_instances=2)
    rig.kheops.script(slow_store)
    rig.add(1, 2, 3, 4, 5)
    started(rig)
    wait_until(entered.is_set, timeout=TIMEOUT, message="first request under way")

    rig.forwarder.stop(timeout=0.01)  # returns while the request is still under way
    release.set()

    wait_until(
        lambda: not any(t.name.startswith("kheops-") for t in threading.enumerate()),
        timeout=TIMEOUT,
        message="threads ended",
    )
    assert rig.outbox.counts() == {
        "pending": 3,
        "inflight": 0,
        "sent": 2,
        "failed": 0,
        "deleted": 0,
    }
    assert rig.kheops.request_sizes() == [2]


def test_stop_ends_idle_threads(make_rig: RigFactory) -> None:
    rig = started(make_rig(workers=2))

    rig.forwarder.stop(timeout=TIMEOUT)

    assert not any(t.name.startswith("kheops-") for t in threading.enumerate())


def test_instances_in_flight_at_a_crash_are_sent_after_restart(
    make_rig: RigFactory, tmp_path: Path
) -> None:
    path = tmp_path / "crash.sqlite3"
    before = SqliteOutbox(path)
    before.enqueue([(orthanc_id(1), 10), (orthanc_id(2), 10)], now=T0, requeue=True)
    before.claim(now=T0, lease=60, max_count=50, max_bytes=1000)
    before.close()

    rig = make_rig(outbox=SqliteOutbox(path))
    rig.kheops.then = store_all
    rig.add(1, 2, queue=False)

    started(rig)

    rig.await_counts("recovered and sent", sent=2)


# --- status --------------------------------------------------------------------------------------


def test_throughput_counts_what_was_sent_in_the_last_minute(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.kheops.then = store_all
    rig.add(1, 2)
    started(rig)
    rig.await_counts("sent", sent=2)

    per_second, bytes_per_second = rig.forwarder.throughput()

    assert per_second == pytest.approx(2 / 60)
    assert bytes_per_second == pytest.approx((len(dicom_file(1)) + len(dicom_file(2))) / 60)
    rig.clock.advance(61)
    assert rig.forwarder.throughput() == (0.0, 0.0)
    assert rig.outbox.counts()["inflight"] == 0
