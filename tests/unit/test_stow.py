"""STOW-RS on the wire: the multipart body, the answer's parsing and the per-instance verdicts."""

from __future__ import annotations

import json
from email.parser import BytesParser
from email.policy import HTTP

import pytest

from orthanc_kheops.kheops.stow import (
    UNKNOWN_REASON_ATTEMPTS,
    Category,
    MalformedAnswer,
    StowAnswer,
    Verdict,
    classify,
    describe_reason,
    encode_multipart,
    judge,
    parse_answer,
)

# The answer body of the contract (kheops-api.md, "Answers"), byte for byte in meaning.
CONTRACT_ANSWER = json.dumps(
    {
        "00081190": {"vr": "UR", "Value": ["https://kheops.example.org/api/studies/1.2.3"]},
        "00081199": {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                    "00081155": {"vr": "UI", "Value": ["1.2.3.4.5.6"]},
                }
            ],
        },
        "00081198": {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                    "00081155": {"vr": "UI", "Value": ["1.2.3.9.9.9"]},
                    "00081197": {"vr": "US", "Value": [292]},
                }
            ],
        },
        "0008119A": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [272]}}]},
    }
).encode()


def _answer(
    status: int,
    *,
    stored: tuple[str, ...] = (),
    failed: dict[str, int | None] | None = None,
    other: tuple[int, ...] = (),
) -> StowAnswer:
    return StowAnswer(
        status=status, stored=frozenset(stored), failed=failed or {}, other_failures=other
    )


# --- encode_multipart ----------------------------------------------------------------------------


def test_multipart_body_is_encoded_byte_by_byte_with_one_dicom_header_per_part() -> None:
    body = encode_multipart([b"first", b"\x00\x01\r\n--x"], boundary="b0und4ry")

    assert b"".join(body) == (
        b"--b0und4ry\r\n"
        b"Content-Type: application/dicom\r\n"
        b"\r\n"
        b"first\r\n"
        b"--b0und4ry\r\n"
        b"Content-Type: application/dicom\r\n"
        b"\r\n"
        b"\x00\x01\r\n--x\r\n"
        b"--b0und4ry--\r\n"
    )


def test_multipart_body_knows_its_length_without_being_joined() -> None:
    body = encode_multipart([b"first", b"second part", b"3"])

    assert len(body) == len(b"".join(body))
    assert b"second part" in body.chunks


def test_multipart_content_type_names_the_dicom_type_and_the_boundary() -> None:
    body = encode_multipart([b"x"], boundary="b0und4ry")

    assert body.content_type == 'multipart/related; type="application/dicom"; boundary=b0und4ry'


def test_multipart_body_is_read_back_by_a_mime_parser_into_the_same_parts() -> None:
    parts = [b"DICM one", b"DICM two", b"DICM three"]
    body = encode_multipart(parts)

    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {body.content_type}\r\n\r\n".encode() + b"".join(body)
    )

    assert message.get_content_type() == "multipart/related"
    assert message.get_param("type") == "application/dicom"
    read = list(message.iter_parts())
    assert [p.get_content_type() for p in read] == ["application/dicom"] * 3
    assert [p.get_payload(decode=True) for p in read] == parts


def test_each_body_gets_its_own_random_boundary() -> None:
    first = encode_multipart([b"x"])
    second = encode_multipart([b"x"])

    assert first.content_type != second.content_type
    boundary = first.content_type.rsplit("boundary=", 1)[1]
    assert b"".join(first).startswith(f"--{boundary}\r\n".encode())
    assert b"".join(first).endswith(f"\r\n--{boundary}--\r\n".encode())


def test_a_request_without_instances_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one instance"):
        encode_multipart([])


# --- parse_answer --------------------------------------------------------------------------------


def test_contract_example_answer_names_stored_failed_and_other_failures() -> None:
    answer = parse_answer(202, CONTRACT_ANSWER)

    assert answer == StowAnswer(
        status=202,
        stored=frozenset({"1.2.3.4.5.6"}),
        failed={"1.2.3.9.9.9": 292},
        other_failures=(272,),
    )


@pytest.mark.parametrize("body", [b"", b"  \r\n"], ids=["empty", "blank"])
def test_an_answer_without_a_body_is_not_a_stow_answer(body: bytes) -> None:
    with pytest.raises(MalformedAnswer, match="an empty body"):
        parse_answer(200, body)


def test_an_empty_dicom_json_object_is_an_answer_that_names_no_instance() -> None:
    assert parse_answer(409, b"{}") == _answer(409)


@pytest.mark.parametrize(
    "body",
    [
        b'{"status": "ok"}',
        b'{"message": "Service Unavailable", "detail": "maintenance"}',
        b'{"00081199": "stored"}',
        b'{"00081199": {"Value": []}}',
    ],
    ids=["status-ok", "error-json", "element-not-object", "element-without-vr"],
)
def test_json_of_another_shape_is_not_a_stow_answer(body: bytes) -> None:
    with pytest.raises(MalformedAnswer, match="not DICOM JSON"):
        parse_answer(200, body)


def test_lower_case_tag_keys_are_read_too() -> None:
    body = json.dumps(
        {"0008119a": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": ["272"]}}]}}
    ).encode()

    assert parse_answer(409, body).other_failures == (272,)


def test_a_failed_entry_without_a_readable_reason_has_no_reason() -> None:
    body = json.dumps(
        {"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2"]}}]}}
    ).encode()

    assert parse_answer(409, body).failed == {"1.2": None}


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"<html>502 Bad Gateway</html>", b"\xff\xfe\x00"],
    ids=["truncated", "html", "binary"],
)
def test_malformed_answer_is_reported(body: bytes) -> None:
    with pytest.raises(MalformedAnswer, match="a body that is not JSON"):
        parse_answer(202, body)


@pytest.mark.parametrize("body", [b"[]", b"42", b'"stored"'], ids=["list", "number", "string"])
def test_answer_that_is_json_but_not_an_object_is_reported(body: bytes) -> None:
    with pytest.raises(MalformedAnswer, match="JSON that is not an object"):
        parse_answer(202, body)


def test_malformed_sequences_are_ignored_rather_than_crashing() -> None:
    body = json.dumps(
        {
            "00081199": {"vr": "SQ", "Value": "not a list"},
            "00081198": {"vr": "SQ", "Value": ["not", "an", "item"]},
            "0008119A": {"vr": "SQ", "Value": [42, {"00081197": {"vr": "US", "Value": [272]}}]},
        }
    ).encode()

    assert parse_answer(409, body) == _answer(409, other=(272,))


# --- judge ---------------------------------------------------------------------------------------


def test_instances_listed_as_stored_are_sent() -> None:
    verdicts = judge(["1", "2"], _answer(200, stored=("1", "2")))

    assert {uid: j.verdict for uid, j in verdicts.items()} == {"1": Verdict.SENT, "2": Verdict.SENT}


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        (292, "not authorized (292, 0x0124): the series belongs to another album"),
        (262, "attributes differ (262, 0x0106)"),
        (272, "processing failure (272, 0x0110)"),
        (0x0122, "SOP class not supported (290, 0x0122)"),
        (0xA900, "data set does not match SOP class (43264, 0xA900)"),
        (0xA9FF, "data set does not match SOP class (43519, 0xA9FF)"),
        (0xC000, "cannot understand (49152, 0xC000)"),
        (0xC122, "transfer syntax not supported (49442, 0xC122)"),
        (0xC5FF, "cannot understand (50687, 0xC5FF)"),
    ],
)
def test_instance_refused_for_a_reason_retrying_cannot_fix_is_failed_with_code_and_words(
    reason: int, words: str
) -> None:
    verdicts = judge(["1", "2"], _answer(202, stored=("1",), failed={"2": reason}))

    assert verdicts["1"].verdict is Verdict.SENT
    assert verdicts["2"].verdict is Verdict.FAILED
    assert words in verdicts["2"].reason
    assert verdicts["2"].code == reason


@pytest.mark.parametrize("reason", [0xA700, 0xA701, 0xA7FF])
def test_instance_refused_for_lack_of_resources_is_retried_without_a_bound(reason: int) -> None:
    verdicts = judge(["1"], _answer(409, failed={"1": reason}))

    assert verdicts["1"].verdict is Verdict.RETRY
    assert not verdicts["1"].bounded
    assert verdicts["1"].reason.startswith(f"out of resources ({reason}, 0x{reason:04X})")


@pytest.mark.parametrize("reason", [0x0111, 12345, 0xB000, None])
def test_instance_refused_for_a_reason_not_known_here_is_retried_a_bounded_number_of_times(
    reason: int | None,
) -> None:
    verdicts = judge(["1"], _answer(409, failed={"1": reason}))

    assert verdicts["1"].verdict is Verdict.RETRY
    assert verdicts["1"].bounded
    assert verdicts["1"].reason == describe_reason(reason)
    assert UNKNOWN_REASON_ATTEMPTS > 1


def test_a_reason_not_known_here_is_named_in_decimal_and_hex() -> None:
    assert classify(12345) == (
        Category.UNKNOWN,
        "failure reason 12345 (0x3039), which this plugin does not know",
    )
    assert classify(None) == (Category.UNKNOWN, "refused by KHEOPS without a failure reason")


def test_every_known_range_is_read_by_its_bounds() -> None:
    assert classify(0xA6FF)[0] is Category.UNKNOWN
    assert classify(0xA800)[0] is Category.UNKNOWN
    assert classify(0xBFFF)[0] is Category.UNKNOWN
    assert classify(0xD000)[0] is Category.UNKNOWN


@pytest.mark.parametrize("status", [200, 202, 409])
def test_an_instance_an_answer_does_not_name_is_not_sent_whatever_the_status(status: int) -> None:
    verdicts = judge(["1", "2"], _answer(status, stored=("1",)))

    assert verdicts["1"].verdict is Verdict.SENT
    assert verdicts["2"].verdict is Verdict.RETRY
    assert verdicts["2"].reason == (
        f"KHEOPS answered {status} without naming this instance among those it stored"
    )


def test_unlisted_instances_take_the_other_failures_reason_when_the_counts_agree() -> None:
    verdicts = judge(["1", "2", "3"], _answer(202, stored=("1",), other=(272, 272)))

    assert verdicts["1"].verdict is Verdict.SENT
    for uid in ("2", "3"):
        assert verdicts[uid].verdict is Verdict.FAILED
        assert "processing failure (272, 0x0110)" in verdicts[uid].reason


def test_contract_example_answer_fails_the_refused_and_the_unreadable_instance() -> None:
    uids = ["1.2.3.4.5.6", "1.2.3.9.9.9", "1.2.3.7"]

    verdicts = judge(uids, parse_answer(202, CONTRACT_ANSWER))

    assert [verdicts[uid].verdict for uid in uids] == [Verdict.SENT, Verdict.FAILED, Verdict.FAILED]
    assert "292" in verdicts["1.2.3.9.9.9"].reason
    assert "272" in verdicts["1.2.3.7"].reason


@pytest.mark.parametrize(
    "answer",
    [
        _answer(409),
        _answer(202, stored=("1",)),
        _answer(202, stored=("1",), other=(272,)),
        _answer(202, stored=("1",), other=(272, 272, 272)),
        _answer(202, stored=("1",), other=(272, 0xA700)),
    ],
    ids=[
        "nothing-listed",
        "no-other-failures",
        "fewer-other-failures",
        "more-other-failures",
        "mixed-reasons",
    ],
)
def test_unlisted_instances_are_retried_when_the_answer_cannot_account_for_them(
    answer: StowAnswer,
) -> None:
    verdicts = judge(["1", "2", "3"], answer)

    unlisted = [uid for uid in ("1", "2", "3") if uid not in answer.stored]
    for uid in unlisted:
        assert verdicts[uid].verdict is Verdict.RETRY
        assert verdicts[uid].reason == (
            f"KHEOPS answered {answer.status} without naming this instance among those it stored"
        )


def test_every_instance_of_the_request_gets_exactly_one_verdict() -> None:
    answer = _answer(202, stored=("1", "elsewhere"), failed={"2": 292, "unrelated": 262})

    assert set(judge(["1", "2", "3"], answer)) == {"1", "2", "3"}
