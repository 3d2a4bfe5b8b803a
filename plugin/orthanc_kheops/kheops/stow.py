"""STOW-RS on the wire: the multipart body we send and the answer KHEOPS gives.

Pure functions, so that the encoding and the per-instance verdicts can be
tested byte by byte without a server.
"""

from __future__ import annotations

import enum
import json
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

_FAILED_SOP_SEQUENCE = "00081198"
_OTHER_FAILURES_SEQUENCE = "0008119A"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"

UNKNOWN_REASON_ATTEMPTS = 5
"""Attempts at an instance refused for a reason this plugin does not know, before it is failed."""


class Category(enum.Enum):
    """What a FailureReason says about trying the same instance again (PS3.4 status classes)."""

    RETRY = "retry"  # may pass later: retried with backoff, for as long as it takes
    FAIL = "fail"  # retrying the same instance can never pass: failed at once
    UNKNOWN = "unknown"  # not known here: retried UNKNOWN_REASON_ATTEMPTS times, then failed


@dataclass(frozen=True)
class _Reason:
    low: int
    high: int
    category: Category
    words: str


# FailureReason (0008,1197) values and ranges, most specific first; read only by `classify`.
_REASONS: tuple[_Reason, ...] = (
    _Reason(
        0x0124,
        0x0124,
        Category.FAIL,
        "not authorized: the series belongs to another album, "
        "or the token's creator lost admin rights",
    ),
    _Reason(
        0x0106,
        0x0106,
        Category.FAIL,
        "attributes differ: the study or series attributes differ from what KHEOPS already holds",
    ),
    _Reason(
        0x0110, 0x0110, Category.FAIL, "processing failure: KHEOPS could not read the instance"
    ),
    _Reason(0x0122, 0x0122, Category.FAIL, "SOP class not supported: KHEOPS does not take it"),
    _Reason(0x0111, 0x0111, Category.UNKNOWN, "duplicate SOP instance"),
    _Reason(0x0112, 0x0112, Category.UNKNOWN, "no such object instance"),
    _Reason(0x0119, 0x0119, Category.UNKNOWN, "SOP class and instance conflict"),
    _Reason(0xA700, 0xA7FF, Category.RETRY, "out of resources: KHEOPS could not take it now"),
    _Reason(0xA900, 0xA9FF, Category.FAIL, "data set does not match SOP class"),
    _Reason(0xC122, 0xC122, Category.FAIL, "transfer syntax not supported"),
    _Reason(0xC000, 0xCFFF, Category.FAIL, "cannot understand: KHEOPS cannot read the instance"),
)


def classify(code: int | None) -> tuple[Category, str]:
    """The category of a FailureReason and the reason in words, with its code in decimal and hex.

    None is an entry of the failed list without a FailureReason.
    """
    if code is None:
        return Category.UNKNOWN, "refused by KHEOPS without a failure reason"
    number = f"({code}, 0x{code:04X})"
    for reason in _REASONS:
        if reason.low <= code <= reason.high:
            title, _, why = reason.words.partition(": ")
            return reason.category, f"{title} {number}" + (f": {why}" if why else "")
    return (
        Category.UNKNOWN,
        f"failure reason {code} (0x{code:04X}), which this plugin does not know",
    )


def describe_reason(code: int | None) -> str:
    """FailureReason in words, for the failed list and the logs."""
    return classify(code)[1]


@dataclass(frozen=True)
class MultipartBody:
    """The body as the pieces it is made of, handed to the socket together (`transport.Body`).

    Never joined into one buffer: a batch of 50 CT images is 26 MB, and copying it into a
    fresh buffer cost 0.3 ms of CPU per instance.
    """

    content_type: str
    chunks: tuple[bytes, ...]
    length: int

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return self.length


def encode_multipart(parts: Sequence[bytes], *, boundary: str | None = None) -> MultipartBody:
    """multipart/related body with one application/dicom part per instance."""
    if not parts:
        raise ValueError("a STOW-RS request needs at least one instance")
    boundary = boundary or f"orthanc-kheops-{secrets.token_hex(16)}"
    delimiter = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
    chunks: list[bytes] = [delimiter]
    for index, part in enumerate(parts):
        chunks.append(part)
        chunks.append(b"\r\n" + (delimiter if index < len(parts) - 1 else b""))
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return MultipartBody(
        content_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
        chunks=tuple(chunks),
        length=sum(map(len, chunks)),
    )


@dataclass(frozen=True)
class StowAnswer:
    """What KHEOPS said about each instance of one request."""

    status: int
    stored: frozenset[str]
    failed: Mapping[str, int | None]
    other_failures: tuple[int | None, ...]


class MalformedAnswer(ValueError):
    """The answer body is not the DICOM JSON a STOW-RS server sends."""


_TAG = re.compile(r"[0-9A-Fa-f]{8}")


def parse_answer(status: int, body: bytes) -> StowAnswer:
    """Read the SOP Instance UIDs of 00081199, 00081198 and 0008119A.

    Only a DICOM JSON object (tags as keys, each an object with a "vr") is a STOW-RS
    answer: anything else, an empty body included, raises MalformedAnswer.
    """
    if not body.strip():
        raise MalformedAnswer("an empty body")
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise MalformedAnswer("a body that is not JSON") from exc
    if not isinstance(document, dict):
        raise MalformedAnswer(f"JSON that is not an object (a {type(document).__name__})")
    strangers = [k for k, v in document.items() if not _TAG.fullmatch(k) or not _is_element(v)]
    if strangers:
        shown = ", ".join(repr(k[:40]) for k in strangers[:3])
        raise MalformedAnswer(f"JSON that is not DICOM JSON (keys {shown})")
    stored = frozenset(
        uid for item in _items(document, _REFERENCED_SOP_SEQUENCE) if (uid := _uid(item))
    )
    failed: dict[str, int | None] = {}
    for item in _items(document, _FAILED_SOP_SEQUENCE):
        uid = _uid(item)
        if uid:
            failed[uid] = _reason(item)
    other = tuple(_reason(item) for item in _items(document, _OTHER_FAILURES_SEQUENCE))
    return StowAnswer(status=status, stored=stored, failed=failed, other_failures=other)


def _is_element(value: object) -> bool:
    return isinstance(value, dict) and isinstance(value.get("vr"), str)


def _items(document: Mapping[str, object], tag: str) -> list[Mapping[str, object]]:
    element = document.get(tag) or document.get(tag.lower())
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    if not isinstance(values, list):
        return []
    return [item for item in values if isinstance(item, dict)]


def _first_value(item: Mapping[str, object], tag: str) -> object:
    element = item.get(tag)
    if isinstance(element, dict):
        values = element.get("Value")
        if isinstance(values, list) and values:
            return values[0]
    return None


def _uid(item: Mapping[str, object]) -> str | None:
    value = _first_value(item, _REFERENCED_SOP_INSTANCE_UID)
    return value if isinstance(value, str) and value else None


def _reason(item: Mapping[str, object]) -> int | None:
    value = _first_value(item, _FAILURE_REASON)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


class Verdict(enum.Enum):
    SENT = "sent"
    FAILED = "failed"
    RETRY = "retry"


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str = ""
    bounded: bool = False  # a RETRY for a reason not known here: UNKNOWN_REASON_ATTEMPTS at most
    code: int | None = None  # the FailureReason, when KHEOPS gave one


def judge(sop_uids: Sequence[str], answer: StowAnswer) -> dict[str, Judgement]:
    """One verdict per instance of the request, keyed on its SOP Instance UID.

    Only what 00081199 names is sent, whatever the HTTP status. Listed as failed: judged by
    its FailureReason's category. Not listed at all: matched with the anonymous
    OtherFailures entries when they account for exactly the unlisted instances, retried
    when they do not.
    """
    verdicts: dict[str, Judgement] = {}
    unlisted: list[str] = []
    for uid in sop_uids:
        if uid in answer.stored:
            verdicts[uid] = Judgement(Verdict.SENT)
        elif uid in answer.failed:
            verdicts[uid] = _judge_reason(answer.failed[uid])
        else:
            unlisted.append(uid)
    if not unlisted:
        return verdicts
    if len(answer.other_failures) == len(unlisted) and len(set(answer.other_failures)) == 1:
        verdicts.update({uid: _judge_reason(answer.other_failures[0]) for uid in unlisted})
    else:
        reason = (
            f"KHEOPS answered {answer.status} without naming this instance among those it stored"
        )
        verdicts.update({uid: Judgement(Verdict.RETRY, reason) for uid in unlisted})
    return verdicts


def _judge_reason(code: int | None) -> Judgement:
    category, words = classify(code)
    if category is Category.FAIL:
        return Judgement(Verdict.FAILED, words, code=code)
    return Judgement(Verdict.RETRY, words, bounded=category is Category.UNKNOWN, code=code)
