"""The log line of each change made through REST: what changed, never a token."""

from __future__ import annotations

import json
import logging

import pytest

from orthanc_kheops.observability.audit import audit_line
from orthanc_kheops.web.routing import Request, Response

TOKEN = "KbSVRVsa0rTCh6D5l9JnAb"


def line(method: str, path: str, status: int, answer: object, body: object = None) -> object:
    request = Request(method=method, path=path, body=json.dumps(body).encode() if body else b"")
    return audit_line(request, Response(status, answer))


@pytest.mark.parametrize(
    ("method", "path", "body", "answer", "expected"),
    [
        (
            "POST",
            "rules",
            {"Name": "ct", "DestinationToken": TOKEN},
            {"Name": "ct", "Enabled": True, "DestinationAlbumId": "hx7S6Q2nv0"},
            (
                logging.WARNING,
                "rule 'ct' created through REST, enabled, sharing into album hx7S6Q2nv0",
            ),
        ),
        (
            "PUT",
            "rules/ct",
            {"Enabled": False, "Condition": "x", "DestinationToken": TOKEN},
            {"Name": "ct"},
            (
                logging.WARNING,
                "rule 'ct' changed through REST: Condition, DestinationToken, Enabled=false",
            ),
        ),
        (
            "DELETE",
            "rules/ct",
            None,
            {"Deleted": "ct", "DroppedPendingShares": 3},
            (logging.WARNING, "rule 'ct' deleted through REST; 3 pending shares dropped"),
        ),
        (
            "POST",
            "rules/ct/apply",
            {"Resources": ["a"]},
            {"Rule": "ct", "Queued": 2},
            (logging.INFO, "rule 'ct' applied through REST: 2 series queued for sharing"),
        ),
        (
            "POST",
            "rules/ct/retry",
            None,
            {"Rule": "ct", "Retried": 4},
            (logging.INFO, "rule 'ct': 4 shares queued again through REST"),
        ),
        (
            "POST",
            "queue/retry",
            {},
            {"Retried": 5},
            (logging.INFO, "5 failed instances queued again through REST"),
        ),
        (
            "POST",
            "send",
            {"Resources": ["a"]},
            {"Queued": 12},
            (logging.INFO, "12 instances queued for KHEOPS through REST"),
        ),
    ],
)
def test_each_change_has_one_line_that_says_what_changed(
    method: str, path: str, body: object, answer: object, expected: tuple[int, str]
) -> None:
    result = line(method, path, 200, answer, body)

    assert result == expected
    assert TOKEN not in str(result)


@pytest.mark.parametrize(
    ("method", "path", "status", "answer"),
    [
        ("GET", "rules", 200, []),
        ("POST", "rules", 400, {"HttpStatus": 400, "Message": "Condition: ...", "Field": "x"}),
        ("POST", "rules/test", 200, {"Matched": 1}),
        ("POST", "queue/retry", 200, {"Retried": 0}),
        ("PUT", "rules/ct", 403, {"HttpStatus": 403, "Message": "read-only"}),
    ],
)
def test_reads_refusals_dry_runs_and_empty_retries_are_not_logged(
    method: str, path: str, status: int, answer: object
) -> None:
    assert line(method, path, status, answer) is None
