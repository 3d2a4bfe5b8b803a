"""Tokens are masked wherever they could be printed."""

from __future__ import annotations

import logging

import pytest

from orthanc_kheops.observability.masking import Redactor, Secret, excerpt, mask

TOKEN = "KbSVRVsa0rTCh6D5l9JnAb"
OTHER = "See1fW5f2ZhxS6Q2nv0Xyz"


@pytest.mark.parametrize(
    ("token", "masked"),
    [
        (TOKEN, "KbSV…Ab"),
        ("abcdefghijk", "abcd…jk"),
        ("abcdefghij", "………"),
        ("abc", "………"),
        ("ab", "……"),
        ("", ""),
    ],
    ids=["album-token", "eleven", "ten", "three", "two", "empty"],
)
def test_mask_shows_the_head_and_tail_of_long_tokens_only(token: str, masked: str) -> None:
    assert mask(token) == masked


def test_masked_form_never_holds_enough_to_use_the_token() -> None:
    for length in range(1, 70):
        token = "".join(chr(ord("a") + n % 26) for n in range(length))
        shown = mask(token).replace("…", "")
        assert len(shown) <= 6
        assert len(shown) < length or length == 0


def test_secret_printable_forms_are_masked() -> None:
    secret = Secret(TOKEN)

    shown = [repr(secret), str(secret), f"{secret}", f"{secret!r}", "{}".format(secret)]  # noqa: UP032
    shown.append(str([secret]))
    for text in shown:
        assert TOKEN not in text
    assert repr(secret) == "Secret('KbSV…Ab')"
    assert str(secret) == "KbSV…Ab"
    assert secret.masked == "KbSV…Ab"


def test_only_reveal_gives_the_clear_token() -> None:
    assert Secret(TOKEN).reveal() == TOKEN


def test_a_secret_in_a_log_record_is_masked(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("token is %s (%r)", Secret(TOKEN), Secret(TOKEN))

    assert TOKEN not in caplog.text
    assert "KbSV…Ab" in caplog.text


def test_secrets_compare_by_value() -> None:
    assert Secret(TOKEN) == Secret(TOKEN)
    assert Secret(TOKEN) != Secret(OTHER)
    assert Secret(TOKEN) != TOKEN
    assert len({Secret(TOKEN), Secret(TOKEN), Secret(OTHER)}) == 2


def test_redactor_replaces_every_known_token_in_a_text() -> None:
    redactor = Redactor([Secret(TOKEN)])
    redactor.add(Secret(OTHER))

    text = redactor.redact(f"Bearer {TOKEN} then {OTHER}, again {TOKEN}.")

    assert text == "Bearer KbSV…Ab then See1…yz, again KbSV…Ab."


def test_redactor_leaves_other_text_alone() -> None:
    assert Redactor([Secret(TOKEN)]).redact("nothing to hide") == "nothing to hide"
    assert Redactor().redact(TOKEN) == TOKEN


def test_credentials_in_a_url_are_masked_wherever_they_appear() -> None:
    redactor = Redactor()

    text = redactor.redact("cannot reach https://bob:s3cret@kheops.example.org/api (refused)")

    assert text == "cannot reach https://…@kheops.example.org/api (refused)"


def test_a_url_without_credentials_is_left_as_it_is() -> None:
    assert Redactor().redact("https://kheops.example.org/a@b") == "https://kheops.example.org/a@b"


def test_a_known_token_is_known_and_another_text_is_not() -> None:
    redactor = Redactor([Secret("y8KlAbcdefghijklmnopbg")])

    assert redactor.knows("y8KlAbcdefghijklmnopbg") and not redactor.knows("other")


def test_an_excerpt_of_a_long_text_is_short_and_says_how_long_it_was() -> None:
    assert excerpt("x" * 10_000) == f"{'x' * 40!r}… (10000 characters)"
    assert excerpt("short") == "'short'"
