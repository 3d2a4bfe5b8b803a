"""Worker threads that drain the outbox into the main KHEOPS album.

Each worker claims a batch, reads the files from Orthanc over loopback REST,
posts them in one STOW-RS request and records a verdict per instance. Every
batch is wrapped: whatever goes wrong becomes a recorded outcome (retry,
failed with a reason, pause) and never kills the thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from io import BytesIO

import pydicom
from pydicom.errors import InvalidDicomError

from ..config import KheopsConfig
from ..kheops.backoff import next_delay
from ..kheops.client import (
    Introspection,
    KheopsApi,
    KheopsError,
    KheopsRejected,
    KheopsUnauthorized,
    KheopsUnavailable,
)
from ..kheops.stow import Judgement, StowAnswer, Verdict, judge
from ..observability.stats import TransferStats
from ..orthanc_rest import OrthancError, OrthancNotFound, OrthancRest
from ..state.outbox import Outbox, QueuedInstance, Retry
from .health import Health, State, Turn

log = logging.getLogger(__name__)

_THROUGHPUT_WINDOW = 60.0
# A STOW-RS answer that says the URL is wrong, not the instances: no instance is to blame.
_WRONG_ENDPOINT = frozenset({404, 405})
_WRONG_ENDPOINT_WHY = "KHEOPS has no STOW-RS endpoint at this URL (check Kheops.Url)"
_IDLE_POLL = 1.0
RECHECK_CHANGES = 1000
"""Changes before the cursor read again: with several writers a change can commit late."""


@dataclass(frozen=True)
class SentInstance:
    """An instance KHEOPS confirmed it stored, with the header the rules read."""

    orthanc_id: str
    sop_uid: str
    study_uid: str
    series_uid: str
    dataset: pydicom.Dataset


AfterStore = Callable[[Sequence[SentInstance]], None]


@dataclass(frozen=True)
class _Loaded:
    item: QueuedInstance
    data: bytes
    dataset: pydicom.Dataset
    sop_uid: str


class Forwarder:
    def __init__(
        self,
        config: KheopsConfig,
        *,
        outbox: Outbox,
        orthanc: OrthancRest,
        kheops: KheopsApi,
        after_store: AfterStore | None = None,
        exclusive: Callable[[str], AbstractContextManager[bool]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`exclusive(name)` tells whether this node may do `name` now (one node at a time)."""
        self._config = config
        self._outbox = outbox
        self._orthanc = orthanc
        self._kheops = kheops
        self._after_store = after_store
        self._exclusive = exclusive or (lambda name: nullcontext(True))
        self._clock = clock
        self.health = Health(now=clock(), probe_maximum=min(config.retry_maximum, 30.0))
        self.introspection: Introspection | None = None
        self.stats = TransferStats(now=clock())
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._inflight = 0
        self._stored_since_claim = 0
        self._idle_on_empty_queue = False
        self._sent_log: collections.deque[tuple[float, int, int]] = collections.deque()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        recovered = self._outbox.recover_interrupted()
        if recovered:
            log.info("%d instances were in flight when Orthanc stopped; queued again", recovered)
        for index in range(self._config.workers):
            self._spawn(self._work, f"kheops-sender-{index + 1}")
        self._spawn(self._supervise, "kheops-supervisor")

    def stop(self, timeout: float = 30.0) -> None:
        """Workers finish their current request; what they had not sent stays queued."""
        self._stopping.set()
        self._wake.set()
        self.health.wake_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()

    def wake(self) -> None:
        """Instances were queued or made due at once: idle workers look at the queue now."""
        self._wake.set()

    def instance_stored(self) -> None:
        """Orthanc stored an instance, and it is queued.

        Idle workers are woken only when the queue was empty (to start lingering) or when
        enough instances came for a full batch; otherwise the linger ends their wait. One
        wake per stored instance would cost a claim per instance and per worker.
        """
        with self._lock:
            self._stored_since_claim += 1
            wake = (
                self._idle_on_empty_queue
                or self._stored_since_claim >= self._config.batch_max_instances
            )
            self._idle_on_empty_queue = False
        if wake:
            self._wake.set()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    # -- what the status shows -----------------------------------------------

    @property
    def inflight(self) -> int:
        with self._lock:
            return self._inflight

    def throughput(self) -> tuple[float, float]:
        """Instances and bytes per second over the last minute."""
        now = self._clock()
        with self._lock:
            self._forget_old(now)
            instances = sum(n for _, n, _ in self._sent_log)
            size = sum(b for _, _, b in self._sent_log)
        return instances / _THROUGHPUT_WINDOW, size / _THROUGHPUT_WINDOW

    def _forget_old(self, now: float) -> None:
        while self._sent_log and self._sent_log[0][0] < now - _THROUGHPUT_WINDOW:
            self._sent_log.popleft()

    # -- workers -----------------------------------------------------------

    def _work(self) -> None:
        while (turn := self.health.wait_for_turn(self._clock, self._stopping)) is not None:
            try:
                self._take_turn(turn)
            except Exception:
                log.exception("sender step failed; trying again")
                self._stopping.wait(_IDLE_POLL)
            finally:
                if turn is Turn.PROBE:
                    self.health.end_probe()

    def _take_turn(self, turn: Turn) -> None:
        with self._lock:
            self._stored_since_claim = 0
        if turn is Turn.PROBE:
            # The oldest waiting instance, even before its backoff ends, and only one: a
            # probe that fails costs one instance an attempt and sends one file for nothing.
            batch = self._outbox.claim(now=float("inf"), max_count=1, max_bytes=0)
        else:
            batch = self._outbox.claim(
                now=self._clock(),
                max_count=self._config.batch_max_instances,
                max_bytes=self._config.batch_max_bytes,
                linger=self._config.batch_linger,
            )
        if not batch:
            if turn is Turn.PROBE:
                self._probe_with_introspection()
            else:
                self._idle()
            return
        try:
            self._send(batch)
        except Exception as exc:
            log.exception("unexpected error while sending %d instances", len(batch))
            self._retry_all(batch, f"internal error: {type(exc).__name__}: {exc}")

    def _probe_with_introspection(self) -> None:
        """Nothing to send: ask KHEOPS something cheap to learn whether the outage is over."""
        try:
            self._kheops.introspect(self._config.token)
        except KheopsError as exc:
            self._unavailable(str(exc))
        else:
            self._recovered(self._clock())

    def _unavailable(self, error: str) -> None:
        if self.health.record_unavailable(error, self._clock()):
            log.warning("KHEOPS is unreachable; instances stay queued and are retried: %s", error)

    def _recovered(self, now: float) -> None:
        if self.health.record_success(now):
            woken = self._outbox.make_due(now=now)
            log.warning("KHEOPS is reachable again; %d waiting instances are due now", woken)
            self.wake()

    def _idle(self) -> None:
        """Wait until the oldest waiting instance has lingered, a batch fills, or one comes."""
        with self._lock:
            self._idle_on_empty_queue = True
        due = self._outbox.next_due()
        if due is None:
            wait = _IDLE_POLL
        else:
            with self._lock:
                self._idle_on_empty_queue = False
            wait = min(_IDLE_POLL, max(0.0, due + self._config.batch_linger - self._clock()))
        if self._wake.wait(wait):
            self._wake.clear()

    def _send(self, batch: Sequence[QueuedInstance]) -> None:
        with self._lock:
            self._inflight += len(batch)
        try:
            loaded = self._load(batch)
            if loaded:
                self._post(loaded)
        finally:
            with self._lock:
                self._inflight -= len(batch)

    def _load(self, batch: Sequence[QueuedInstance]) -> list[_Loaded]:
        loaded: list[_Loaded] = []
        failed: dict[str, str] = {}
        later: list[Retry] = []
        for item in batch:
            try:
                data = self._orthanc.read_file(item.orthanc_id)
            except OrthancNotFound:
                failed[item.orthanc_id] = "deleted from Orthanc before it could be sent"
                continue
            except OrthancError as exc:
                later.append(Retry(item.orthanc_id, 1.0, str(exc), counts_as_attempt=False))
                continue
            try:
                dataset = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
                sop_uid = str(dataset.SOPInstanceUID)
            except (InvalidDicomError, AttributeError, ValueError, EOFError) as exc:
                failed[item.orthanc_id] = f"Orthanc's file cannot be read as DICOM: {exc}"
                continue
            loaded.append(_Loaded(item=item, data=data, dataset=dataset, sop_uid=sop_uid))
        now = self._clock()
        if failed:
            for orthanc_id, reason in failed.items():
                log.warning("instance %s failed: %s", orthanc_id, reason)
            self._outbox.mark_failed(failed, now=now)
            self.stats.record_failed(len(failed))
        if later:
            self._outbox.reschedule(later, now=now)
        unknown = {x.item.orthanc_id: x.sop_uid for x in loaded if x.item.sop_uid != x.sop_uid}
        if unknown:
            self._outbox.set_sop_uids(unknown)
        return loaded

    def _post(self, loaded: Sequence[_Loaded]) -> None:
        items = [x.item for x in loaded]
        try:
            answer = self._stow([x.data for x in loaded])
        except KheopsUnauthorized as exc:
            self._outbox.release([item.orthanc_id for item in items])
            if self.health.record_refused(str(exc), self._clock()):
                log.error("KHEOPS refuses the token; sending is paused, nothing is lost: %s", exc)
            return
        except KheopsRejected as exc:
            if exc.status in _WRONG_ENDPOINT:
                self._outbox.release([item.orthanc_id for item in items])
                if self.health.record_refused(str(exc), self._clock(), why=_WRONG_ENDPOINT_WHY):
                    log.error(
                        "%s; sending is paused, nothing is lost: %s", _WRONG_ENDPOINT_WHY, exc
                    )
                return
            self._rejected(items, str(exc))
            return
        except KheopsUnavailable as exc:
            self._unavailable(str(exc))
            self._retry_all(items, str(exc))
            return
        except KheopsError as exc:
            self._retry_all(items, str(exc))
            return
        now = self._clock()
        self._recovered(now)
        self._record_verdicts(loaded, judge([x.sop_uid for x in loaded], answer), now)

    def _stow(self, parts: Sequence[bytes]) -> StowAnswer:
        """One STOW-RS request, counted in `stats` whatever its outcome."""
        started = time.monotonic()
        status: int | None = None
        try:
            answer = self._kheops.stow(self._config.token, parts)
            status = answer.status
            return answer
        except KheopsError as exc:
            status = exc.status
            raise
        finally:
            self.stats.record_stow(
                status=status, seconds=time.monotonic() - started, size=sum(map(len, parts))
            )

    def _record_verdicts(
        self, loaded: Sequence[_Loaded], verdicts: Mapping[str, Judgement], now: float
    ) -> None:
        sent: list[_Loaded] = []
        failed: dict[str, str] = {}
        retries: list[QueuedInstance] = []
        reasons: dict[str, str] = {}
        for x in loaded:
            judgement = verdicts[x.sop_uid]
            if judgement.verdict is Verdict.SENT:
                sent.append(x)
            elif judgement.verdict is Verdict.FAILED:
                failed[x.item.orthanc_id] = judgement.reason
            else:
                retries.append(x.item)
                reasons[x.item.orthanc_id] = judgement.reason
        if sent and not self._hand_on(sent):
            sent = []
        if sent:
            self._outbox.mark_sent([x.item.orthanc_id for x in sent], now=now)
            self.stats.record_sent(len(sent), now=now)
            with self._lock:
                self._sent_log.append((now, len(sent), sum(len(x.data) for x in sent)))
                self._forget_old(now)
        if failed:
            for orthanc_id, reason in failed.items():
                log.warning("KHEOPS refused instance %s: %s", orthanc_id, reason)
            self._outbox.mark_failed(failed, now=now)
            self.stats.record_failed(len(failed))
            self.health.record_error(next(iter(failed.values())), now)
        for item in retries:
            self._retry_all([item], reasons[item.orthanc_id])

    def _hand_on(self, sent: Sequence[_Loaded]) -> bool:
        """Give what KHEOPS stored to `after_store` before the outbox marks it sent.

        In this order a crash in between costs a second upload, which KHEOPS takes
        without harm, and never a share. If `after_store` fails, the instances are
        retried as if the upload had failed, and handed on again after it.
        """
        if self._after_store is None:
            return True
        try:
            self._after_store(
                [
                    SentInstance(
                        orthanc_id=x.item.orthanc_id,
                        sop_uid=x.sop_uid,
                        study_uid=str(x.dataset.get("StudyInstanceUID", "")),
                        series_uid=str(x.dataset.get("SeriesInstanceUID", "")),
                        dataset=x.dataset,
                    )
                    for x in sent
                ]
            )
        except Exception as exc:
            log.exception("could not record the shares of %d stored instances", len(sent))
            self._retry_all([x.item for x in sent], f"could not record its shares: {exc}")
            return False
        return True

    def _rejected(self, items: Sequence[QueuedInstance], error: str) -> None:
        """A 400 names no instance: send each one alone to find the one KHEOPS cannot read."""
        now = self._clock()
        if len(items) > 1:
            self._outbox.reschedule(
                [
                    Retry(i.orthanc_id, 0.0, error, alone=True, counts_as_attempt=False)
                    for i in items
                ],
                now=now,
            )
            return
        log.warning("KHEOPS refused instance %s: %s", items[0].orthanc_id, error)
        self._outbox.mark_failed({items[0].orthanc_id: error}, now=now)
        self.stats.record_failed(1)
        self.health.record_error(error, now)

    def _retry_all(self, items: Sequence[QueuedInstance], error: str) -> None:
        now = self._clock()
        retries: list[Retry] = []
        gave_up: dict[str, str] = {}
        for item in items:
            attempts = item.attempts + 1
            age = now - item.queued_at
            if self._config.maximum_age is not None and age >= self._config.maximum_age:
                gave_up[item.orthanc_id] = (
                    f"gave up after {attempts} attempts over {age / 3600:.1f} h: {error}"
                )
                continue
            delay = next_delay(
                attempts, initial=self._config.retry_initial, maximum=self._config.retry_maximum
            )
            retries.append(Retry(item.orthanc_id, delay, error, alone=item.alone))
        if retries:
            self._outbox.reschedule(retries, now=now)
        if gave_up:
            for orthanc_id, reason in gave_up.items():
                log.warning("instance %s failed: %s", orthanc_id, reason)
            self._outbox.mark_failed(gave_up, now=now)
            self.stats.record_failed(len(gave_up))

    # -- supervisor: token checks and reconciliation -----------------------------

    def _supervise(self) -> None:
        self._guarded(lambda: self._check_token(first=True), "start-up token check")
        next_check = self._clock() + self._config.token_recheck
        next_reconcile = self._clock()
        while not self._stopping.is_set():
            now = self._clock()
            # Each step is scheduled before it runs, so that one that fails waits its interval
            # rather than being retried on every loop, and cannot hold up the other step.
            if now >= next_reconcile:
                next_reconcile = now + self._config.reconcile_interval
                self._guarded(self.reconcile, "reconciliation")
            if now >= next_check:
                next_check = now + self._config.token_recheck
                if self.health.state is State.PAUSED:
                    self._guarded(lambda: self._check_token(first=False), "token check")
            self._stopping.wait(min(1.0, max(0.05, min(next_check, next_reconcile) - now)))

    @staticmethod
    def _guarded(step: Callable[[], object], what: str) -> None:
        try:
            step()
        except Exception:
            log.exception("%s failed; trying again later", what)

    def _check_token(self, *, first: bool) -> None:
        try:
            introspection = self._kheops.introspect(self._config.token)
        except KheopsError as exc:
            if first:
                log.warning("cannot check the token at start-up; queuing anyway: %s", exc)
            return
        self.introspection = introspection
        if first:
            log.warning(
                "KHEOPS %s, token %s: %s",
                self._config.url,
                self._config.token.masked,
                introspection.describe(),
            )
        problem = token_problem(introspection)
        now = self._clock()
        if problem:
            if self.health.record_refused(f"introspection: {problem}", now):
                log.error("sending is paused, nothing is lost: the token %s", problem)
        elif self.health.resume(now):
            log.warning("KHEOPS accepts the token again; sending resumes")
            self._outbox.make_due(now=now)
            self.wake()

    def check_token_now(self) -> None:
        """An administrator asked to retry: check a paused token without waiting."""
        if self.health.state is State.PAUSED:
            self._check_token(first=False)

    def reconcile(self) -> int:
        """Queue instances that Orthanc's change log has and the outbox lacks.

        Only one node reconciles at a time, from the cursor in the (shared) outbox; the last
        RECHECK_CHANGES changes before it are read again, since with several Orthanc writers
        a change can become visible after a later one, but never those before the first
        cursor (stored before the plugin ran). Queuing is idempotent.
        """
        with self._exclusive("reconcile") as mine:
            return self._reconcile() if mine else 0

    def _reconcile(self) -> int:
        cursor = self._outbox.get_meta("last_change")
        last = self._orthanc.last_change()
        if not isinstance(cursor, int) or cursor > last:
            # What Orthanc held before is sent on request only (POST /kheops/send).
            self._outbox.set_meta("first_change", last)
            self._outbox.set_meta("last_change", last)
            return 0
        first = self._outbox.get_meta("first_change")
        if not isinstance(first, int):  # an outbox older than the window: start it here
            first = cursor
            self._outbox.set_meta("first_change", first)
        since = max(first, cursor - RECHECK_CHANGES)
        queued = 0
        while since < last and not self._stopping.is_set():
            page = self._orthanc.changes(since)
            new = [(c.resource_id, 0) for c in page.changes if c.change_type == "NewInstance"]
            if new:
                queued += self._outbox.enqueue(new, now=self._clock(), requeue=False)
            if page.last <= since:
                break
            since = page.last
            if since > cursor:
                self._outbox.set_meta("last_change", since)
            if page.done:
                break
        if queued:
            log.warning("found %d stored instances missing from the queue; queued them", queued)
            self.wake()
        return queued


def token_problem(introspection: Introspection) -> str | None:
    """Why a token cannot feed the main album, or None when it can."""
    if not introspection.active:
        return "is not active (expired, revoked or unknown)"
    if introspection.album_id is None:
        return "is a user token, not an album token"
    if "write" not in introspection.scopes:
        return "lacks the write permission"
    return None
