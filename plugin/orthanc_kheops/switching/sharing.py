"""From stored instances to shared series: the rules in force, share jobs and their worker.

The forwarder calls `Sharer.after_store` with the instances KHEOPS confirmed (00081199). It
evaluates the enabled rules on each instance's own header and records one share job per
(rule, series) it has not seen before, then wakes the share worker; nothing there touches the
network. The worker shares each due series with `PUT /api/studies/{S}/series/{Se}` and
records the outcome:

- 201: shared.
- 5xx, timeouts, resets: retried with backoff; the worker pauses so an outage costs one
  request per pause, and every waiting share is due again once KHEOPS answers.
- 404: the source token is introspected; if it cannot read and send, the rule is marked failing
  with that reason (KHEOPS answers 404 for what a token may not send). Otherwise the series
  may not have landed yet: retried a few times with delay, then failed with the reason.
- 401/403: the rule is marked failing with the reason introspection finds; its shares wait.
  Its tokens are checked again every Kheops.TokenRecheckSeconds; once they look valid the
  rule resumes, and the next share decides.
- other 4xx: failed with KHEOPS's reason.

Pending shares follow the rule in force. A job records what it was decided under (the
condition text, the destination token's identity, the instance that matched). Right before
sharing, the worker compares it with the rule as it is then: a job decided for another
destination is dropped; a job decided under another condition (a PUT, disable-edit-enable, a
configuration rule changed at start, or `after_store` evaluating a snapshot older than a PUT)
is evaluated again on the series' instances in Orthanc, and shared only if it still matches;
a series that cannot be evaluated again (deleted from Orthanc) is dropped. A series whose
UIDs are not DICOM UIDs is never put into a URL: its job fails at once with the reason.
From that comparison to KHEOPS's answer the worker holds the rule in the store
(`hold_rule`): a change or a deletion, on this node or another, waits for the share in
flight, and a rule saved since this node loaded it is loaded again before anything is shared.

Crash window: the forwarder hands instances to `after_store` before the outbox marks them
sent, and retries them if it raises. A crash in between costs a second upload of those
instances (KHEOPS takes it without harm) and never a share; jobs are deduplicated, so
evaluating an instance twice is harmless.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import cast

import pydicom
from pydicom.errors import InvalidDicomError

from ..config import KheopsConfig
from ..forwarding.forwarder import SentInstance
from ..forwarding.health import PROBE_MAXIMUM
from ..kheops.backoff import next_delay
from ..kheops.client import (
    KheopsApi,
    KheopsError,
    KheopsNotFound,
    KheopsRejected,
    KheopsUnauthorized,
    series_uid_problem,
)
from ..observability.masking import Secret
from ..orthanc_rest import OrthancNotFound, OrthancRest, OrthancUnavailable
from ..state.backend import RuleStoreApi
from ..state.rule_store import (
    Decision,
    ShareJob,
    ShareKey,
    StoredRule,
    destination_identity,
)
from .conditions import Condition
from .rules import Origin, Rule, RuleError, check_tokens, parse_rule, token_problem

log = logging.getLogger(__name__)

NOT_FOUND_ATTEMPTS = 5
"""404 answers before a share is failed: the series should be in the main album by then."""
_BATCH = 20
_IDLE_POLL = 1.0


def decision(rule: Rule, instance_id: str | None) -> Decision:
    """What a share of this rule is decided under, now."""
    return Decision(
        rule.condition.text, destination_identity(rule.destination.reveal()), instance_id
    )


def matching_shares(
    rules: Iterable[Rule], instances: Iterable[SentInstance]
) -> tuple[dict[ShareKey, Decision], list[tuple[Rule, SentInstance, Exception]]]:
    """The (rule, series) pairs an instance matches, each with its decision, and the
    evaluations that raised.

    A rule is not evaluated again on further instances of a series it already matched.
    """
    rules = list(rules)
    found: dict[ShareKey, Decision] = {}
    errors: list[tuple[Rule, SentInstance, Exception]] = []
    for instance in instances:
        if not instance.series_uid or not instance.study_uid:
            continue
        for rule in rules:
            key = ShareKey(rule.name, instance.study_uid, instance.series_uid)
            if key in found:
                continue
            try:
                hit = rule.condition.matches(instance.dataset)
            except Exception as exc:  # noqa: BLE001 -- a bad header must not stop the others
                errors.append((rule, instance, exc))
                continue
            if hit:
                found[key] = decision(rule, instance.orthanc_id)
    return found, errors


class Sharer:
    """Keeps the rules in force, turns stored instances into share jobs and runs them."""

    def __init__(
        self,
        config: KheopsConfig,
        *,
        store: RuleStoreApi,
        kheops: KheopsApi,
        orthanc: OrthancRest,
        remember_secret: Callable[[Secret], None] = lambda secret: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self.store = store
        self._kheops = kheops
        self._orthanc = orthanc
        self._remember = remember_secret
        self._clock = clock
        self._lock = threading.Lock()
        self._rules: Mapping[str, Rule] = {}
        self._documents: Mapping[str, Mapping[str, object]] = {}  # as saved, for `_loaded_as`
        self._failing: dict[str, str] = {}
        self._reported: dict[str, str] = {}  # failures logged, until a share works again
        self._pause_until = 0.0
        self._outages = 0
        self._next_check = 0.0
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the rules in force ------------------------------------------------------------

    def install_config_rules(self, rules: Sequence[Rule]) -> None:
        """Make Kheops.SwitchingAlbums the config rules in the store, then load every rule."""
        replaced = self.store.sync_config(
            {rule.name: rule.document() for rule in rules}, now=self._clock()
        )
        for name in replaced:
            log.warning(
                "rule %r created through REST is replaced by the rule of the same name in"
                " Kheops.SwitchingAlbums; its pending shares are dropped",
                name,
            )
        self.reload()

    def reload(self) -> None:
        """Read the rules from the store again (after any change)."""
        rules: dict[str, Rule] = {}
        documents: dict[str, Mapping[str, object]] = {}
        failing: dict[str, str] = {}
        for stored in self.store.rules():
            try:
                rule = parse_rule(stored.document, self._config, origin=cast(Origin, stored.origin))
            except RuleError as exc:
                log.error(
                    "rule %r in the saved state cannot be used, it is ignored: %s", stored.name, exc
                )
                continue
            for secret in rule.secrets():
                self._remember(secret)
            rules[rule.name] = rule
            documents[rule.name] = stored.document
            if stored.failing:
                failing[rule.name] = stored.failing
        with self._lock:
            self._rules = rules
            self._documents = documents
            self._failing = failing

    @property
    def rules(self) -> Mapping[str, Rule]:
        with self._lock:
            return self._rules

    def failing(self) -> dict[str, str]:
        with self._lock:
            return dict(self._failing)

    # -- from stored instances to jobs (sender threads) ----------------------------------

    def after_store(self, instances: Sequence[SentInstance]) -> None:
        """Called by a sender right after a STOW: evaluate, queue, wake.

        It raises when the jobs cannot be saved: the sender then retries the instances.
        """
        enabled = [rule for rule in self.rules.values() if rule.enabled]
        keys, errors = matching_shares(enabled, instances)
        for rule, instance, exc in errors:
            log.warning(
                "rule %r: cannot evaluate the condition on instance %s, taken as no match: %s",
                rule.name,
                instance.orthanc_id,
                exc,
            )
        if not keys:
            return
        refused: dict[str, dict[ShareKey, Decision]] = {}
        for key in list(keys):
            problem = series_uid_problem(key.study_uid, key.series_uid)
            if problem:
                refused.setdefault(problem, {})[key] = keys.pop(key)
        for problem, decided in refused.items():
            if self.store.add_shares(decided, now=self._clock(), failed=problem):
                log.warning("a series cannot be shared: %s", problem)
        new = self.store.add_shares(keys, now=self._clock()) if keys else 0
        if new:
            log.info("%d series to share into switching albums", new)
            self._wake.set()

    # -- the worker ----------------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="kheops-sharer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """The worker finishes its current share; what it had not done stays queued."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def notify(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        self.prepare()
        while not self._stopping.is_set():
            self._wake.clear()
            worked = False
            try:
                worked = self.step()
            except Exception:
                log.exception("share step failed; trying again")
            if not worked:
                self._idle()

    def prepare(self) -> None:
        """What the worker does once at start: check the tokens of the rules (not fatal)."""
        try:
            self._check_all_tokens()
        except Exception:
            log.exception("switching albums: checking the tokens of the rules failed")
        self._next_check = self._clock() + self._config.token_recheck

    def step(self) -> bool:
        """One pass of the worker: token rechecks when due, then due shares.

        Returns whether it shared anything (if not, the worker waits).
        """
        if self._clock() >= self._next_check:
            self._recheck_failing()
            self._next_check = self._clock() + self._config.token_recheck
        return self._share_due()

    def _idle(self) -> None:
        now = self._clock()
        wake_at = min(self._next_check, now + _IDLE_POLL)
        if self._pause_until > now:
            wake_at = min(wake_at, self._pause_until)
        else:
            due = self.store.next_due(self._eligible())
            if due is not None:
                wake_at = min(wake_at, due)
        self._wake.wait(max(0.0, wake_at - now))

    def _eligible(self) -> list[str]:
        with self._lock:
            return [n for n, r in self._rules.items() if r.enabled and n not in self._failing]

    def _share_due(self) -> bool:
        now = self._clock()
        if now < self._pause_until:
            return False
        if self._outages:
            # A probe: the oldest waiting share alone, even before its backoff ends, so that
            # sharing resumes once the pause ends rather than when the backoffs do.
            jobs = self.store.due_shares(self._eligible(), now=float("inf"), limit=1)
        else:
            jobs = self.store.due_shares(self._eligible(), now=now, limit=_BATCH)
        for job in jobs:
            if self._stopping.is_set() or self._clock() < self._pause_until:
                break
            self._share(job)
        return bool(jobs)

    def _share(self, job: ShareJob) -> None:
        with self._lock:
            rule = self._rules.get(job.key.rule)
            held = rule is None or not rule.enabled or job.key.rule in self._failing
        if rule is None or held:
            return  # changed since the jobs were read
        problem = series_uid_problem(job.key.study_uid, job.key.series_uid)
        if problem:
            self.store.mark_failed(job.key, reason=problem, now=self._clock())
            return
        with self.store.hold_rule(rule.name) as stored:
            # Held until KHEOPS answers: a change or a deletion of the rule, from this node's
            # REST API or another node's, waits for this share rather than racing it. Only the
            # share's own row may be written meanwhile: PostgreSQL would make a write to the
            # rule's row wait for this very block.
            in_force = self._loaded_as(rule, stored)
            if in_force:
                if not self._still_decided(rule, job):
                    return
                refused = self._put(rule, job.key)
                if refused is None:
                    # Before the hold ends, so that a deletion waiting for it knows.
                    self.store.mark_shared(job.key, now=self._clock())
        if not in_force:
            self.reload()  # another node, or a change not loaded yet: decide under the new rule
            return
        self._record(rule, job, refused)

    def _loaded_as(self, rule: Rule, stored: StoredRule | None) -> bool:
        """Whether the rule as saved now is the one this worker loaded and may share under."""
        with self._lock:
            loaded = self._documents.get(rule.name)
        return stored is not None and stored.failing is None and stored.document == loaded

    def _put(self, rule: Rule, key: ShareKey) -> KheopsError | None:
        """Share the series; KHEOPS's refusal, if any, is returned to be recorded."""
        try:
            self._kheops.share_series(
                destination=rule.destination,
                source=rule.source,
                study_uid=key.study_uid,
                series_uid=key.series_uid,
            )
        except KheopsError as exc:
            return exc
        return None

    def _record(self, rule: Rule, job: ShareJob, refused: KheopsError | None) -> None:
        key = job.key
        if isinstance(refused, KheopsUnauthorized):
            self._refused(rule, str(refused))
        elif isinstance(refused, KheopsNotFound):
            self._reachable()
            self._not_found(rule, job, str(refused))
        elif isinstance(refused, KheopsRejected):
            self._reachable()
            log.warning(
                "rule %r: KHEOPS refused to share series %s: %s", rule.name, key.series_uid, refused
            )
            self.store.mark_failed(key, reason=str(refused), now=self._clock())
        elif refused is not None:
            self._unreachable(job, str(refused))
        else:
            self._reachable()
            log.info("rule %r: shared series %s into its album", rule.name, key.series_uid)
            with self._lock:
                recovered = self._reported.pop(rule.name, None) is not None
            if recovered:
                log.warning("rule %r: sharing works again", rule.name)

    def _still_decided(self, rule: Rule, job: ShareJob) -> bool:
        """Whether the rule in force still makes this share; drops or re-decides it if not."""
        key = job.key
        now = decision(rule, job.decision.instance_id if job.decision else None)
        if job.decision is not None and job.decision.destination != now.destination:
            log.info(
                "rule %r: series %s was queued for another destination; dropped",
                rule.name,
                key.series_uid,
            )
            self.store.drop_share(key)
            return False
        if job.decision is not None and job.decision.condition == now.condition:
            return True
        if now.instance_id is None:
            log.info(
                "rule %r: series %s was queued under an unknown condition; dropped",
                rule.name,
                key.series_uid,
            )
            self.store.drop_share(key)
            return False
        try:
            found = series_of(self._orthanc, [now.instance_id])
            verdicts = [
                evaluate_series(rule.condition, s, lambda i: read_instance(self._orthanc, i))
                for s in found
            ]
        except OrthancNotFound:
            verdicts = []
        except OrthancUnavailable as exc:  # Orthanc's trouble, not KHEOPS's: no pause
            delay = next_delay(
                job.attempts + 1,
                initial=self._config.retry_initial,
                maximum=self._config.retry_maximum,
            )
            error = f"cannot read the series from Orthanc to evaluate it again: {exc}"
            self.store.reschedule(key, delay=delay, error=error, not_found=False, now=self._clock())
            return False
        hit = next(
            (
                v
                for v in verdicts
                if v.matches and v.instance is not None and v.instance.series_uid == key.series_uid
            ),
            None,
        )
        if hit is None or hit.instance is None:
            log.info(
                "rule %r: series %s no longer matches the rule's condition; not shared",
                rule.name,
                key.series_uid,
            )
            self.store.drop_share(key)
            return False
        self.store.redecide(key, decision(rule, hit.instance.orthanc_id))
        return True

    def _not_found(self, rule: Rule, job: ShareJob, error: str) -> None:
        now = self._clock()
        if self._source_cannot_send(rule, error):
            return
        if job.not_found + 1 >= NOT_FOUND_ATTEMPTS:
            reason = (
                f"KHEOPS still answers 404 after {NOT_FOUND_ATTEMPTS} tries although the series"
                " was stored in the main album and the source token may read and send"
                f" (has the series been removed from the main album?): {error}"
            )
            log.warning("rule %r: series %s failed: %s", job.key.rule, job.key.series_uid, reason)
            self.store.mark_failed(job.key, reason=reason, now=now)
            return
        delay = next_delay(
            job.not_found + 1,
            initial=self._config.retry_initial,
            maximum=self._config.retry_maximum,
        )
        self.store.reschedule(job.key, delay=delay, error=error, not_found=True, now=now)

    def _source_cannot_send(self, rule: Rule, error: str) -> bool:
        """A 404 while the source token cannot read or send: the rule is failing, not the job."""
        try:
            source = self._kheops.introspect(rule.source)
        except KheopsError:
            return False  # unknown: the retries decide
        problem = token_problem(source, ("read", "send"))
        if problem is None:
            return False
        which = "SourceToken" if rule.source_given else "SourceToken (not given: Kheops.Token)"
        self._mark_failing(
            rule.name,
            f"{which} {problem}, so KHEOPS answers 404 to its shares ({error});"
            " its shares wait until the rule is fixed",
        )
        return True

    def _unreachable(self, job: ShareJob, error: str) -> None:
        now = self._clock()
        age = now - job.queued_at
        if self._config.maximum_age is not None and age >= self._config.maximum_age:
            reason = f"gave up after {job.attempts + 1} attempts over {age / 3600:.1f} h: {error}"
            self.store.mark_failed(job.key, reason=reason, now=now)
        else:
            delay = next_delay(
                job.attempts + 1,
                initial=self._config.retry_initial,
                maximum=self._config.retry_maximum,
            )
            self.store.reschedule(job.key, delay=delay, error=error, not_found=False, now=now)
        self._outages += 1
        if self._outages == 1:
            log.warning("sharing waits: KHEOPS is unavailable (%s)", error)
        # One request per pause, and a pause never longer than the forwarder's probe interval:
        # shares resume within seconds of KHEOPS answering, however long the outage.
        self._pause_until = now + next_delay(
            self._outages,
            initial=self._config.retry_initial,
            maximum=min(self._config.retry_maximum, PROBE_MAXIMUM),
        )

    def _reachable(self) -> None:
        if self._outages:
            self._outages = 0
            woken = self.store.make_due(now=self._clock())
            log.warning("KHEOPS answers again; %d waiting shares are due now", woken)

    def _refused(self, rule: Rule, error: str) -> None:
        """401/403: find out which token is wrong, and hold the rule's shares until it is fixed."""
        self._reachable()
        try:
            check_tokens(rule, self._kheops, self._config)
        except RuleError as exc:
            reason = f"{exc}; its shares wait until the rule is fixed"
        except KheopsError:
            reason = f"KHEOPS refused a share ({error}); its shares wait"
        else:
            reason = (
                f"KHEOPS refused a share although both tokens look valid ({error}); has the"
                " tokens' creator lost the album's admin rights? Its shares wait"
            )
        self._mark_failing(rule.name, reason)

    def _mark_failing(self, name: str, reason: str) -> None:
        with self._lock:
            self._failing[name] = reason
            logged = self._reported.get(name) == reason
            self._reported[name] = reason
        self.store.set_failing(name, reason, now=self._clock())
        if not logged:
            log.error("rule %r is failing: %s", name, reason)

    def _check_all_tokens(self) -> None:
        """At start: the album ids for the status, and which rules cannot share at all."""
        for rule in list(self.rules.values()):
            if self._stopping.is_set() or not self._check(rule):
                return

    def _recheck_failing(self) -> None:
        """Failing rules whose tokens look valid again resume; the next share decides."""
        for name in list(self.failing()):
            rule = self.rules.get(name)
            if rule is not None and rule.enabled and not self._check(rule):
                return

    def _check(self, rule: Rule) -> bool:
        """Introspect a rule's tokens and record the verdict; False when KHEOPS is unreachable."""
        try:
            albums = check_tokens(rule, self._kheops, self._config)
        except RuleError as exc:
            self._mark_failing(rule.name, f"{exc}; its shares wait until the rule is fixed")
            return True
        except KheopsError as exc:
            log.warning("cannot check the tokens of rule %r now: %s", rule.name, exc)
            return False
        self.store.set_albums(rule.name, (albums.destination, albums.source))
        with self._lock:
            was_failing = self._failing.pop(rule.name, None) is not None
        if was_failing:
            self.store.set_failing(rule.name, None, now=self._clock())
            log.info("rule %r: its tokens look valid; trying its shares again", rule.name)
            self._wake.set()
        return True


# -- reading instances back from Orthanc (dry run, apply) ------------------------------


@dataclass(frozen=True)
class OrthancSeries:
    orthanc_id: str
    instances: tuple[str, ...]


@dataclass(frozen=True)
class SeriesVerdict:
    """Whether a series matches a condition, decided by `instance` (first match, else first)."""

    series: OrthancSeries
    matches: bool
    instance: SentInstance | None
    read: int
    error: str | None = None


def read_instance(orthanc: OrthancRest, orthanc_id: str) -> SentInstance | None:
    """An instance's header as the forwarder reads it; None when deleted or unreadable."""
    try:
        data = orthanc.read_file(orthanc_id)
    except OrthancNotFound:
        return None
    try:
        dataset = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, ValueError, EOFError) as exc:
        log.warning("instance %s cannot be read as DICOM: %s", orthanc_id, exc)
        return None
    return SentInstance(
        orthanc_id=orthanc_id,
        sop_uid=str(dataset.get("SOPInstanceUID", "")),
        study_uid=str(dataset.get("StudyInstanceUID", "")),
        series_uid=str(dataset.get("SeriesInstanceUID", "")),
        dataset=dataset,
    )


def series_of(orthanc: OrthancRest, resources: Sequence[str]) -> list[OrthancSeries]:
    """The series of Orthanc resources of any level, each once, in the order given."""
    found: dict[str, OrthancSeries] = {}
    for orthanc_id in resources:
        level = orthanc.resource_level(orthanc_id)
        if level == "instances":
            parent = cast(dict[str, object], orthanc.get_json(f"/instances/{orthanc_id}"))
            documents = [orthanc.get_json(f"/series/{parent['ParentSeries']}")]
        elif level == "series":
            documents = [orthanc.get_json(f"/series/{orthanc_id}")]
        else:
            documents = cast(list[object], orthanc.get_json(f"/{level}/{orthanc_id}/series"))
        for document in documents:
            if isinstance(document, dict) and document["ID"] not in found:
                instances = tuple(str(i) for i in document.get("Instances", ()))
                found[document["ID"]] = OrthancSeries(str(document["ID"]), instances)
    return list(found.values())


def evaluate_series(
    condition: Condition,
    series: OrthancSeries,
    load: Callable[[str], SentInstance | None],
) -> SeriesVerdict:
    """A series matches when one of its instances does; reading stops at the first match."""
    first: SentInstance | None = None
    read = 0
    for orthanc_id in series.instances:
        instance = load(orthanc_id)
        if instance is None:
            continue
        read += 1
        first = first or instance
        try:
            if condition.matches(instance.dataset):
                return SeriesVerdict(series, True, instance, read)
        except Exception as exc:  # noqa: BLE001 -- reported with the series, not a 500
            return SeriesVerdict(
                series, False, instance, read, error=f"{type(exc).__name__}: {exc}"
            )
    return SeriesVerdict(series, False, first, read)
