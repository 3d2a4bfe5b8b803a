"""Switching-album rules: one document shape, validated the same way from orthanc.json and REST.

A rule says "share a series into this album once one of its instances matching this condition
is in the main album". `parse_rule` checks a document without the network (schema, Url, the
whole condition); `verify_tokens` checks what introspection says about its two tokens. After
that the plugin only holds `Rule`, whose tokens are `Secret`s, so that no repr, log line or
REST answer can show them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..config import ConfigError, KheopsConfig
from ..kheops.client import Introspection, KheopsApi
from ..observability.masking import Secret, excerpt, mask_url_credentials
from ..schemas import SchemaError, field_path, validate
from .conditions import Condition, ConditionError, compile_condition

Origin = Literal["config", "api"]
CONFIG_KEY = "Kheops.SwitchingAlbums"
_RESERVED_NAMES = frozenset({"test"})  # POST /kheops/rules/test is the dry run


class RuleError(ValueError):
    """A rule that cannot be saved; the message names the field and says what to do."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Rule:
    """A validated rule. `source` is the token shares are made with: SourceToken or Kheops.Token."""

    name: str
    destination: Secret
    source: Secret
    source_given: bool
    condition: Condition
    enabled: bool
    url: str | None
    origin: Origin

    def document(self) -> dict[str, Any]:
        """The rule document as it was written, tokens in clear: only for the durable store."""
        document: dict[str, Any] = {
            "Name": self.name,
            "DestinationToken": self.destination.reveal(),
            "Condition": self.condition.text,
            "Enabled": self.enabled,
        }
        if self.source_given:
            document["SourceToken"] = self.source.reveal()
        if self.url is not None:
            document["Url"] = self.url
        return document

    def secrets(self) -> tuple[Secret, ...]:
        return (self.destination, self.source)


@dataclass(frozen=True)
class Albums:
    """The album ids the two tokens name, as introspection told."""

    destination: str
    source: str


def parse_rule(document: object, config: KheopsConfig, *, origin: Origin, root: str = "") -> Rule:
    """Check a rule document without the network; `root` prefixes field names in messages."""
    try:
        validate(document, "rule.schema.json", root=root)
    except SchemaError as exc:
        raise RuleError(str(exc), field=exc.field) from None
    assert isinstance(document, Mapping)  # the schema says "object"
    name = str(document["Name"])
    if name in _RESERVED_NAMES:
        raise _error(root, "Name", f"{name!r} is reserved; choose another name")
    url = document.get("Url")
    if url is not None and str(url).rstrip("/") != config.url:
        raise _error(
            root,
            "Url",
            f"{excerpt(mask_url_credentials(str(url)))} is not Kheops.Url ({config.url!r}):"
            " sharing only works within one KHEOPS;"
            " leave Url out or define the rule on the Orthanc that forwards to that KHEOPS",
        )
    try:
        condition = compile_condition(str(document.get("Condition", "")))
    except ConditionError as exc:
        # The message starts with "Condition: ", the field's own name.
        prefix = f"{root}." if root else ""
        raise RuleError(f"{prefix}{exc}", field=field_path(root, ["Condition"])) from exc
    source = document.get("SourceToken")
    return Rule(
        name=name,
        destination=Secret(str(document["DestinationToken"])),
        source=Secret(str(source)) if source is not None else config.token,
        source_given=source is not None,
        condition=condition,
        enabled=bool(document.get("Enabled", True)),
        url=None if url is None else str(url),
        origin=origin,
    )


def config_rules(config: KheopsConfig) -> tuple[Rule, ...]:
    """The rules of Kheops.SwitchingAlbums, checked at load: an invalid one stops Orthanc."""
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for index, document in enumerate(config.switching_albums):
        root = f"{CONFIG_KEY}[{index}]"
        try:
            rule = parse_rule(document, config, origin="config", root=root)
        except RuleError as exc:
            raise ConfigError(str(exc)) from exc
        if rule.name in seen:
            raise ConfigError(
                f"{root}.Name: {rule.name!r} is already the name of"
                f" {CONFIG_KEY}[{seen[rule.name]}]; rule names must be unique"
            )
        seen[rule.name] = index
        rules.append(rule)
    return tuple(rules)


def token_problem(introspection: Introspection, needed: Sequence[str]) -> str | None:
    """Why a token cannot play its part in a share, or None when it can."""
    if not introspection.active:
        return "is not active (expired, revoked or unknown)"
    if introspection.album_id is None:
        return "is a user token; an album token (created in the album's settings) is needed"
    missing = [permission for permission in needed if permission not in introspection.scopes]
    if missing:
        has = ", ".join(sorted(introspection.scopes)) or "no permission"
        plural = "s" if len(missing) > 1 else ""
        return f"lacks the {' and '.join(missing)} permission{plural} (it has {has})"
    return None


def verify_tokens(
    rule: Rule,
    destination: Introspection,
    source: Introspection,
    *,
    main_album: str | None,
) -> Albums:
    """Raise RuleError unless both tokens can share from the main album into another album."""
    problem = token_problem(destination, ("write",))
    if problem:
        raise RuleError(f"DestinationToken: {problem}", field="DestinationToken")
    problem = token_problem(source, ("read", "send"))
    if problem:
        if rule.source_given:
            raise RuleError(f"SourceToken: {problem}", field="SourceToken")
        raise RuleError(
            f"SourceToken: not given, so Kheops.Token is used, and it {problem};"
            " give the rule a SourceToken of the main album with read and send",
            field="SourceToken",
        )
    assert destination.album_id is not None and source.album_id is not None
    if rule.source_given and main_album is not None and source.album_id != main_album:
        raise RuleError(
            f"SourceToken: names album {source.album_id}, not the main album {main_album}"
            " where instances are sent; shares could never find the series",
            field="SourceToken",
        )
    if destination.album_id == source.album_id:
        raise RuleError(
            f"DestinationToken: names album {destination.album_id}, the source album itself;"
            " a switching album must be another album",
            field="DestinationToken",
        )
    return Albums(destination=destination.album_id, source=source.album_id)


def check_tokens(rule: Rule, kheops: KheopsApi, config: KheopsConfig) -> Albums:
    """Introspect the rule's tokens; KheopsError (KHEOPS unreachable) passes through."""
    destination = kheops.introspect(rule.destination)
    source = kheops.introspect(rule.source)
    main_album = None
    if rule.source_given:
        main = kheops.introspect(config.token)
        main_album = main.album_id if main.active else None
    return verify_tokens(rule, destination, source, main_album=main_album)


def _error(root: str, key: str, problem: str) -> RuleError:
    field = field_path(root, [key])
    return RuleError(f"{field}: {problem}", field=field)
