"""One log line per change an administrator makes through REST (or Orthanc Explorer).

The shell calls `audit_line` after each /kheops/... request: rules created, changed or
deleted (warning: they change what is shared), failed instances queued again and backfills
(info). Lines name what changed, never a value that could be a token: a PUT shows the names
of the fields it carried, not their values.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping

from ..web.routing import Request, Response

_RULE = re.compile(r"rules/([^/]+)\Z")
_RULE_ACTION = re.compile(r"rules/([^/]+)/(apply|retry)\Z")
_SHOWN_VALUES = ("Enabled",)  # booleans: safe and worth reading in the log


def audit_line(request: Request, response: Response) -> tuple[int, str] | None:
    """The level and line to log for a request that changed something, or None."""
    if request.method == "GET" or not 200 <= response.status < 300:
        return None
    body = response.body if isinstance(response.body, Mapping) else {}
    path = request.path
    if request.method == "POST" and path == "rules":
        enabled = "enabled" if body.get("Enabled", True) else "disabled"
        return logging.WARNING, (
            f"rule {body.get('Name')!r} created through REST, {enabled}, sharing into album"
            f" {body.get('DestinationAlbumId')}"
        )
    match = _RULE.match(path)
    if match and request.method == "PUT":
        return logging.WARNING, f"rule {match.group(1)!r} changed through REST: {_fields(request)}"
    if match and request.method == "DELETE":
        dropped = body.get("DroppedPendingShares", 0)
        return (
            logging.WARNING,
            f"rule {match.group(1)!r} deleted through REST; {dropped} pending shares dropped",
        )
    action = _RULE_ACTION.match(path)
    if action and action.group(2) == "apply":
        return logging.INFO, (
            f"rule {action.group(1)!r} applied through REST: {body.get('Queued', 0)} series"
            " queued for sharing"
        )
    if action:
        return logging.INFO, (
            f"rule {action.group(1)!r}: {body.get('Retried', 0)} shares queued again through REST"
        )
    if path == "queue/retry" and body.get("Retried"):
        return logging.INFO, f"{body['Retried']} failed instances queued again through REST"
    if path == "send":
        return logging.INFO, f"{body.get('Queued', 0)} instances queued for KHEOPS through REST"
    return None


def _fields(request: Request) -> str:
    try:
        changes = json.loads(request.body or b"{}")
    except ValueError:
        return "?"
    if not isinstance(changes, dict) or not changes:
        return "nothing"
    return ", ".join(
        f"{key}={json.dumps(changes[key])}" if key in _SHOWN_VALUES else str(key)
        for key in sorted(changes)
    )
