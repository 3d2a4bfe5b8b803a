"""Rule documents: the checks that need no network, and what introspection must say."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from orthanc_kheops.config import ConfigError, KheopsConfig, load_config
from orthanc_kheops.kheops.client import Introspection
from orthanc_kheops.kheops.stow import StowAnswer
from orthanc_kheops.observability.masking import Secret
from orthanc_kheops.switching.rules import (
    Albums,
    Rule,
    RuleError,
    check_tokens,
    config_rules,
    parse_rule,
    token_problem,
    verify_tokens,
)

URL = "https://kheops.example.org"
MAIN = "MainToken0123456789abcd"
DESTINATION = "DestToken0123456789abcd"
SOURCE = "SourceTokn0123456789abcd"


def _config(*rules: dict[str, Any]) -> KheopsConfig:
    section = {"Url": URL, "Token": MAIN, "SwitchingAlbums": list(rules)}
    return load_config({"Kheops": section}, config_directory=Path("/etc/orthanc"))


def _document(**fields: Any) -> dict[str, Any]:
    return {"Name": "cardio-cohort", "DestinationToken": DESTINATION, **fields}


def _parse(**fields: Any) -> Rule:
    return parse_rule(_document(**fields), _config(), origin="api")


def _rejected(document: object, *, root: str = "") -> RuleError:
    with pytest.raises(RuleError) as caught:
        parse_rule(document, _config(), origin="api", root=root)
    return caught.value


def _album(album_id: str | None, *scopes: str, active: bool = True) -> Introspection:
    return Introspection(active=active, scopes=frozenset(scopes), album_id=album_id)


# --- parse_rule ---------------------------------------------------------------------------------


def test_a_minimal_rule_shares_every_series_with_the_main_token_as_source() -> None:
    rule = _parse()

    assert rule.name == "cardio-cohort"
    assert rule.destination == Secret(DESTINATION)
    assert rule.source == Secret(MAIN)
    assert not rule.source_given
    assert rule.enabled
    assert rule.condition.text == ""
    assert rule.origin == "api"


def test_a_full_rule_keeps_every_field() -> None:
    rule = _parse(
        SourceToken=SOURCE,
        Condition="tagValueIsPresent(#Tag.Modality, 'CT')",
        Enabled=False,
        Url=URL + "/",
    )

    assert rule.source == Secret(SOURCE) and rule.source_given
    assert rule.condition.text == "tagValueIsPresent(#Tag.Modality, 'CT')"
    assert not rule.enabled
    assert rule.url == URL + "/"


def test_a_rule_gives_back_the_document_it_was_made_from() -> None:
    document = _document(SourceToken=SOURCE, Condition="tagIsPresent('00100010')", Url=URL)
    rule = parse_rule(document, _config(), origin="api")

    assert rule.document() == {**document, "Enabled": True}
    assert parse_rule(rule.document(), _config(), origin="api") == rule


def test_a_rule_without_source_token_is_stored_without_one() -> None:
    assert "SourceToken" not in _parse().document()


def test_no_printable_form_of_a_rule_shows_its_tokens() -> None:
    rule = _parse(SourceToken=SOURCE)

    for text in (repr(rule), str(rule), f"{rule}"):
        assert DESTINATION not in text and SOURCE not in text and MAIN not in text


@pytest.mark.parametrize("name", ["", "-dash-first", "has space", "a/b", "x" * 65, "é"])
def test_a_name_that_is_not_url_safe_is_refused_naming_the_field(name: str) -> None:
    error = _rejected(_document(Name=name))

    assert error.field == "Name"
    assert str(error).startswith("Name: ")


def test_the_name_of_the_dry_run_route_is_reserved() -> None:
    error = _rejected(_document(Name="test"))

    assert error.field == "Name"
    assert "reserved" in str(error)


def test_a_missing_destination_token_is_refused_naming_the_field() -> None:
    error = _rejected({"Name": "x"})

    assert error.field == "DestinationToken"
    assert "required" in str(error)


def test_a_malformed_token_is_refused_without_repeating_it() -> None:
    error = _rejected(_document(SourceToken="not a token!"))

    assert error.field == "SourceToken"
    assert "not a token!" not in str(error)


def test_an_unknown_key_is_refused_with_a_suggestion() -> None:
    error = _rejected(_document(Conditon="tagIsPresent('00100010')"))

    assert "Condition" in str(error)


def test_a_bad_condition_is_refused_with_its_position() -> None:
    error = _rejected(_document(Condition="tagValueIsPresent(#Tag.Modalityy, 'CT')"))

    assert error.field == "Condition"
    assert str(error).startswith("Condition: unknown DICOM keyword 'Modalityy' at column 24")


def test_a_condition_is_checked_in_every_branch() -> None:
    error = _rejected(_document(Condition="true || tagValueBeginWith(#Tag.PatientName, 'jo')"))

    assert error.field == "Condition"
    assert "tagValueBeginWith" in str(error)


def test_a_condition_of_only_whitespace_is_refused() -> None:
    assert _rejected(_document(Condition="   ")).field == "Condition"


def test_a_url_other_than_the_main_kheops_is_refused() -> None:
    error = _rejected(_document(Url="https://other.example.org"))

    assert error.field == "Url"
    assert "one KHEOPS" in str(error)


def test_field_names_start_with_the_root_given() -> None:
    error = _rejected(_document(Condition="nope("), root="Kheops.SwitchingAlbums[2]")

    assert error.field == "Kheops.SwitchingAlbums[2].Condition"
    assert str(error).startswith("Kheops.SwitchingAlbums[2].Condition: ")


# --- config_rules -------------------------------------------------------------------------------


def test_configured_rules_are_read_in_order_as_config_rules() -> None:
    rules = config_rules(_config(_document(Name="a"), _document(Name="b", Enabled=False)))

    assert [(r.name, r.origin, r.enabled) for r in rules] == [
        ("a", "config", True),
        ("b", "config", False),
    ]


def test_an_invalid_configured_condition_stops_the_load_naming_its_index() -> None:
    config = _config(_document(Name="a"), _document(Name="b"), _document(Name="c", Condition="x"))

    with pytest.raises(ConfigError) as caught:
        config_rules(config)

    assert str(caught.value).startswith("Kheops.SwitchingAlbums[2].Condition: ")


def test_two_configured_rules_with_one_name_stop_the_load() -> None:
    with pytest.raises(ConfigError) as caught:
        config_rules(_config(_document(Name="a"), _document(Name="a")))

    assert str(caught.value).startswith("Kheops.SwitchingAlbums[1].Name: ")
    assert "SwitchingAlbums[0]" in str(caught.value)


def test_a_configured_url_mismatch_stops_the_load() -> None:
    with pytest.raises(ConfigError, match=r"SwitchingAlbums\[0\]\.Url: "):
        config_rules(_config(_document(Url="https://elsewhere.example.org")))


# --- token checks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("introspection", "needed", "problem"),
    [
        (_album("A", "write"), ("write",), None),
        (_album("A", "read", "send"), ("read", "send"), None),
        (_album("A", "write", active=False), ("write",), "is not active"),
        (_album(None, "user", "read", "write", "send"), ("write",), "is a user token"),
        (_album("A", "read"), ("write",), "lacks the write permission (it has read)"),
        (_album("A", "read", "write"), ("read", "send"), "lacks the send permission"),
        (_album("A"), ("read", "send"), "lacks the read and send permissions (it has no"),
    ],
)
def test_token_problem_says_what_a_token_lacks(
    introspection: Introspection, needed: Sequence[str], problem: str | None
) -> None:
    found = token_problem(introspection, needed)

    assert found == problem if problem is None else (found is not None and problem in found)


def _verify_error(
    destination: Introspection,
    source: Introspection,
    *,
    source_given: bool = True,
    main_album: str | None = "MAIN",
) -> RuleError:
    rule = _parse(SourceToken=SOURCE) if source_given else _parse()
    with pytest.raises(RuleError) as caught:
        verify_tokens(rule, destination, source, main_album=main_album)
    return caught.value


def test_valid_tokens_give_the_two_album_ids() -> None:
    rule = _parse(SourceToken=SOURCE)

    albums = verify_tokens(
        rule, _album("DEST", "write"), _album("MAIN", "read", "send"), main_album="MAIN"
    )

    assert albums == Albums(destination="DEST", source="MAIN")


@pytest.mark.parametrize(
    ("destination", "words"),
    [
        (_album("DEST", "write", active=False), "is not active"),
        (_album(None, "user", "write"), "is a user token"),
        (_album("DEST", "read", "send"), "lacks the write permission"),
    ],
)
def test_an_unusable_destination_token_is_named(destination: Introspection, words: str) -> None:
    error = _verify_error(destination, _album("MAIN", "read", "send"))

    assert error.field == "DestinationToken"
    assert words in str(error)


def test_a_source_token_without_send_is_named() -> None:
    error = _verify_error(_album("DEST", "write"), _album("MAIN", "read", "write"))

    assert error.field == "SourceToken"
    assert "lacks the send permission" in str(error)


def test_a_missing_source_token_says_the_main_token_was_used() -> None:
    error = _verify_error(_album("DEST", "write"), _album("MAIN", "write"), source_given=False)

    assert error.field == "SourceToken"
    assert "Kheops.Token" in str(error)


def test_a_source_token_of_another_album_than_the_main_one_is_refused() -> None:
    error = _verify_error(_album("DEST", "write"), _album("ELSEWHERE", "read", "send"))

    assert error.field == "SourceToken"
    assert "not the main album MAIN" in str(error)


def test_a_destination_in_the_source_album_is_refused() -> None:
    error = _verify_error(_album("MAIN", "write"), _album("MAIN", "read", "send"))

    assert error.field == "DestinationToken"
    assert "source album itself" in str(error)


class _Introspecting:
    """A KheopsApi that only introspects; the other calls are not expected."""

    def __init__(self, answers: dict[str, Introspection]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def introspect(self, token: Secret) -> Introspection:
        self.asked.append(token.reveal())
        return self.answers[token.reveal()]

    def stow(self, token: Secret, parts: Sequence[bytes]) -> StowAnswer:
        raise NotImplementedError

    def share_series(
        self, *, destination: Secret, source: Secret, study_uid: str, series_uid: str
    ) -> None:
        raise NotImplementedError


def test_check_tokens_compares_a_given_source_with_the_main_album() -> None:
    kheops = _Introspecting(
        {
            DESTINATION: _album("DEST", "write"),
            SOURCE: _album("OTHER", "read", "send"),
            MAIN: _album("MAIN", "write"),
        }
    )

    with pytest.raises(RuleError, match="not the main album"):
        check_tokens(_parse(SourceToken=SOURCE), kheops, _config())
    assert sorted(kheops.asked) == sorted([DESTINATION, SOURCE, MAIN])


def test_check_tokens_asks_twice_when_the_main_token_is_the_source() -> None:
    kheops = _Introspecting(
        {DESTINATION: _album("DEST", "write"), MAIN: _album("MAIN", "read", "write", "send")}
    )

    assert check_tokens(_parse(), kheops, _config()) == Albums("DEST", "MAIN")
    assert kheops.asked == [DESTINATION, MAIN]
