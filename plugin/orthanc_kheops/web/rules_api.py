"""The /kheops/rules... REST routes: switching-album rules, a dry run, and backfill.

Saving a rule checks everything first (schema, Url, the whole condition, then both tokens by
introspection) and stores nothing unless all of it passes: 400 names the field, 502 says
KHEOPS could not be asked. Tokens never leave masked. PUT takes only the fields to change
(left out: unchanged; null: an optional field removed), since GET never shows the tokens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.tag import BaseTag

from ..config import KheopsConfig
from ..forwarding.forwarder import SentInstance
from ..kheops.client import KheopsApi, KheopsError, series_uid_problem
from ..observability.masking import Secret, excerpt, mask
from ..orthanc_rest import OrthancNotFound, OrthancRest, OrthancUnavailable
from ..state.outbox import Outbox
from ..state.rule_store import ShareCounts, ShareKey, StoredRule, tokens
from ..switching.conditions import (
    MAX_LENGTH,
    Condition,
    ConditionError,
    compile_condition,
    tag_value,
)
from ..switching.rules import CONFIG_KEY, Albums, Rule, RuleError, check_tokens, parse_rule
from ..switching.sharing import (
    OrthancSeries,
    SeriesVerdict,
    Sharer,
    decision,
    evaluate_series,
    read_instance,
    series_of,
)
from .forwarding_api import iso
from .routing import HttpError, Request, Response, Router, json_object, orthanc_ids

_NAME = r"([^/]+)"

log = logging.getLogger(__name__)


class RulesApi:
    def __init__(
        self,
        config: KheopsConfig,
        *,
        sharer: Sharer,
        kheops: KheopsApi,
        orthanc: OrthancRest,
        outbox: Outbox,
        remember_secret: Callable[[Secret], None] = lambda secret: None,
        known_secret: Callable[[str], bool] = lambda text: False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._sharer = sharer
        self._store = sharer.store
        self._kheops = kheops
        self._orthanc = orthanc
        self._outbox = outbox
        self._remember = remember_secret
        self._known_secret = known_secret
        self._clock = clock
        # One change at a time (create, change, delete, apply): checks and write agree.
        self._saving = threading.Lock()

    def register(self, router: Router) -> None:
        router.add("GET", "rules", self.list_rules)
        router.add("POST", "rules", self.create)
        router.add("POST", "rules/test", self.dry_run)  # before rules/{name}: "test" is reserved
        router.add("GET", f"rules/{_NAME}", self.get)
        router.add("PUT", f"rules/{_NAME}", self.change)
        router.add("DELETE", f"rules/{_NAME}", self.delete)
        router.add("POST", f"rules/{_NAME}/apply", self.apply)
        router.add("POST", f"rules/{_NAME}/retry", self.retry)

    # -- reading -------------------------------------------------------------------------

    def list_rules(self, request: Request, _: Sequence[str]) -> Response:
        counts = self._store.counts()
        failing = self._sharer.failing()
        return Response(
            200,
            [self._view(r, counts.get(r.name), failing) for r in self._store.rules()],
        )

    def get(self, request: Request, groups: Sequence[str]) -> Response:
        stored = self._existing(groups[0])
        counts = self._store.counts().get(stored.name)
        return Response(200, self._view(stored, counts, self._sharer.failing()))

    def summary(self) -> dict[str, object]:
        """What /kheops/status shows about the switching albums."""
        stored = self._store.rules()
        counts = self._store.counts()
        failing = self._sharer.failing()
        total = ShareCounts(
            pending=sum(c.pending for c in counts.values()),
            shared=sum(c.shared for c in counts.values()),
            failed=sum(c.failed for c in counts.values()),
        )
        return {
            "Rules": len(stored),
            "Enabled": sum(1 for r in stored if r.document.get("Enabled", True)),
            "Failing": sorted(failing),
            "Shares": {"Pending": total.pending, "Shared": total.shared, "Failed": total.failed},
        }

    # -- changing ------------------------------------------------------------------------

    def create(self, request: Request, _: Sequence[str]) -> Response:
        document = dict(json_object(request))
        with self._saving:
            rule = self._parse(document)
            existing = self._store.rule(rule.name)
            if existing is not None:
                how = (
                    f"it comes from {CONFIG_KEY}; choose another name"
                    if existing.origin == "config"
                    else f"change it with PUT /kheops/rules/{rule.name}"
                )
                raise HttpError(
                    409, f"Name: a rule named {rule.name!r} exists already; {how}", field="Name"
                )
            albums = self._check_tokens(rule)
            self._save(rule, albums)
        return Response(201, self._view_of(rule.name))

    def change(self, request: Request, groups: Sequence[str]) -> Response:
        changes = json_object(request)
        with self._saving:
            stored = self._editable(groups[0])
            if "Name" in changes and changes["Name"] != stored.name:
                raise HttpError(
                    400,
                    "Name: a rule cannot be renamed; create a rule with the new name"
                    " and delete this one",
                    field="Name",
                )
            document = _merged(stored.document, changes)
            rule = self._parse(document)
            tokens_kept = tokens(document) == tokens(stored.document)
            # A rule can always be switched off, even while KHEOPS cannot be asked.
            albums = None if tokens_kept and not rule.enabled else self._check_tokens(rule)
            self._save(rule, albums)
        return Response(200, self._view_of(rule.name))

    def delete(self, request: Request, groups: Sequence[str]) -> Response:
        with self._saving:
            stored = self._editable(groups[0])
            dropped = self._store.delete_rule(stored.name) or 0
            self._sharer.reload()
        return Response(200, {"Deleted": stored.name, "DroppedPendingShares": dropped})

    def retry(self, request: Request, groups: Sequence[str]) -> Response:
        stored = self._existing(groups[0])
        retried = self._store.retry(stored.name, now=self._clock())
        self._sharer.reload()
        self._sharer.notify()
        return Response(200, {"Rule": stored.name, "Retried": retried})

    def _parse(self, document: Mapping[str, Any]) -> Rule:
        name = document.get("Name")
        given = [document.get("DestinationToken"), document.get("SourceToken")]
        if isinstance(name, str) and (
            self._known_secret(name) or name in given or name == self._config.token.reveal()
        ):
            raise HttpError(
                400,
                "Name: is a token; a rule name is shown everywhere, choose another",
                field="Name",
            )
        try:
            rule = parse_rule(document, self._config, origin="api")
        except RuleError as exc:
            raise HttpError(400, str(exc), field=exc.field) from exc
        for secret in rule.secrets():
            self._remember(secret)
        return rule

    def _check_tokens(self, rule: Rule) -> Albums:
        try:
            return check_tokens(rule, self._kheops, self._config)
        except RuleError as exc:
            raise HttpError(400, str(exc), field=exc.field) from exc
        except KheopsError as exc:
            raise HttpError(
                502,
                f"cannot check the rule's tokens: KHEOPS at {self._config.url} did not answer"
                f" the introspection ({exc}); nothing was saved, try again later",
            ) from exc

    def _save(self, rule: Rule, albums: Albums | None) -> None:
        dropped = self._store.save_rule(
            rule.name,
            origin="api",
            document=rule.document(),
            albums=None if albums is None else (albums.destination, albums.source),
            now=self._clock(),
        )
        if dropped:
            log.warning(
                "rule %r: its destination changed; %d pending shares decided for the old"
                " album are dropped",
                rule.name,
                dropped,
            )
        self._sharer.reload()
        self._sharer.notify()

    # -- dry run and backfill ------------------------------------------------------------

    def dry_run(self, request: Request, _: Sequence[str]) -> Response:
        """Which series of the resources a condition matches, and the values it reads."""
        body = json_object(request)
        text = body.get("Condition", "")
        if not isinstance(text, str):
            raise HttpError(400, "Condition: must be a string", field="Condition")
        if len(text) > MAX_LENGTH:
            raise HttpError(
                400,
                f"Condition: is {len(text)} characters long; at most {MAX_LENGTH} are allowed",
                field="Condition",
            )
        try:
            condition = compile_condition(text)
        except ConditionError as exc:
            raise HttpError(400, str(exc), field="Condition") from exc
        verdicts = self._evaluate(body, lambda series: series.instances, condition)
        series = [_verdict_json(v, condition.tags) for v in verdicts]
        return Response(
            200,
            {
                "Condition": text,
                "Tags": [_tag_name(tag) for tag in condition.tags],
                "Matched": sum(1 for v in verdicts if v.matches),
                "Series": series,
            },
        )

    def apply(self, request: Request, groups: Sequence[str]) -> Response:
        """Queue shares for the matching series of the resources already in the main album."""
        stored = self._existing(groups[0])
        rule = self._sharer.rules.get(stored.name)
        if rule is None:
            raise HttpError(409, f"rule {stored.name!r} cannot be used; see the Orthanc log")
        if not rule.enabled:
            raise HttpError(
                409, f"rule {rule.name!r} is disabled; enable it before applying it", field="Name"
            )
        body = json_object(request)

        def sent(series: OrthancSeries) -> Sequence[str]:
            known = self._outbox.lookup(list(series.instances))
            return [i for i in series.instances if i in known and known[i].state == "sent"]

        verdicts = self._evaluate(body, sent, rule.condition)
        matched = [v.instance for v in verdicts if v.matches and v.instance is not None]
        decided = {
            ShareKey(rule.name, i.study_uid, i.series_uid): decision(rule, i.orthanc_id)
            for i in matched
            if series_uid_problem(i.study_uid, i.series_uid) is None
        }
        with self._saving:  # a DELETE of the rule waits, or went first and nothing is queued
            current = self._sharer.rules.get(rule.name)
            if (
                current is None
                or not current.enabled
                or decision(current, None) != decision(rule, None)
            ):
                raise HttpError(
                    409,
                    f"rule {rule.name!r} changed or was deleted while it was applied;"
                    " nothing was queued, apply it again",
                    field="Name",
                )
            queued = self._store.requeue_shares(decided, now=self._clock())
        self._sharer.notify()
        return Response(
            200,
            {
                "Rule": rule.name,
                "Series": len(verdicts),
                "NotInMainAlbum": sum(1 for v in verdicts if v.read == 0),
                "Matched": len(matched),
                "Queued": queued,
                "NotShareable": len(matched) - len(decided),
            },
        )

    def _evaluate(
        self,
        body: Mapping[str, object],
        instances: Callable[[OrthancSeries], Sequence[str]],
        condition: Condition,
    ) -> list[SeriesVerdict]:
        resources = orthanc_ids(body, "Resources", required=True) or []
        if not resources:
            raise HttpError(400, "Resources: must list at least one Orthanc id", field="Resources")
        try:
            found = series_of(self._orthanc, resources)
            return [
                evaluate_series(
                    condition,
                    OrthancSeries(s.orthanc_id, tuple(instances(s))),
                    lambda orthanc_id: read_instance(self._orthanc, orthanc_id),
                )
                for s in found
            ]
        except OrthancNotFound as exc:
            raise HttpError(404, f"Resources: {exc}", field="Resources") from None
        except OrthancUnavailable as exc:
            raise HttpError(503, f"Orthanc did not answer: {exc}") from None

    # -- helpers ---------------------------------------------------------------------------

    def _existing(self, name: str) -> StoredRule:
        stored = self._store.rule(name)
        if stored is None:
            raise HttpError(404, f"no rule named {excerpt(name)}", field="Name")
        return stored

    def _editable(self, name: str) -> StoredRule:
        stored = self._existing(name)
        if stored.origin == "config":
            raise HttpError(
                403,
                f"rule {excerpt(name)} comes from the configuration ({CONFIG_KEY}) and is read-only"
                " here; change it in the configuration file and restart Orthanc",
                field="Name",
            )
        return stored

    def _view_of(self, name: str) -> dict[str, object]:
        stored = self._existing(name)
        return self._view(stored, self._store.counts().get(name), self._sharer.failing())

    def _view(
        self, stored: StoredRule, counts: ShareCounts | None, failing: Mapping[str, str]
    ) -> dict[str, object]:
        """A rule as REST shows it: tokens masked, where it comes from, what it did."""
        document = stored.document
        counts = counts or ShareCounts()
        enabled = bool(document.get("Enabled", True))
        reason = failing.get(stored.name)
        source = document.get("SourceToken")
        usable = stored.name in self._sharer.rules
        state = (
            "invalid"
            if not usable
            else "disabled"
            if not enabled
            else "failing"
            if reason
            else "active"
        )
        return {
            "Name": stored.name,
            "Source": stored.origin,
            "ReadOnly": stored.origin == "config",
            "Enabled": enabled,
            "State": state,
            "StateDetail": reason,
            "Condition": document.get("Condition", ""),
            "Url": document.get("Url"),
            "DestinationToken": mask(str(document.get("DestinationToken", ""))),
            "SourceToken": mask(str(source)) if source else self._config.token.masked,
            "SourceIsMainToken": source is None,
            "DestinationAlbumId": stored.destination_album,
            "SourceAlbumId": stored.source_album,
            "Counts": {
                "SeriesMatched": counts.matched,
                "Shared": counts.shared,
                "Pending": counts.pending,
                "Failed": counts.failed,
            },
            "LastError": stored.last_error,
            "LastErrorAt": iso(stored.last_error_at),
            "CreatedAt": iso(stored.created_at),
            "UpdatedAt": iso(stored.updated_at),
        }


def _merged(document: Mapping[str, Any], changes: Mapping[str, object]) -> dict[str, Any]:
    """JSON merge patch (RFC 7396) of one level: null removes a field."""
    merged = dict(document)
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def _tag_name(tag: BaseTag) -> str:
    """The keyword when the dictionary knows the tag, else its eight hex digits."""
    return keyword_for_tag(tag) or f"{int(tag):08X}"


def _verdict_json(verdict: SeriesVerdict, tags: Sequence[BaseTag]) -> dict[str, object]:
    instance = verdict.instance
    return {
        "ID": verdict.series.orthanc_id,
        "StudyInstanceUID": instance.study_uid if instance else None,
        "SeriesInstanceUID": instance.series_uid if instance else None,
        "Matches": verdict.matches,
        "Instances": len(verdict.series.instances),
        "InstancesRead": verdict.read,
        "DecidingInstance": instance.orthanc_id if instance else None,
        "Values": {_tag_name(tag): _value(instance, tag) for tag in tags},
        "Error": verdict.error,
    }


def _value(instance: SentInstance | None, tag: BaseTag) -> str | None:
    """A tag's value as the condition reads it; a value pydicom cannot read says why."""
    if instance is None:
        return None
    try:
        return tag_value(instance.dataset, tag)
    except Exception as exc:  # noqa: BLE001 -- a malformed value is shown, never a 500
        return f"(unreadable: {type(exc).__name__})"
