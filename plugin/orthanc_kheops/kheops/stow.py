"""STOW-RS on the wire: the multipart body we send and the answer KHEOPS gives.

Pure functions, so that the encoding and the per-instance verdicts can be
tested byte by byte without a server.
"""

from __future__ import annotations

import enum
import json
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

_FAILED_SOP_SEQUENCE = "00081198"
_OTHER_FAILURES_SEQUENCE = "0008119A"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"

# FailureReason values that retrying the same instance can never fix.
PERMANENT_REASONS: frozenset[int] = frozenset({0x0124, 0x0106, 0x0110})

_REASON_WORDS: Mapping[int, str] = {
    0x0124: "not authorized (292): the series belongs to another album, "
    "or the token's creator lost admin rights",
    0x0106: "attributes differ (262): the study or series attributes differ "
    "from what KHEOPS already holds",
    0x0110: "processing failure (272): KHEOPS could not read the instance",
    0x0111: "duplicate SOP Instance (273)",
    0x0112: "no such object instance (274)",
    0x0119: "class-instance conflict (281)",
    0xA700: "out of resources (42752)",
    0xA900: "data set does not match SOP class (43264)",
    0xC000: "cannot understand (49152)",
    0xC122: "referenced transfer syntax not supported (49442)",
}


def describe_reason(code: int) -> str:
    """FailureReason in words, for the failed list and the logs."""
    return _REASON_WORDS.get(code, f"refused by KHEOPS with failure reason {code} (0x{code:04X})")


@dataclass(frozen=True)
class MultipartBody:
    """The body as the pieces it is made of, sent one after the other with a Content-Length.

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
    failed: Mapping[str, int]
    other_failures: tuple[int, ...]


class MalformedAnswer(ValueError):
    """The answer body is not the dicom+json KHEOPS sends."""


def parse_answer(status: int, body: bytes) -> StowAnswer:
    """Read the SOP Instance UIDs of 00081199, 00081198 and 0008119A."""
    if not body.strip():
        return StowAnswer(status=status, stored=frozenset(), failed={}, other_failures=())
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise MalformedAnswer(f"STOW-RS answer is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise MalformedAnswer("STOW-RS answer is not a JSON object")
    stored = frozenset(
        uid for item in _items(document, _REFERENCED_SOP_SEQUENCE) if (uid := _uid(item))
    )
    failed: dict[str, int] = {}
    for item in _items(document, _FAILED_SOP_SEQUENCE):
        uid = _uid(item)
        if uid:
            failed[uid] = _reason(item)
    other = tuple(_reason(item) for item in _items(document, _OTHER_FAILURES_SEQUENCE))
    return StowAnswer(status=status, stored=stored, failed=failed, other_failures=other)


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


def _reason(item: Mapping[str, object]) -> int:
    value = _first_value(item, _FAILURE_REASON)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return 0xC000


class Verdict(enum.Enum):
    SENT = "sent"
    FAILED = "failed"
    RETRY = "retry"


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str = ""


def judge(sop_uids: Sequence[str], answer: StowAnswer) -> dict[str, Judgement]:
    """One verdict per instance of the request, keyed on its SOP Instance UID.

    Listed as stored: sent. Listed as failed: failed for good when the reason
    is one retrying cannot fix, retried otherwise. Not listed at all: a 200
    means every part was stored; otherwise the instance is matched with the
    anonymous OtherFailures entries when they account for exactly the
    unlisted instances, and retried when they do not.
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
    if answer.status == 200:
        verdicts.update({uid: Judgement(Verdict.SENT) for uid in unlisted})
    elif len(answer.other_failures) == len(unlisted) and len(set(answer.other_failures)) == 1:
        verdicts.update({uid: _judge_reason(answer.other_failures[0]) for uid in unlisted})
    else:
        reason = f"KHEOPS answered {answer.status} without naming this instance"
        verdicts.update({uid: Judgement(Verdict.RETRY, reason) for uid in unlisted})
    return verdicts


def _judge_reason(code: int) -> Judgement:
    verdict = Verdict.FAILED if code in PERMANENT_REASONS else Verdict.RETRY
    return Judgement(verdict, describe_reason(code))
