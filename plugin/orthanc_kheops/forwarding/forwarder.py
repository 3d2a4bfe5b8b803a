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
from typing import TypeVar

import pydicom

from ..config import KheopsConfig
from ..kheops.backoff import next_delay
from ..kheops.client import (
    Introspection,
    KheopsApi,
    KheopsBadAnswer,
    KheopsError,
    KheopsRedirected,
    KheopsRejected,
    KheopsUnauthorized,
    KheopsUnavailable,
)
from ..kheops.stow import UNKNOWN_REASON_ATTEMPTS, Judgement, StowAnswer, Verdict, judge
from ..observability.stats import TransferStats
from ..orthanc_rest import OrthancError, OrthancNotFound, OrthancRest
from ..state.clock import SteadyClock
from ..state.errors import StoreUnavailable
from ..state.outbox import Outbox, QueuedInstance, Retry
from ..state.store_health import StoreHealth
from .files import PreparedFile, UnreadableFile, prepare
from .health import Health, State, Turn

log = logging.getLogger(__name__)

_THROUGHPUT_WINDOW = 60.0
# A STOW-RS answer that says the URL is wrong, not the instances: no instance is to blame.
_WRONG_ENDPOINT = frozenset({404, 405})
_WRONG_ENDPOINT_WHY = "KHEOPS has no STOW-RS endpoint at this URL (check Kheops.Url)"
_REDIRECT_WHY = "Kheops.Url redirects, and the plugin does not follow redirects"
_NOT_AUTHORIZED = 0x0124
_IDLE_POLL = 1.0
RECHECK_CHANGES = 1000
"""Changes before the cursor read again: with several writers a change can commit late."""
_ORTHANC_RETRY = 2.0  # seconds between reads while Orthanc's own REST API fails
# While the state cannot be written (a full disk), how often a worker tries the write again.
_WRITE_RETRY = 2.0
# Sent rows are pruned in steps of this many, so that the store callback never waits long.
_PRUNE_STEP = 1000
_T = TypeVar("_T")


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
    file: PreparedFile  # its dataset is None when no rule could read it

    @property
    def sop_uid(self) -> str:
        return self.file.sop_uid

    @property
    def data(self) -> bytes:
        return self.file.data


class Forwarder:
    def __init__(
        self,
        config: KheopsConfig,
        *,
        outbox: Outbox,
        orthanc: OrthancRest,
        kheops: KheopsApi,
        after_store: AfterStore | None = None,
        header_needed: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] | None = None,
        store_health: StoreHealth | None = None,
        exclusive: Callable[[str], AbstractContextManager[bool]] | None = None,
    ) -> None:
        """`clock` gives the time every deadline and stored time is read from: a
        `SteadyClock` unless a test injects one; `store_health` is shared with the store
        callback, which writes to the outbox too. `header_needed` says whether some rule could
        read the header `after_store` gets: when none could, only the file meta is read (for
        the SOP Instance UID); `exclusive(name)` tells whether this node may do `name` now (one
        node at a time)."""
        self._config = config
        self._header_needed = header_needed
        self._outbox = outbox
        self._orthanc = orthanc
        self._kheops = kheops
        self._after_store = after_store
        self._exclusive = exclusive or (lambda name: nullcontext(True))
        self._clock = clock = clock or SteadyClock()
        self.store_health = store_health or StoreHealth()
        self.health = Health(now=clock(), probe_maximum=config.retry_maximum)
        self.introspection: Introspection | None = None
        self.stats = TransferStats(now=clock())
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stored_since_claim = 0
        self._idle_on_empty_queue = False
        self._reconcile_failed = False
        self._told_rights_lost = False
        self._sent_log: collections.deque[tuple[float, int, int]] = collections.deque()
        # Longer than a worker can take with one batch (reading, connecting, the answer): a
        # claim still held after this was lost (a hung worker, a write that failed).
        self._lease = 2 * (config.connect_timeout + config.request_timeout) + 60.0

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        recovered = self._outbox.recover_interrupted()
        if recovered:
            log.info("%d instances were in flight when Orthanc stopped; queued again", recovered)
        self._catch_up_with_a_clock_step_back()
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

    def instances_stored(self, count: int = 1) -> None:
        """Orthanc stored `count` instances, and they are queued.

        Idle workers are woken only when the queue was empty (to start lingering) or when
        enough instances came for a full batch; otherwise the linger ends their wait. One
        wake per stored instance would cost a claim per instance and per worker.
        """
        with self._lock:
            self._stored_since_claim += count
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
            except StoreUnavailable as exc:
                self._store_failed(exc)
                self._stopping.wait(_WRITE_RETRY)
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
            # First one small request; once KHEOPS answers it, the oldest waiting instance
            # alone, even before its backoff ends, to learn whether KHEOPS takes instances
            # again (its PACS may still be down) before every worker sends.
            if not self._probe_with_introspection():
                return
            batch = self._outbox.claim(
                now=self._clock(), lease=self._lease, max_count=1, max_bytes=0, due_by=float("inf")
            )
            if not batch:
                self._recovered(self._clock())
                return
        else:
            batch = self._outbox.claim(
                now=self._clock(),
                lease=self._lease,
                max_count=self._config.batch_max_instances,
                max_bytes=self._config.batch_max_bytes,
                linger=self._config.batch_linger,
            )
        if not batch:
            self._idle()
            return
        self._store_works()  # only now: a claim that changed no row succeeds on a full disk
        try:
            self._send(batch)
        except StoreUnavailable:
            raise  # Orthanc stops while the disk is full: the rows are recovered at start
        except Exception as exc:
            log.exception("unexpected error while sending %d instances", len(batch))
            self._retry_all(batch, f"internal error: {type(exc).__name__}: {exc}")

    def _probe_with_introspection(self) -> bool:
        """Ask KHEOPS something small to learn whether the outage is over; True if it answered."""
        try:
            self._kheops.introspect(self._config.token)
        except KheopsRedirected as exc:
            self._redirected(exc)
            return False
        except KheopsError as exc:
            self._unavailable(exc)
            return False
        return True

    def _unavailable(self, exc: KheopsError, started: float | None = None) -> None:
        """`started`: when the failed request began; one older than the last recovery is stale."""
        error = str(exc)
        retry_after = exc.retry_after if isinstance(exc, KheopsUnavailable) else None
        if retry_after is not None:
            retry_after = min(retry_after, self._config.retry_maximum)
        if isinstance(exc, KheopsBadAnswer):
            if self.health.record_unavailable(
                error,
                self._clock(),
                retry_after=retry_after,
                detail=f"{error}; retrying",
                started=started,
            ):
                log.error("what answers at Kheops.Url is not KHEOPS; retrying: %s", error)
        elif self.health.record_unavailable(
            error, self._clock(), retry_after=retry_after, started=started
        ):
            log.warning("KHEOPS is unreachable; instances stay queued and are retried: %s", error)

    def _redirected(self, exc: KheopsRedirected) -> None:
        if self.health.record_refused(str(exc), self._clock(), why=_REDIRECT_WHY):
            log.error("sending is paused, nothing is lost: %s", exc)

    def _recovered(self, now: float, started: float | None = None) -> None:
        if self.health.record_success(now, started=started):
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
        loaded = self._load(batch)
        if not loaded:
            return
        recorded = self._post(loaded)
        # The UIDs read from files whose row had none, for the queue listing; those marked
        # sent were recorded with their verdict.
        unknown = {
            x.item.orthanc_id: x.sop_uid
            for x in loaded
            if x.item.sop_uid != x.sop_uid and x.item.orthanc_id not in recorded
        }
        if unknown:
            self._write(lambda: self._outbox.set_sop_uids(unknown))

    # -- writing outcomes --------------------------------------------------------

    def _write(self, write: Callable[[], _T]) -> _T:
        """Make a write until it goes through: an outcome KHEOPS gave is never dropped.

        While the store cannot be written (a full disk) the claimed rows stay in flight; if
        Orthanc stops first, they are pending again at the next start.
        """
        while True:
            try:
                result = write()
            except StoreUnavailable as exc:
                self._store_failed(exc)
                if self._stopping.wait(_WRITE_RETRY):
                    raise
                continue
            self._store_works()
            return result

    def _store_failed(self, exc: StoreUnavailable) -> None:
        now = self._clock()
        error = f"cannot write the queue in {self._config.state_directory}: {exc}"
        self.health.record_error(error, now)
        if self.store_health.failed(error, now):
            log.error(
                "%s; instances stay queued and the write is tried again every %g s, nothing"
                " is lost (free space in Kheops.StateDirectory)",
                error,
                _WRITE_RETRY,
            )

    def _store_works(self) -> None:
        if self.store_health.succeeded():
            log.warning("the queue can be written again; sending goes on")

    def _load(self, batch: Sequence[QueuedInstance]) -> list[_Loaded]:
        """Each instance read and judged on its own: what one file does never stops another."""
        loaded: list[_Loaded] = []
        failed: dict[str, str] = {}
        later: list[Retry] = []
        missing: list[QueuedInstance] = []
        orthanc_error: str | None = None
        left: list[str] = []
        budget = self._config.batch_max_bytes
        header = self._header_needed()
        for item in batch:
            if loaded and budget <= 0:
                # The sizes in the queue were wrong: never hold more than the bound in memory.
                left.append(item.orthanc_id)
                continue
            try:
                data = self._orthanc.read_file(
                    item.orthanc_id, size=item.size, file_uuid=item.file_uuid
                )
            except OrthancNotFound:
                missing.append(item)
                continue
            except OrthancError as exc:
                orthanc_error = str(exc)
                later.append(_orthanc_retry(item, orthanc_error))
                continue
            except Exception as exc:  # noqa: BLE001 -- a bug: retried like a failed request
                later.append(self._backoff(item, _internal(exc)))
                continue
            try:
                prepared = prepare(data, header=header)
            except UnreadableFile as exc:
                failed[item.orthanc_id] = str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 -- a bug here must still fail only this file
                failed[item.orthanc_id] = _internal(exc)
                continue
            if prepared.header_added:
                log.info("instance %s had no DICOM file header; one was added", item.orthanc_id)
            loaded.append(_Loaded(item=item, file=prepared))
            budget -= len(prepared.data)
        now = self._clock()
        if missing:
            try:
                self._orthanc.check_api()
            except OrthancError as exc:
                # Every path answers 404: the URL is wrong, not the instances.
                orthanc_error = str(exc)
                later.extend(_orthanc_retry(item, orthanc_error) for item in missing)
            else:
                self._deleted([item.orthanc_id for item in missing])
        if orthanc_error is not None and not loaded:
            if self.health.record_orthanc_unavailable(orthanc_error, now):
                log.error("cannot read instances from Orthanc; they stay queued: %s", orthanc_error)
        elif loaded and self.health.record_orthanc_available(now):
            log.warning("Orthanc's REST API answers again; sending resumes")
        if failed:
            for orthanc_id, reason in failed.items():
                log.warning("instance %s failed: %s", orthanc_id, reason)
            self._write(lambda: self._outbox.mark_failed(failed, now=now))
            self.stats.record_failed(len(failed))
            self.health.record_error(next(iter(failed.values())), now)
        if later:
            self._write(lambda: self._outbox.reschedule(later, now=now))
        if left:
            self._write(lambda: self._outbox.release(left))
        return loaded

    def _deleted(self, orthanc_ids: Sequence[str]) -> None:
        """Orthanc answered 404 for these files, and /system answers: deleted before they were
        sent (a wrong prefix in OrthancUrl, where every path answers 404, is told apart by
        `_load` with OrthancRest.check_api)."""

        def forget() -> int:
            self._outbox.release(orthanc_ids)
            return self.instances_deleted(orthanc_ids)

        self._write(forget)

    def instances_deleted(self, orthanc_ids: Sequence[str]) -> int:
        """Orthanc deleted these instances (its Deleted change): unsent ones leave the queue.

        Quietly, counted, when a user deleted them; with storage recycling configured in
        Orthanc, an error line each, since recycling deletes what was never sent. Orthanc's
        Deleted change does not say who deleted, so with recycling on every such deletion
        is logged as an error.
        """
        gone = self._outbox.forget_deleted(orthanc_ids)
        if gone and self._config.storage_recycling:
            log.error(
                "%d instances were deleted from Orthanc before they were sent, probably by"
                " storage recycling (%s): they never reached KHEOPS (%s)",
                gone,
                self._config.storage_recycling,
                ", ".join(orthanc_ids[:5]) + (" …" if len(orthanc_ids) > 5 else ""),
            )
        elif gone:
            log.info("%d instances deleted from Orthanc before they were sent left the queue", gone)
        return gone

    def _post(self, loaded: Sequence[_Loaded]) -> frozenset[str]:
        """Send one request and record its outcome: the Orthanc ids marked sent."""
        items = [x.item for x in loaded]
        started = self._clock()
        try:
            answer = self._stow([x.data for x in loaded])
        except KheopsRedirected as exc:
            self._write(lambda: self._outbox.release([item.orthanc_id for item in items]))
            self._redirected(exc)
            return frozenset()
        except KheopsUnauthorized as exc:
            self._write(lambda: self._outbox.release([item.orthanc_id for item in items]))
            if self.health.record_refused(str(exc), self._clock()):
                log.error("KHEOPS refuses the token; sending is paused, nothing is lost: %s", exc)
            return frozenset()
        except KheopsRejected as exc:
            if exc.status in _WRONG_ENDPOINT:
                self._write(lambda: self._outbox.release([item.orthanc_id for item in items]))
                if self.health.record_refused(str(exc), self._clock(), why=_WRONG_ENDPOINT_WHY):
                    log.error(
                        "%s; sending is paused, nothing is lost: %s", _WRONG_ENDPOINT_WHY, exc
                    )
                return frozenset()
            self._rejected(items, str(exc))
            return frozenset()
        except KheopsUnavailable as exc:
            if self.health.began_before_recovery(started):
                # Failed in an outage that has ended since: try again soon, not after a
                # backoff that nothing would cut short.
                self._retry_all(items, str(exc), at_least=exc.retry_after, first_delay=True)
            else:
                # Rescheduled before the outage is recorded: a success of another worker in
                # between then makes these due again rather than leaving them to their backoff.
                self._retry_all(items, str(exc), at_least=exc.retry_after)
            self._unavailable(exc, started)
            return frozenset()
        except KheopsError as exc:
            self._retry_all(items, str(exc))
            return frozenset()
        now = self._clock()
        self._recovered(now, started)
        verdicts = judge([x.sop_uid for x in loaded], answer)
        if self._token_lost(loaded, verdicts):
            return frozenset()
        return self._record_verdicts(loaded, verdicts, now)

    def _token_lost(self, loaded: Sequence[_Loaded], verdicts: Mapping[str, Judgement]) -> bool:
        """292 for every instance of several series: does the token still work?

        KHEOPS answers 292 for a series another album holds, and for every series once the
        token's creator lost the album's admin rights. Introspection cannot tell the second
        case (such a token still introspects active), but it tells a revoked token or a lost
        permission: then sending pauses and the instances wait, rather than being failed.
        """
        series = {x.file.series_uid for x in loaded}
        if len(series) < 2 or any(j.code != _NOT_AUTHORIZED for j in verdicts.values()):
            return False
        try:
            introspection = self._kheops.introspect(self._config.token)
        except KheopsError as exc:
            self._retry_all(
                [x.item for x in loaded],
                f"{verdicts[loaded[0].sop_uid].reason}; the token could not be checked: {exc}",
            )
            return True
        problem = token_problem(introspection)
        if problem is None:
            if not self._told_rights_lost:  # once, until KHEOPS stores an instance again
                self._told_rights_lost = True
                log.error(
                    "KHEOPS refused every instance of %d series with 292 although the token"
                    " looks valid: has the token's creator lost the album's admin rights?",
                    len(series),
                )
            return False
        self._write(lambda: self._outbox.release([x.item.orthanc_id for x in loaded]))
        self.introspection = introspection
        if self.health.record_refused(
            f"292 for every instance; the token {problem}", self._clock()
        ):
            log.error("sending is paused, nothing is lost: the token %s", problem)
        return True

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
    ) -> frozenset[str]:
        """Record each instance's verdict: the Orthanc ids marked sent."""
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
            elif judgement.bounded and x.item.attempts + 1 >= UNKNOWN_REASON_ATTEMPTS:
                failed[x.item.orthanc_id] = (
                    f"{judgement.reason}; gave up after {x.item.attempts + 1} attempts"
                )
            else:
                retries.append(x.item)
                reasons[x.item.orthanc_id] = judgement.reason
        if sent and not self._hand_on(sent):
            sent = []
        if sent:
            self._told_rights_lost = False
            uids = {x.item.orthanc_id: x.sop_uid for x in sent if x.item.sop_uid != x.sop_uid}
            self._write(
                lambda: self._outbox.mark_sent(
                    [x.item.orthanc_id for x in sent], now=now, sop_uids=uids
                )
            )
            self.stats.record_sent(len(sent), now=now)
            with self._lock:
                self._sent_log.append((now, len(sent), sum(len(x.data) for x in sent)))
                self._forget_old(now)
        if failed:
            for orthanc_id, reason in failed.items():
                log.warning("KHEOPS refused instance %s: %s", orthanc_id, reason)
            self._write(lambda: self._outbox.mark_failed(failed, now=now))
            self.stats.record_failed(len(failed))
            self.health.record_error(next(iter(failed.values())), now)
        for item in retries:
            self._retry_all([item], reasons[item.orthanc_id])
        return frozenset(x.item.orthanc_id for x in sent)

    def _hand_on(self, sent: Sequence[_Loaded]) -> bool:
        """Give what KHEOPS stored to `after_store` before the outbox marks it sent.

        In this order a crash in between costs a second upload, which KHEOPS takes
        without harm, and never a share. If `after_store` fails, the instances are
        retried as if the upload had failed, and handed on again after it.
        """
        # No enabled rule now: none was in force when KHEOPS confirmed these, nothing to share.
        if self._after_store is None or not self._header_needed():
            return True
        instances = []
        for x in sent:
            try:
                # Read when no rule could need it, and a rule was enabled since: read it now.
                file = x.file if x.file.dataset is not None else prepare(x.file.data)
            except UnreadableFile as exc:
                log.warning("instance %s: no rule applies, %s", x.item.orthanc_id, exc)
                continue
            if file.dataset is None:  # not when read with its header, as here
                continue
            instances.append(
                SentInstance(
                    orthanc_id=x.item.orthanc_id,
                    sop_uid=x.sop_uid,
                    study_uid=file.study_uid,
                    series_uid=file.series_uid,
                    dataset=file.dataset,
                )
            )
        after_store = self._after_store
        try:
            # The share jobs live in a state file too: a full disk is waited out here.
            self._write(lambda: after_store(instances))
        except StoreUnavailable:
            raise
        except Exception as exc:
            log.exception("could not record the shares of %d stored instances", len(sent))
            self._retry_all([x.item for x in sent], f"could not record its shares: {exc}")
            return False
        return True

    def _rejected(self, items: Sequence[QueuedInstance], error: str) -> None:
        """A 400 names no instance: send each one alone to find the one KHEOPS cannot read."""
        now = self._clock()
        if len(items) > 1:
            self._write(
                lambda: self._outbox.reschedule(
                    [
                        Retry(i.orthanc_id, 0.0, error, alone=True, counts_as_attempt=False)
                        for i in items
                    ],
                    now=now,
                )
            )
            return
        log.warning("KHEOPS refused instance %s: %s", items[0].orthanc_id, error)
        self._write(lambda: self._outbox.mark_failed({items[0].orthanc_id: error}, now=now))
        self.stats.record_failed(1)
        self.health.record_error(error, now)

    def _retry_all(
        self,
        items: Sequence[QueuedInstance],
        error: str,
        *,
        at_least: float | None = None,
        first_delay: bool = False,
    ) -> None:
        """Each instance waits its backoff (the first one with `first_delay`), or `at_least`
        (a Retry-After) when that is longer."""
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
            retries.append(self._backoff(item, error, at_least=at_least, first=first_delay))
        if retries:
            self._write(lambda: self._outbox.reschedule(retries, now=now))
        if gave_up:
            for orthanc_id, reason in gave_up.items():
                log.warning("instance %s failed: %s", orthanc_id, reason)
            self._write(lambda: self._outbox.mark_failed(gave_up, now=now))
            self.stats.record_failed(len(gave_up))

    def _backoff(
        self,
        item: QueuedInstance,
        error: str,
        *,
        at_least: float | None = None,
        first: bool = False,
    ) -> Retry:
        delay = next_delay(
            1 if first else item.attempts + 1,
            initial=self._config.retry_initial,
            maximum=self._config.retry_maximum,
        )
        if at_least is not None:
            delay = max(delay, min(at_least, self._config.retry_maximum))
        return Retry(item.orthanc_id, delay, error, alone=item.alone)

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
                self._guarded(self._reconcile_watched, "reconciliation")
                self._guarded(self.prune, "pruning of sent instances")
            if now >= next_check:
                next_check = now + self._config.token_recheck
                if self.health.state is State.PAUSED:
                    self._guarded(lambda: self._check_token(first=False), "token check")
            self._stopping.wait(min(1.0, max(0.05, min(next_check, next_reconcile) - now)))

    def _guarded(self, step: Callable[[], object], what: str) -> None:
        try:
            step()
        except StoreUnavailable as exc:
            self._store_failed(exc)  # logged once per problem, not once per step
        except Exception:
            log.exception("%s failed; trying again later", what)

    def _check_token(self, *, first: bool) -> None:
        try:
            introspection = self._kheops.introspect(self._config.token)
        except KheopsRedirected as exc:
            self._redirected(exc)
            return
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

    def sent_elsewhere(self) -> None:
        """Another node of the site just had KHEOPS store instances: if this node waits out
        an outage, it probes now, so that it rejoins the drain at once."""
        self.health.probe_now()

    def check_token_now(self) -> None:
        """An administrator asked to retry: check a paused token without waiting."""
        if self.health.state is State.PAUSED:
            self._check_token(first=False)

    def _reconcile_watched(self) -> None:
        """Reconcile; Orthanc's REST failing shows in the state (once), not as a traceback."""
        try:
            self.reconcile()
        except OrthancError as exc:
            error: OrthancError = exc
            if isinstance(exc, OrthancNotFound):  # /changes always exists: is the URL wrong?
                try:
                    self._orthanc.check_api()
                except OrthancError as wrong_url:
                    error = wrong_url
            self._reconcile_failed = True
            if self.health.record_orthanc_unavailable(str(error), self._clock()):
                log.error("cannot read Orthanc's change log: %s", error)
            return
        # Only a spell this step saw ends here: the workers end the spells they see.
        if self._reconcile_failed and self.health.record_orthanc_available(self._clock()):
            log.warning("Orthanc's REST API answers again; sending resumes")
        self._reconcile_failed = False

    def _catch_up_with_a_clock_step_back(self) -> None:
        """The system clock is behind the last time the plugin ran (it was stepped back while
        Orthanc was stopped): what was due then is due now, not once the clock catches up."""
        seen = self._outbox.get_meta("clock")
        now = self._clock()
        if isinstance(seen, int | float) and now < seen:
            woken = self._outbox.make_due(now=now)
            log.warning(
                "the system clock is %.0f s behind the last time the plugin ran; %d waiting"
                " instances are due now",
                seen - now,
                woken,
            )

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
        self._outbox.set_meta("clock", self._clock())  # see _catch_up_with_a_clock_step_back
        cursor = self._outbox.get_meta("last_change")
        last = self._orthanc.last_change()
        if not isinstance(cursor, int) or cursor > last:
            # What Orthanc held before is sent on request only (POST /kheops/send).
            self._outbox.set_meta("first_change", last)
            self._outbox.set_meta("last_change", last)
            if cursor is None:
                self._note_what_is_not_queued()
            return 0
        first = self._outbox.get_meta("first_change")
        if not isinstance(first, int):  # an outbox older than the window: start it here
            first = cursor
            self._outbox.set_meta("first_change", first)
        since = max(first, cursor - RECHECK_CHANGES)
        queued = 0
        while since < last and not self._stopping.is_set():
            page = self._orthanc.changes(since)
            new = self._missing(
                [c.resource_id for c in page.changes if c.change_type == "NewInstance"]
            )
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

    def _missing(self, orthanc_ids: Sequence[str]) -> list[tuple[str, int]]:
        """The instances the outbox lacks, with their size from Orthanc (the byte bound needs
        it); one deleted since is left out."""
        known = self._outbox.lookup(orthanc_ids)
        missing: list[tuple[str, int]] = []
        for orthanc_id in dict.fromkeys(orthanc_ids):
            if orthanc_id in known:
                continue
            try:
                found = self._orthanc.instances_of("instances", orthanc_id)
            except OrthancNotFound:
                continue
            missing.extend((i.orthanc_id, i.size) for i in found)
        return missing

    def _note_what_is_not_queued(self) -> None:
        """A new outbox: say what Orthanc already holds that it will not send by itself."""
        statistics = self._orthanc.get_json("/statistics")
        held = statistics.get("CountInstances", 0) if isinstance(statistics, dict) else 0
        counts = self._outbox.counts()
        unqueued = int(held) - sum(
            counts[state] for state in ("pending", "inflight", "sent", "failed")
        )
        if unqueued > 0:
            log.warning(
                "the queue is new and Orthanc already holds %d instances that are not queued"
                " (stored before the plugin ran, or the queue file was deleted); they are not"
                ' sent unless asked: POST /kheops/send {"Resources": [ids]}, or "Send to'
                ' KHEOPS" on a study page of Orthanc Explorer',
                unqueued,
            )

    def prune(self) -> int:
        """Forget sent rows older than the retention, in steps; the counts keep them."""
        if self._config.sent_retention is None:
            return 0
        before = self._clock() - self._config.sent_retention
        pruned = 0
        while not self._stopping.is_set():
            step = self._outbox.prune_sent(before=before, limit=_PRUNE_STEP)
            pruned += step
            if step < _PRUNE_STEP:
                break
            time.sleep(0)  # let a waiting writer (the store callback) take the lock first
        if pruned:
            log.info("forgot %d instances sent more than the retention ago", pruned)
        return pruned


def _orthanc_retry(item: QueuedInstance, error: str) -> Retry:
    return Retry(item.orthanc_id, _ORTHANC_RETRY, error, alone=item.alone, counts_as_attempt=False)


def _internal(exc: BaseException) -> str:
    return f"internal error: {type(exc).__name__}: {exc}"


def token_problem(introspection: Introspection) -> str | None:
    """Why a token cannot feed the main album, or None when it can."""
    if not introspection.active:
        return "is not active (expired, revoked or unknown)"
    if introspection.album_id is None:
        return "is a user token, not an album token"
    if "write" not in introspection.scopes:
        return "lacks the write permission"
    return None
