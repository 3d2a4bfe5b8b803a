"""What the shell needs from the Orthanc SDK, chosen by asking the SDK rather than a version string.

The plugin runs on python plugin 4.0 (Orthanc 1.10) up to 7.x (Orthanc 1.13). Where they
differ, the running SDK is asked once: whether a function exists, what a call's own argument
check accepts, or `CheckVersionAdvanced` for behaviour of the Orthanc core that no attribute
shows. This module never imports `orthanc`: the shell hands it the module, so that every
choice here is tested with fakes.

- `RestOutput.SendHttpStatus` takes (status, body as text, size) in python plugin 4.0 and
  (status, body) from 4.2 on; the other form is a TypeError before anything is sent.
- Orthanc 1.12.2 and later give an answer of `SendHttpStatus` with a body their own
  `Content-Type: text/plain` unless one was set by a call the SDK does not offer (the header
  of `SetHttpHeader` does not count), so a header of ours would make two. There, the body
  goes without ours, in pure ASCII (non-ASCII characters as \\u escapes), which reads the same
  whatever charset a client assumes.
- `SetMetricsIntegerValue` (python plugin 7) keeps counters exact; `SetMetricsValue` keeps a
  32-bit float.
- `SetRootUri2` (python plugin 5) replaces `SetRootUri`, which Orthanc deprecates.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The oldest versions the tests run on: Debian bookworm's Orthanc and python plugin.
MINIMUM_ORTHANC = (1, 10, 0)
MINIMUM_PYTHON = (3, 11)
# The queue changes a batch's rows in one statement: JSON functions built in, UPDATE ... FROM.
MINIMUM_SQLITE = (3, 38)
SUPPORTED = (
    "Orthanc 1.10.0 or later with its python plugin 4.0 or later, on Python 3.11 or later"
    " with SQLite 3.38 or later"
)

# Present from python plugin 4.0 on (its NEWS), with everything else the shell calls.
_REQUIRED_FUNCTIONS = (
    "CheckVersionAdvanced",
    "GenerateRestApiAuthorizationToken",
    "GetConfiguration",
    "GetConfigurationPath",
    "ExtendOrthancExplorer",
    "LogError",
    "LogInfo",
    "LogWarning",
    "RegisterOnChangeCallback",
    "RegisterOnStoredInstanceCallback",
    "RegisterReceivedInstanceCallback",
    "RegisterRestCallback",
    "SetMetricsValue",
)
_OWN_CONTENT_TYPE_SINCE = (1, 12, 2)
# From Orthanc 1.12 a read through the SDK (GetDicomForInstance) of a small file costs hundreds
# of microseconds, and more as the database grows, against 17-36 on 1.10 (bench/RESULTS.md).
_COSTLY_READS_SINCE = (1, 12, 0)
_PYTHON_PLUGIN_NAME = "python"  # what the python plugin's OrthancPluginGetName() answers


class UnsupportedPlatform(Exception):
    """The Orthanc, python plugin or Python this runs on is older than the plugin supports."""


@dataclass(frozen=True)
class Platform:
    """The versions the plugin runs on, as far as the SDK tells them at load time."""

    orthanc: str
    python: str


def check_platform(
    sdk: Any,
    *,
    python: tuple[int, ...] = tuple(sys.version_info[:3]),
    sqlite: tuple[int, ...] = sqlite3.sqlite_version_info,
) -> Platform:
    """The running versions; raises UnsupportedPlatform with a line naming what is needed."""
    python_version = ".".join(map(str, python))
    missing = [name for name in _REQUIRED_FUNCTIONS if not hasattr(sdk, name)]
    if "CheckVersionAdvanced" in missing:
        orthanc = "older than 1.10"
    else:
        orthanc = orthanc_version(sdk.CheckVersionAdvanced)
    problems = []
    if python[:2] < MINIMUM_PYTHON:
        problems.append(f"Python {python_version}")
    if orthanc != "mainline" and (
        "CheckVersionAdvanced" in missing or not sdk.CheckVersionAdvanced(*MINIMUM_ORTHANC)
    ):
        problems.append(f"Orthanc {orthanc}")
    if missing:
        problems.append(f"a python plugin without {', '.join(missing)}")
    if sqlite[:2] < MINIMUM_SQLITE:
        problems.append(f"SQLite {'.'.join(map(str, sqlite))} (Python's sqlite3)")
    if problems:
        raise UnsupportedPlatform(f"needs {SUPPORTED}; this is {' and '.join(problems)}")
    return Platform(orthanc=orthanc, python=python_version)


def orthanc_version(check: Callable[[int, int, int], int]) -> str:
    """The core's version, found with CheckVersionAdvanced, which tells "at least this"."""
    if check(99, 0, 0):
        return "mainline"  # a build that is not a release passes every check
    major = minor = revision = 0
    while major < 99 and check(major + 1, 0, 0):
        major += 1
    while minor < 999 and check(major, minor + 1, 0):
        minor += 1
    while revision < 999 and check(major, minor, revision + 1):
        revision += 1
    return f"{major}.{minor}.{revision}"


def ascii_json(body: bytes) -> bytes:
    """The same JSON document with every non-ASCII character written as a \\u escape."""
    text = body.decode("utf-8")
    if text.isascii():
        return body
    return "".join(c if c.isascii() else json.dumps(c)[1:-1] for c in text).encode("ascii")


class Sdk:
    """The calls whose form differs between the SDKs the plugin supports, chosen once."""

    def __init__(self, sdk: Any) -> None:
        self._sdk = sdk
        self.core_sets_content_type = bool(sdk.CheckVersionAdvanced(*_OWN_CONTENT_TYPE_SINCE))
        self.costly_reads = bool(sdk.CheckVersionAdvanced(*_COSTLY_READS_SINCE))
        self.integer_metrics = hasattr(sdk, "SetMetricsIntegerValue")
        self._send_status: Callable[[Any, int, bytes], None] | None = None

    def answer(self, output: Any, status: int, body: bytes, content_type: str) -> None:
        """Answer a REST call with `status` and `body`; 405 goes through SendMethodNotAllowed."""
        if status == 200:
            output.AnswerBuffer(body, content_type)
            return
        if self.core_sets_content_type:
            body = ascii_json(body) if content_type == "application/json" else body
        else:
            output.SetHttpHeader("Content-Type", content_type)
        self._send_http_status(output, status, body)

    def _send_http_status(self, output: Any, status: int, body: bytes) -> None:
        if self._send_status is not None:
            self._send_status(output, status, body)
            return
        try:
            output.SendHttpStatus(status, body)
        except TypeError:
            # Python plugin 4.0 and 4.1: its argument check failed, nothing was sent.
            _send_status_with_size(output, status, body)
            self._send_status = _send_status_with_size
        else:
            self._send_status = _send_status_two_arguments

    def set_metric(self, name: str, value: float) -> None:
        """Integers exactly where the SDK can (a byte counter outgrows a float's 24 bits)."""
        kind = self._sdk.MetricsType.DEFAULT
        if self.integer_metrics and isinstance(value, int):
            self._sdk.SetMetricsIntegerValue(name, value, kind)
        else:
            self._sdk.SetMetricsValue(name, float(value), kind)

    def set_root_uri(self, uri: str) -> None:
        """Where Orthanc's plugin list links to this plugin's web pages."""
        if hasattr(self._sdk, "SetRootUri2"):
            self._sdk.SetRootUri2(_PYTHON_PLUGIN_NAME, uri)
        else:
            self._sdk.SetRootUri(uri)


def _send_status_two_arguments(output: Any, status: int, body: bytes) -> None:
    output.SendHttpStatus(status, body)


def _send_status_with_size(output: Any, status: int, body: bytes) -> None:
    output.SendHttpStatus(status, body.decode("utf-8"), len(body))
