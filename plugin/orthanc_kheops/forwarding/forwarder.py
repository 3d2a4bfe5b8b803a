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
from dataclasses import dataclass

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
from ..state.outbox import Outbox, QueuedInstance, Retry
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
_ORTHANC_RETRY = 2.0  # seconds between reads while Orthanc's own REST API fails


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`header_needed` says whether some rule could read the header `after_store` gets:
        when none could, only the file meta is read (for the SOP Instance UID)."""
        self._config = config
        self._header_needed = header_needed
        self._outbox = outbox
        self._orthanc = orthanc
        self._kheops = kheops
        self._after_store = after_store
        self._clock = clock
        self.health = Health(now=clock(), probe_maximum=config.retry_maximum)
        self.introspection: Introspection | None = None
        self.stats = TransferStats(now=clock())
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._inflight = 0
        self._stored_since_claim = 0
        self._idle_on_empty_queue = False
        self._reconcile_failed = False
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
            # First one small request; once KHEOPS answers it, the oldest waiting instance
            # alone, even before its backoff ends, to learn whether KHEOPS takes instances
            # again (its PACS may still be down) before every worker sends.
            if not self._probe_with_introspection():
                return
            batch = self._outbox.claim(now=float("inf"), max_count=1, max_bytes=0)
            if not batch:
                self._recovered(self._clock())
                return
        else:
            batch = self._outbox.claim(
                now=self._clock(),
                max_count=self._config.batch_max_instances,
                max_bytes=self._config.batch_max_bytes,
                linger=self._config.batch_linger,
            )
        if not batch:
            self._idle()
            return
        try:
            self._send(batch)
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

    def _unavailable(self, exc: KheopsError) -> None:
        error = str(exc)
        retry_after = exc.retry_after if isinstance(exc, KheopsUnavailable) else None
        if retry_after is not None:
            retry_after = min(retry_after, self._config.retry_maximum)
        if isinstance(exc, KheopsBadAnswer):
            if self.health.record_unavailable(
                error, self._clock(), retry_after=retry_after, detail=f"{error}; retrying"
            ):
                log.error("what answers at Kheops.Url is not KHEOPS; retrying: %s", error)
        elif self.health.record_unavailable(error, self._clock(), retry_after=retry_after):
            log.warning("KHEOPS is unreachable; instances stay queued and are retried: %s", error)

    def _redirected(self, exc: KheopsRedirected) -> None:
        if self.health.record_refused(str(exc), self._clock(), why=_REDIRECT_WHY):
            log.error("sending is paused, nothing is lost: %s", exc)

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
        """Each instance read and judged on its own: what one file does never stops another."""
        loaded: list[_Loaded] = []
        failed: dict[str, str] = {}
        later: list[Retry] = []
        missing: list[QueuedInstance] = []
        orthanc_error: str | None = None
        for item in batch:
            try:
                data = self._orthanc.read_file(item.orthanc_id, size=item.size)
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
                prepared = prepare(data, header=self._header_needed())
            except UnreadableFile as exc:
                failed[item.orthanc_id] = str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 -- a bug here must still fail only this file
                failed[item.orthanc_id] = _internal(exc)
                continue
            if prepared.header_added:
                log.info("instance %s had no DICOM file header; one was added", item.orthanc_id)
            loaded.append(_Loaded(item=item, file=prepared))
        now = self._clock()
        if missing:
            try:
                self._orthanc.check_api()
            except OrthancError as exc:
                # Every path answers 404: the URL is wrong, not the instances.
                orthanc_error = str(exc)
                later.extend(_orthanc_retry(item, orthanc_error) for item in missing)
            else:
                failed.update(
                    (item.orthanc_id, "deleted from Orthanc before it could be sent")
                    for item in missing
                )
        if orthanc_error is not None and not loaded:
            if self.health.record_orthanc_unavailable(orthanc_error, now):
                log.error("cannot read instances from Orthanc; they stay queued: %s", orthanc_error)
        elif loaded and self.health.record_orthanc_available(now):
            log.warning("Orthanc's REST API answers again; sending resumes")
        if failed:
            for orthanc_id, reason in failed.items():
                log.warning("instance %s failed: %s", orthanc_id, reason)
            self._outbox.mark_failed(failed, now=now)
            self.stats.record_failed(len(failed))
            self.health.record_error(next(iter(failed.values())), now)
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
        except KheopsRedirected as exc:
            self._outbox.release([item.orthanc_id for item in items])
            self._redirected(exc)
            return
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
            # Rescheduled before the outage is recorded: a success of another worker in
            # between then makes these due again rather than leaving them to their backoff.
            self._retry_all(items, str(exc), at_least=exc.retry_after)
            self._unavailable(exc)
            return
        except KheopsError as exc:
            self._retry_all(items, str(exc))
            return
        now = self._clock()
        self._recovered(now)
        verdicts = judge([x.sop_uid for x in loaded], answer)
        if self._token_lost(loaded, verdicts):
            return
        self._record_verdicts(loaded, verdicts, now)

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
            log.error(
                "KHEOPS refused every instance of %d series with 292 although the token looks"
                " valid: has the token's creator lost the album's admin rights?",
                len(series),
            )
            return False
        self._outbox.release([x.item.orthanc_id for x in loaded])
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
        try:
            self._after_store(instances)
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

    def _retry_all(
        self, items: Sequence[QueuedInstance], error: str, *, at_least: float | None = None
    ) -> None:
        """Each instance waits its backoff, or `at_least` (a Retry-After) when that is longer."""
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
            retries.append(self._backoff(item, error, at_least=at_least))
        if retries:
            self._outbox.reschedule(retries, now=now)
        if gave_up:
            for orthanc_id, reason in gave_up.items():
                log.warning("instance %s failed: %s", orthanc_id, reason)
            self._outbox.mark_failed(gave_up, now=now)
            self.stats.record_failed(len(gave_up))

    def _backoff(self, item: QueuedInstance, error: str, *, at_least: float | None = None) -> Retry:
        delay = next_delay(
            item.attempts + 1,
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

    def reconcile(self) -> int:
        """Queue instances that Orthanc's change log has and the outbox lacks."""
        since = self._outbox.get_meta("last_change")
        last = self._orthanc.last_change()
        if not isinstance(since, int) or since > last:
            self._outbox.set_meta("last_change", last)
            return 0
        queued = 0
        while since < last and not self._stopping.is_set():
            page = self._orthanc.changes(since)
            new = [(c.resource_id, 0) for c in page.changes if c.change_type == "NewInstance"]
            if new:
                queued += self._outbox.enqueue(new, now=self._clock(), requeue=False)
            if page.last <= since:
                break
            since = page.last
            self._outbox.set_meta("last_change", since)
            if page.done:
                break
        if queued:
            log.warning("found %d stored instances missing from the queue; queued them", queued)
            self.wake()
        return queued


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
