"""A KHEOPS test server: real HTTP that follows the KHEOPS API contract, failures included.

Integration tests, the demo sandbox and the benchmarks point the plugin at it instead of a real KHEOPS,
so it answers exactly what the contract says KHEOPS answers (STOW 200/202/409/400/401/403 with the
292/262/272 reasons, introspection shapes, sharing 201/401/403/404, QIDO 204) and can be scripted to
fail (5xx, dropped connections, latency, refused connections).

Model: albums hold series (membership is per series, so instances stored later in a shared series are
visible in every album it was shared to); a token is an album capability token (it names its album)
or, with ``album_id=None``, a user capability token whose uploads land in the user's inbox, i.e. in no
album. Only UIDs and the study/series attributes KHEOPS compares (the 262 check) are kept: pixel data
is never held in memory, so the server is a cheap benchmark sink.

Where the contract leaves room, the server chooses: a missing ``X-Authorization-Source`` is 401 but
an unknown, revoked or denied source token is 403; sharing a study the source album holds no series
of is 404 "Study Not Found"; QIDO filters are exact matches on the kept study attributes (keyword or
tag), other keys are ignored, ``limit``/``offset`` page after ``X-Total-Count``. User tokens are only
modeled as far as the plugin can meet them: their inbox is "the series in no album" (STOW and QIDO),
sharing into it answers 201 and changes nothing, and the ``albums/{id}`` variants answer them 501.

Python API: ``KheopsTestServer`` (start/stop or ``with``), ``url`` is the root a user types; the API
is under ``url + "/api"``.

Standalone: ``python -m tests.kheops_server --port 8099 --seed seed.json [--latency 0.05]`` prints
``KHEOPS test server listening on <url>`` once it accepts connections and runs until SIGINT/SIGTERM.
The seed file is ``{"albums": ["mainAlbum1"], "tokens": [{"token": "...", "album_id": "mainAlbum1",
"scope": ["read", "write", "send"]}]}`` (``album_id`` null or absent: a user token).

Control API for other processes (JSON bodies and answers; errors are ``{"message": ...}`` with 400,
404 or 409). Requests under ``/_test`` are not recorded in the request log:

    GET    /_test/health                          {"status": "ok"}
    POST   /_test/albums                          {"album_id"?}                 -> 201 {"album_id"}
    POST   /_test/tokens                          {"album_id": str|null, "scope"?: [...], "token"?}
                                                                                -> 201 {"token"}
    POST   /_test/tokens/{token}/revoke                                         -> 204
    POST   /_test/tokens/{token}/deny                                           -> 204
    PUT    /_test/tokens/{token}/scope            {"scope": [...]}              -> 204
    GET    /_test/albums/{album_id}/instances     {"instances": [sop uid, ...]} (sorted)
    GET    /_test/albums/{album_id}/series        {"series": [[study uid, series uid], ...]} (sorted)
    GET    /_test/instances/{sop_uid}/count       {"count": n}
    GET    /_test/counts                          {"instances": distinct stored, "stores": accepted}
    GET    /_test/requests[?full=1]               {"total", "parts", "by_status", "by_route"}
                                                  (+ "requests": [{method, path, query, status,
                                                  part_count}] with full=1)
    DELETE /_test/requests                                                      -> 204
    POST   /_test/faults/fail_next                {"count", "status"?, "method"?, "path_prefix"?} -> 204
    POST   /_test/faults/drop_next                {"count", "method"?, "path_prefix"?}  -> 204
    PUT    /_test/faults/latency                  {"seconds"}                   -> 204
    PUT    /_test/faults/down                     {"down": bool}                -> 204
    POST   /_test/faults/reset                                                  -> 204
    PUT    /_test/faults/redirect                 {"status": 3xx|null, "location", "keep_path"?} -> 204
    PUT    /_test/faults/html                     {"html": bool}                -> 204
    POST   /_test/faults/refuse_instances         {"sop_uids": [...], "reason": int|null} -> 204

``set_refusing`` has no control route: it refuses every connection, the control channel included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import re
import secrets
import signal
import socket
import string
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from email.message import Message
from http import HTTPStatus
from http.client import responses
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.multival import MultiValue

logger = logging.getLogger(__name__)

SCOPES = ("read", "write", "downloadbutton", "send")
"""Permissions of a capability token, in the order introspection lists them."""

NOT_AUTHORIZED = 292
ATTRIBUTES_DIFFER = 262
UNREADABLE = 272

STUDY_ATTRIBUTES = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)
SERIES_ATTRIBUTES = ("Modality", "SeriesDescription", "SeriesNumber", "BodyPartExamined")
_UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

_ALPHANUMERIC = string.ascii_letters + string.digits

# --- Route shapes ---------------------------------------------------------------------------------
# KHEOPS's path templates take UIDs of digits and dots only: a share path whose UID is anything
# else ("1.2#x", "1.2%2F..%2Fx") matches no route and is a plain 404 Not Found, whatever the tokens.
_SHARE_UID = r"([0-9.]+)"
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9._~+/=-]+")  # RFC 6750 b64token: fits in a Bearer header
_DICOM_JSON = "application/dicom+json"
_JSON = "application/json"


def _random_id(length: int) -> str:
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


# --------------------------------------------------------------------------------------------
# State: albums, tokens, series membership. Pure (no HTTP), guarded by one lock.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    """A capability token; frozen so handler threads can read one without holding the lock."""

    album_id: str | None  # None: a user token
    scope: frozenset[str]
    cap_token: str
    active: bool = True
    denied: bool = False  # "creator lost admin rights": introspects active, refused at use


@dataclass(frozen=True)
class _Instance:
    """What KHEOPS needs from one STOW part; the pixel data is never kept."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    study_attributes: dict[str, str]
    series_attributes: dict[str, str]


@dataclass
class _Series:
    attributes: dict[str, str]
    albums: set[str] = field(default_factory=set)
    instances: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _StudyView:
    """A study as one album (or the inbox) sees it, for QIDO."""

    uid: str
    attributes: dict[str, str]
    series: list[tuple[str, _Series]]


def _permissions(scope: Iterable[str]) -> frozenset[str]:
    scope = frozenset(scope)
    unknown = scope - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown permissions {sorted(unknown)}; known: {', '.join(SCOPES)}")
    return scope


class _Store:
    """Albums, tokens and stored series; every method is atomic."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._user_id = str(uuid.uuid4())  # the one user that created every token
        self._albums: set[str] = set()
        self._tokens: dict[str, _Token] = {}
        self._studies: dict[str, dict[str, str]] = {}
        self._series: dict[tuple[str, str], _Series] = {}
        self._store_counts: Counter[str] = Counter()

    # albums and tokens

    def add_album(self, album_id: str) -> None:
        with self._lock:
            self._albums.add(album_id)

    def add_token(self, token: str, album_id: str | None, scope: Iterable[str]) -> None:
        if not _TOKEN_SHAPE.fullmatch(token):
            raise ValueError(f"token {token!r} cannot travel in a Bearer header")
        entry = _Token(album_id=album_id, scope=_permissions(scope), cap_token=_random_id(10))
        with self._lock:
            if album_id is not None and album_id not in self._albums:
                raise KeyError(f"unknown album {album_id!r}")
            if token in self._tokens:
                raise ValueError(f"token {token!r} already exists")
            self._tokens[token] = entry

    def change_token(self, token: str, **changes: Any) -> None:
        with self._lock:
            if token not in self._tokens:
                raise KeyError(f"unknown token {token!r}")
            self._tokens[token] = replace(self._tokens[token], **changes)

    def token(self, value: str | None) -> _Token | None:
        """The active token with that value; unknown, revoked and missing tokens are all None."""
        entry = self._tokens.get(value) if value else None
        return entry if entry is not None and entry.active else None

    def introspect(self, value: str) -> dict[str, Any]:
        entry = self.token(value)
        if entry is None:
            return {"active": False}
        scope = [name for name in SCOPES if name in entry.scope]
        if scope and entry.album_id is None:
            scope.insert(0, "user")
        fields: list[tuple[str, Any]] = [
            ("active", True),
            ("sub", self._user_id),
            ("cap_token", entry.cap_token),
        ]
        if scope:
            fields.append(("scope", " ".join(scope)))
        if entry.album_id is not None:
            fields.append(("album_id", entry.album_id))
        random.shuffle(fields)  # the contract says field order varies: make clients parse
        return dict(fields)

    # instances

    def accept(self, album_id: str | None, instance: _Instance) -> int | None:
        """Stores an instance for an album (None: the inbox); the failure reason if refused."""
        key = (instance.study_uid, instance.series_uid)
        with self._lock:
            series = self._series.get(key)
            held_elsewhere = series is not None and series.albums and album_id not in series.albums
            if album_id is not None and held_elsewhere:
                return NOT_AUTHORIZED
            study = self._studies.get(instance.study_uid)
            if study is not None and study != instance.study_attributes:
                return ATTRIBUTES_DIFFER
            if series is not None and series.attributes != instance.series_attributes:
                return ATTRIBUTES_DIFFER
            if study is None:
                self._studies[instance.study_uid] = instance.study_attributes
            if series is None:
                series = self._series[key] = _Series(instance.series_attributes)
            if album_id is not None:
                series.albums.add(album_id)
            series.instances.add(instance.sop_instance_uid)
            self._store_counts[instance.sop_instance_uid] += 1
            return None

    def share(self, source: str, destination: str, study_uid: str, series_uid: str | None) -> bool:
        """Adds the destination album to the series the source album holds; False if none."""
        with self._lock:
            shared = [
                series
                for (study, uid), series in self._series.items()
                if study == study_uid
                and (series_uid is None or uid == series_uid)
                and source in series.albums
            ]
            for series in shared:
                series.albums.add(destination)
            return bool(shared)

    def studies(self, album_id: str | None) -> list[_StudyView]:
        """The studies with at least one series in the album (None: in no album, the inbox)."""
        with self._lock:
            grouped: dict[str, list[tuple[str, _Series]]] = {}
            for (study, uid), series in self._series.items():
                visible = album_id in series.albums if album_id is not None else not series.albums
                if visible:
                    grouped.setdefault(study, []).append((uid, _copy(series)))
            return [_StudyView(uid, self._studies[uid], grouped[uid]) for uid in sorted(grouped)]

    def album_series(self, album_id: str) -> set[tuple[str, str]]:
        with self._lock:
            self._check_album(album_id)
            return {key for key, series in self._series.items() if album_id in series.albums}

    def album_instances(self, album_id: str) -> set[str]:
        with self._lock:
            self._check_album(album_id)
            return {
                sop
                for series in self._series.values()
                if album_id in series.albums
                for sop in series.instances
            }

    def store_count(self, sop_uid: str) -> int:
        with self._lock:
            return self._store_counts[sop_uid]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "instances": len(self._store_counts),
                "stores": sum(self._store_counts.values()),
            }

    def _check_album(self, album_id: str) -> None:
        if album_id not in self._albums:
            raise KeyError(f"unknown album {album_id!r}")


def _copy(series: _Series) -> _Series:
    return _Series(dict(series.attributes), set(series.albums), set(series.instances))


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


@dataclass
class _FaultRule:
    remaining: int
    status: int | None  # None: drop the connection without answering
    method: str | None
    path_prefix: str

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and path.startswith(self.path_prefix)


class _Faults:
    """Scripted failures; rules are consumed in the order they were added."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[_FaultRule] = []
        self.latency = 0.0
        self.down = False
        self.refusing = False
        self.front = _Front()

    def add(self, rule: _FaultRule) -> None:
        if rule.remaining < 0:
            raise ValueError("count must be >= 0")
        with self._lock:
            self._rules.append(rule)

    def take(self, method: str, path: str) -> _FaultRule | None:
        with self._lock:
            for rule in self._rules:
                if rule.remaining > 0 and rule.matches(method, path):
                    rule.remaining -= 1
                    return rule
            return None

    def reset(self) -> None:
        with self._lock:
            self._rules.clear()
            self.latency = 0.0
            self.down = False
            self.refusing = False
            self.front = _Front()


# --------------------------------------------------------------------------------------------
# Faults of what stands in front of KHEOPS, and per-instance reasons
# --------------------------------------------------------------------------------------------


@dataclass
class _Front:
    """What a proxy or an SSO front answers instead of KHEOPS (kheops-api.md, last section).

    `redirect`: every /api request answers that 3xx, to `location` (followed by the request's
    path and query when `keep_path`, as an http -> https redirect does). `html`: every /api
    request answers 200 with an html page.
    """

    redirect: int | None = None
    location: str = ""
    keep_path: bool = True
    html: bool = False

    def answer(self, request: _Request) -> _Response | None:
        if self.redirect is not None:
            target = self.location
            if self.keep_path:
                target += request.path + (f"?{request.query}" if request.query else "")
            page = f"<html><body>Moved to {target}</body></html>".encode()
            return _Response(self.redirect, page, "text/html", {"Location": target})
        if self.html:
            return _Response(200, b"<html><body>Welcome</body></html>", "text/html")
        return None


class _InstanceReasons:
    """SOP Instance UIDs STOW-RS refuses with a scripted FailureReason (None: no reason given)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reasons: dict[str, int | None] = {}

    def set(self, sop_uids: Iterable[str], reason: int | None) -> None:
        with self._lock:
            self._reasons.update(dict.fromkeys(sop_uids, reason))

    def get(self, sop_uid: str) -> tuple[bool, int | None]:
        with self._lock:
            return sop_uid in self._reasons, self._reasons.get(sop_uid)

    def clear(self) -> None:
        with self._lock:
            self._reasons.clear()


# --------------------------------------------------------------------------------------------
# HTTP values and routing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server answered (or dropped: status None). Header names are lower-case."""

    method: str
    path: str
    query: str
    status: int | None
    headers: dict[str, str]
    part_count: int


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    query: str
    headers: Message
    body: bytes

    def param(self, name: str) -> str | None:
        values = parse_qs(self.query).get(name)
        return values[0] if values else None


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    part_count: int = 0


def _json(status: int, value: Any, **headers: str) -> _Response:
    return _Response(status, json.dumps(value).encode(), _JSON, headers)


def _error(status: int, message: str, detail: str) -> _Response:
    return _json(status, {"message": message, "detail": detail})


def _unauthorized(detail: str) -> _Response:
    response = _error(401, "Unauthorized", detail)
    return replace(response, headers={"WWW-Authenticate": "Bearer, Basic"})


def _forbidden(detail: str) -> _Response:
    return _error(403, "Authorization error", detail)


_NO_CONTENT = _Response(204)

_Route = Callable[..., _Response]


class _Router:
    """Method + path regex -> handler called with the request and the unquoted path groups."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], _Route]] = []

    def add(self, method: str, pattern: str, route: _Route) -> None:
        self._routes.append((method, re.compile(pattern), route))

    def dispatch(self, request: _Request) -> _Response:
        path_known = False
        for method, pattern, route in self._routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            if method == request.method:
                return route(request, *(unquote(group) for group in match.groups()))
            path_known = True
        if path_known:
            return _error(405, "Method Not Allowed", f"{request.method} {request.path}")
        return _error(404, "Not Found", request.path)


def _bearer(header: str | None) -> str | None:
    scheme, _, value = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


# --------------------------------------------------------------------------------------------
# STOW-RS bodies
# --------------------------------------------------------------------------------------------


def _boundary(content_type: str) -> bytes | None:
    message = Message()
    message["Content-Type"] = content_type
    boundary = message.get_param("boundary")
    if message.get_content_maintype() != "multipart" or not isinstance(boundary, str):
        return None
    return boundary.encode("latin-1") or None


def _split_multipart(body: bytes, boundary: bytes) -> list[tuple[bytes, bytes]] | None:
    """(header block, content) of each part; None when the body is not that multipart body.

    Uses bytes.find on the delimiter, so splitting a large body costs one pass and one copy per part.
    """
    delimiter = b"--" + boundary
    if body.startswith(delimiter):
        position = len(delimiter)
    else:
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            return None
        position = start + 2 + len(delimiter)
    next_delimiter = b"\r\n" + delimiter
    parts: list[tuple[bytes, bytes]] = []
    while True:
        if body.startswith(b"--", position):
            return parts
        line_end = body.find(b"\r\n", position)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            return None  # the delimiter must end its line (transport padding allowed)
        part_start = line_end + 2
        part_end = body.find(next_delimiter, part_start)
        if part_end < 0:
            return None  # no close delimiter
        if body.startswith(b"\r\n", part_start):
            parts.append((b"", body[part_start + 2 : part_end]))
        else:
            headers_end = body.find(b"\r\n\r\n", part_start, part_end)
            if headers_end < 0:
                return None
            parts.append((body[part_start:headers_end], body[headers_end + 4 : part_end]))
        position = part_end + len(next_delimiter)


def _is_dicom_part(headers: bytes) -> bool:
    for line in headers.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-type":
            return value.split(";")[0].strip().lower() == "application/dicom"
    return False


def _value(dataset: Any, keyword: str) -> str:
    value = dataset.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(item) for item in value)
    return str(value)


def _read_instance(content: bytes) -> _Instance | None:
    """The UIDs and compared attributes of a Part-10 file; None when pydicom cannot read it."""
    try:
        dataset = pydicom.dcmread(BytesIO(content), stop_before_pixels=True)
        uids = {keyword: _value(dataset, keyword) for keyword in _UID_KEYWORDS}
        if not uids["SOPClassUID"]:
            uids["SOPClassUID"] = _value(dataset.file_meta, "MediaStorageSOPClassUID")
    except Exception:  # pydicom raises many types on garbage (struct.error, EOFError, ...)
        logger.debug("unreadable STOW part", exc_info=True)
        return None
    if not all(uids.values()):
        return None
    return _Instance(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        study_attributes={keyword: _value(dataset, keyword) for keyword in STUDY_ATTRIBUTES},
        series_attributes={keyword: _value(dataset, keyword) for keyword in SERIES_ATTRIBUTES},
    )


def _element(keyword: str, value: str | int | list[str]) -> tuple[str, dict[str, Any]]:
    """A DICOM JSON attribute; empty values have no "Value", as in the PS3.18 JSON model."""
    vr = dictionary_VR(keyword)
    item: dict[str, Any] = {"vr": vr}
    values = value if isinstance(value, list) else [value]
    values = [v for v in values if v != ""]
    if values:
        if vr == "PN":
            item["Value"] = [{"Alphabetic": v} for v in values]
        elif vr in ("IS", "US", "UL"):
            item["Value"] = [int(v) for v in values]
        else:
            item["Value"] = values
    return f"{tag_for_keyword(keyword):08X}", item


def _sop_item(instance: _Instance, **extra: str | int) -> dict[str, Any]:
    return dict(
        [
            _element("ReferencedSOPClassUID", instance.sop_class_uid),
            _element("ReferencedSOPInstanceUID", instance.sop_instance_uid),
            *(_element(keyword, value) for keyword, value in extra.items()),
        ]
    )


# --------------------------------------------------------------------------------------------
# The KHEOPS API under /api
# --------------------------------------------------------------------------------------------


class _KheopsApi:
    """The routes of the contract, over a _Store. Answers follow kheops-api.md exactly."""

    def __init__(self, store: _Store, base_url: Callable[[], str]) -> None:
        self._store = store
        self._base_url = base_url
        self.reasons = _InstanceReasons()
        self.router = _Router()
        uid = r"([^/]+)"
        self.router.add("POST", r"/api/token/introspect", self._introspect)
        self.router.add("POST", r"/api/studies", self._stow)
        self.router.add("GET", r"/api/studies", self._search_studies)
        self.router.add("GET", rf"/api/studies/{uid}/series", self._search_series)
        self.router.add("PUT", rf"/api/studies/{_SHARE_UID}", self._share_study)
        self.router.add(
            "PUT", rf"/api/studies/{_SHARE_UID}/series/{_SHARE_UID}", self._share_series
        )
        self.router.add("PUT", rf"/api/studies/{uid}/albums/{uid}", self._share_to_album)
        self.router.add(
            "PUT", rf"/api/studies/{uid}/series/{uid}/albums/{uid}", self._share_to_album
        )

    def _introspect(self, request: _Request) -> _Response:
        scheme = (request.headers.get("Authorization") or "").strip().partition(" ")[0]
        if scheme.lower() == "basic":
            return _unauthorized("Basic credentials are client credentials, not accepted here")
        form = parse_qs(request.body.decode("latin-1"))
        return _json(200, self._store.introspect(form.get("token", [""])[0]))

    def _stow(self, request: _Request) -> _Response:
        token = self._store.token(_bearer(request.headers.get("Authorization")))
        if token is None:
            return _unauthorized("Bearer token missing, unknown, expired or revoked")
        if "write" not in token.scope:
            return _Response(403, b"Authorization is not valid for posting", "text/plain")
        boundary = _boundary(request.headers.get("Content-Type") or "")
        parts = _split_multipart(request.body, boundary) if boundary else None
        if not parts:
            return _error(400, "Bad Request", "the body is not multipart/related with a boundary")
        # An album token with ?album= is refused: the album comes from the token.
        refused = token.denied or (
            token.album_id is not None and request.param("album") is not None
        )
        stored: list[_Instance] = []
        failed: list[dict[str, Any]] = []
        unreadable = 0
        for headers, content in parts:
            instance = _read_instance(content) if _is_dicom_part(headers) else None
            if instance is None:
                unreadable += 1
                continue
            scripted, scripted_reason = self.reasons.get(instance.sop_instance_uid)
            if scripted:
                extra = {} if scripted_reason is None else {"FailureReason": scripted_reason}
                failed.append(_sop_item(instance, **extra))
                continue
            reason = NOT_AUTHORIZED if refused else self._store.accept(token.album_id, instance)
            if reason is None:
                stored.append(instance)
            else:
                failed.append(_sop_item(instance, FailureReason=reason))
        answer: dict[str, Any] = {}
        studies = {instance.study_uid for instance in stored}
        if len(studies) == 1:
            answer.update([_element("RetrieveURL", self._study_url(studies.pop()))])
        if stored:
            sequence = [
                _sop_item(instance, RetrieveURL=self._instance_url(instance)) for instance in stored
            ]
            answer["00081199"] = {"vr": "SQ", "Value": sequence}
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": failed}
        if unreadable:
            other = [dict([_element("FailureReason", UNREADABLE)])] * unreadable
            answer["0008119A"] = {"vr": "SQ", "Value": other}
        status = 200 if len(stored) == len(parts) else 202 if stored else 409
        return _Response(status, json.dumps(answer).encode(), _DICOM_JSON, part_count=len(parts))

    def _study_url(self, study_uid: str) -> str:
        return f"{self._base_url()}/api/studies/{study_uid}"

    def _instance_url(self, instance: _Instance) -> str:
        study = self._study_url(instance.study_uid)
        return f"{study}/series/{instance.series_uid}/instances/{instance.sop_instance_uid}"

    def _share_series(self, request: _Request, study_uid: str, series_uid: str) -> _Response:
        return self._share(request, study_uid, series_uid)

    def _share_study(self, request: _Request, study_uid: str) -> _Response:
        return self._share(request, study_uid, None)

    def _share(self, request: _Request, study_uid: str, series_uid: str | None) -> _Response:
        destination = self._store.token(_bearer(request.headers.get("Authorization")))
        if destination is None:
            return _unauthorized("destination Bearer token missing, unknown or revoked")
        source_value = _bearer(request.headers.get("X-Authorization-Source"))
        if source_value is None:
            return _unauthorized("X-Authorization-Source: Bearer <token> missing")
        if destination.denied or "write" not in destination.scope:
            return _forbidden("No write access with this credential")
        source = self._store.token(source_value)
        if source is None or source.denied:
            return _forbidden("The source credential is not valid")
        what = "Series" if series_uid is not None else "Study"
        not_found = _error(404, f"{what} Not Found", f"{what} not found in the source album")
        if source.album_id is None or not {"read", "send"} <= source.scope:
            return not_found  # KHEOPS hides what a token may not send
        if destination.album_id is None:
            return _Response(201)  # into the user's inbox, which holds nothing album-wise
        if not self._store.share(source.album_id, destination.album_id, study_uid, series_uid):
            return not_found
        return _Response(201)

    def _share_to_album(self, request: _Request, *_uids: str) -> _Response:
        token = self._store.token(_bearer(request.headers.get("Authorization")))
        if token is None:
            return _unauthorized("Bearer token missing, unknown or revoked")
        if token.album_id is not None:
            return _forbidden("Album capability tokens cannot use the albums/{id} endpoints")
        return _error(501, "Not Implemented", "user-token album sharing is not modeled")

    def _reader(self, request: _Request) -> _Token | _Response:
        token = self._store.token(_bearer(request.headers.get("Authorization")))
        if token is None:
            return _unauthorized("Bearer token missing, unknown or revoked")
        if token.denied or "read" not in token.scope:
            return _forbidden("No read access with this credential")
        return token

    def _search_studies(self, request: _Request) -> _Response:
        token = self._reader(request)
        if isinstance(token, _Response):
            return token
        filters = parse_qs(request.query)
        rows = []
        for study in self._store.studies(token.album_id):
            attributes = {"StudyInstanceUID": study.uid, **study.attributes}
            if all(
                attributes.get(_keyword(name)) == values[0]
                for name, values in filters.items()
                if _keyword(name) in attributes
            ):
                rows.append(_study_json(study, attributes))
        return _listing(rows, request)

    def _search_series(self, request: _Request, study_uid: str) -> _Response:
        token = self._reader(request)
        if isinstance(token, _Response):
            return token
        rows = [
            _series_json(study.uid, uid, series)
            for study in self._store.studies(token.album_id)
            if study.uid == study_uid
            for uid, series in sorted(study.series, key=lambda pair: pair[0])
        ]
        return _listing(rows, request)


def _keyword(name: str) -> str:
    """A QIDO query key as a keyword: "StudyInstanceUID" or its tag "0020000D"."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return keyword_for_tag(int(name, 16)) or name
    return name


def _study_json(study: _StudyView, attributes: dict[str, str]) -> dict[str, Any]:
    series = [item for _uid, item in study.series]
    modalities = sorted({item.attributes["Modality"] for item in series} - {""})
    return dict(
        [
            *(_element(keyword, value) for keyword, value in attributes.items()),
            _element("ModalitiesInStudy", modalities),
            _element("NumberOfStudyRelatedSeries", len(series)),
            _element("NumberOfStudyRelatedInstances", sum(len(s.instances) for s in series)),
        ]
    )


def _series_json(study_uid: str, series_uid: str, series: _Series) -> dict[str, Any]:
    return dict(
        [
            _element("StudyInstanceUID", study_uid),
            _element("SeriesInstanceUID", series_uid),
            *(_element(keyword, value) for keyword, value in series.attributes.items()),
            _element("NumberOfSeriesRelatedInstances", len(series.instances)),
        ]
    )


def _listing(rows: list[dict[str, Any]], request: _Request) -> _Response:
    """A QIDO answer: 204 when nothing matches (never 200 []), X-Total-Count before paging."""
    if not rows:
        return _NO_CONTENT
    try:
        offset = int(request.param("offset") or 0)
        limit = int(request.param("limit") or len(rows))
    except ValueError:
        return _error(400, "Bad Request", "limit and offset must be integers")
    page = rows[offset : offset + limit]
    body = json.dumps(page).encode()
    return _Response(200, body, _DICOM_JSON, {"X-Total-Count": str(len(rows))})


# --------------------------------------------------------------------------------------------
# The control API under /_test
# --------------------------------------------------------------------------------------------


class _BadControlRequest(ValueError):
    """A control request whose JSON body lacks a field or has the wrong type."""


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is default:
        return value
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _BadControlRequest(f"{name!r} has the wrong type")
    return value


class _ControlApi:
    """JSON routes mirroring the Python API, for scripts that run the server in another process."""

    _REQUIRED = object()

    def __init__(self, server: KheopsTestServer) -> None:
        self._server = server
        self.router = _Router()
        add = self.router.add
        add("GET", r"/_test/health", lambda _request: _json(200, {"status": "ok"}))
        add("POST", r"/_test/albums", self._add_album)
        add("POST", r"/_test/tokens", self._add_token)
        add("POST", r"/_test/tokens/([^/]+)/revoke", self._revoke)
        add("POST", r"/_test/tokens/([^/]+)/deny", self._deny)
        add("PUT", r"/_test/tokens/([^/]+)/scope", self._scope)
        add("GET", r"/_test/albums/([^/]+)/instances", self._album_instances)
        add("GET", r"/_test/albums/([^/]+)/series", self._album_series)
        add("GET", r"/_test/instances/([^/]+)/count", self._count)
        add("GET", r"/_test/counts", lambda _request: _json(200, server._store.counts()))
        add("GET", r"/_test/requests", self._requests)
        add("DELETE", r"/_test/requests", self._clear_requests)
        add("POST", r"/_test/faults/fail_next", self._fail_next)
        add("POST", r"/_test/faults/drop_next", self._drop_next)
        add("PUT", r"/_test/faults/latency", self._latency)
        add("PUT", r"/_test/faults/down", self._down)
        add("POST", r"/_test/faults/reset", self._reset)
        add("PUT", r"/_test/faults/redirect", self._redirect)
        add("PUT", r"/_test/faults/html", self._html)
        add("POST", r"/_test/faults/refuse_instances", self._refuse_instances)

    def dispatch(self, request: _Request) -> _Response:
        try:
            return self.router.dispatch(request)
        except (_BadControlRequest, json.JSONDecodeError) as exc:
            return _json(400, {"message": str(exc)})
        except KeyError as exc:
            return _json(404, {"message": str(exc.args[0])})
        except ValueError as exc:
            return _json(409 if "already exists" in str(exc) else 400, {"message": str(exc)})

    @staticmethod
    def _body(request: _Request) -> Mapping[str, Any]:
        body = json.loads(request.body or b"{}")
        if not isinstance(body, dict):
            raise _BadControlRequest("the body must be a JSON object")
        return body

    def _required(self, body: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
        value = _field(body, name, kind, self._REQUIRED)
        if value is self._REQUIRED:
            raise _BadControlRequest(f"{name!r} is required")
        return value

    def _add_album(self, request: _Request) -> _Response:
        album_id = _field(self._body(request), "album_id", str, None)
        return _json(201, {"album_id": self._server.add_album(album_id)})

    def _add_token(self, request: _Request) -> _Response:
        body = self._body(request)
        token = self._server.add_token(
            album_id=self._required(body, "album_id", (str, type(None))),
            scope=_field(body, "scope", list, ["read", "write", "send"]),
            token=_field(body, "token", str, None),
        )
        return _json(201, {"token": token})

    def _revoke(self, _request: _Request, token: str) -> _Response:
        self._server.revoke_token(token)
        return _NO_CONTENT

    def _deny(self, _request: _Request, token: str) -> _Response:
        self._server.deny_token(token)
        return _NO_CONTENT

    def _scope(self, request: _Request, token: str) -> _Response:
        self._server.set_scope(token, self._required(self._body(request), "scope", list))
        return _NO_CONTENT

    def _album_instances(self, _request: _Request, album_id: str) -> _Response:
        return _json(200, {"instances": sorted(self._server.album_instances(album_id))})

    def _album_series(self, _request: _Request, album_id: str) -> _Response:
        series = sorted(self._server.album_series(album_id))
        return _json(200, {"series": [list(pair) for pair in series]})

    def _count(self, _request: _Request, sop_uid: str) -> _Response:
        return _json(200, {"count": self._server.store_count(sop_uid)})

    def _requests(self, request: _Request) -> _Response:
        recorded = self._server.requests
        summary: dict[str, Any] = {
            "total": len(recorded),
            "parts": sum(entry.part_count for entry in recorded),
            "by_status": Counter(str(entry.status) for entry in recorded),
            "by_route": Counter(f"{entry.method} {entry.path}" for entry in recorded),
        }
        if request.param("full") not in (None, "", "0", "false"):
            summary["requests"] = [
                {
                    "method": entry.method,
                    "path": entry.path,
                    "query": entry.query,
                    "status": entry.status,
                    "part_count": entry.part_count,
                }
                for entry in recorded
            ]
        return _json(200, summary)

    def _clear_requests(self, _request: _Request) -> _Response:
        self._server.clear_requests()
        return _NO_CONTENT

    def _fail_next(self, request: _Request) -> _Response:
        body = self._body(request)
        self._server.fail_next(
            self._required(body, "count", int),
            status=_field(body, "status", int, 503),
            method=_field(body, "method", str, None),
            path_prefix=_field(body, "path_prefix", str, "/api"),
        )
        return _NO_CONTENT

    def _drop_next(self, request: _Request) -> _Response:
        body = self._body(request)
        self._server.drop_next(
            self._required(body, "count", int),
            method=_field(body, "method", str, None),
            path_prefix=_field(body, "path_prefix", str, "/api"),
        )
        return _NO_CONTENT

    def _latency(self, request: _Request) -> _Response:
        self._server.set_latency(self._required(self._body(request), "seconds", (int, float)))
        return _NO_CONTENT

    def _down(self, request: _Request) -> _Response:
        self._server.set_down(self._required(self._body(request), "down", bool))
        return _NO_CONTENT

    def _reset(self, _request: _Request) -> _Response:
        self._server.reset_faults()
        return _NO_CONTENT

    def _redirect(self, request: _Request) -> _Response:
        body = self._body(request)
        self._server.set_redirect(
            _field(body, "status", (int, type(None)), None),
            _field(body, "location", str, ""),
            keep_path=_field(body, "keep_path", bool, True),
        )
        return _NO_CONTENT

    def _html(self, request: _Request) -> _Response:
        self._server.set_html(self._required(self._body(request), "html", bool))
        return _NO_CONTENT

    def _refuse_instances(self, request: _Request) -> _Response:
        body = self._body(request)
        self._server.refuse_instances(
            self._required(body, "sop_uids", list),
            self._required(body, "reason", (int, type(None))),
        )
        return _NO_CONTENT


# --------------------------------------------------------------------------------------------
# Transport
# --------------------------------------------------------------------------------------------


def _reset_on_close(connection: socket.socket) -> None:
    """Makes closing the socket send a TCP RST: the client sees a connection reset."""
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _HttpServer(ThreadingHTTPServer):
    """Tracks open connections so stop() and set_refusing() can cut keep-alive ones too."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        faults: _Faults,
        respond: Callable[[_Request], _Response | None],
    ) -> None:
        self.faults = faults
        self.respond = respond
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def verify_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> bool:
        if self.faults.refusing and isinstance(request, socket.socket):
            _reset_on_close(request)
            return False
        return True

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        if isinstance(request, socket.socket):
            with self._connections_lock:
                self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        if isinstance(request, socket.socket):
            with self._connections_lock:
                self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        # Clients going away mid-request are part of the tests; say so quietly.
        logger.debug("connection from %s ended: %r", client_address, sys.exception())

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive: reads the whole request, lets the server decide, writes or drops."""

    protocol_version = "HTTP/1.1"
    server_version = "KheopsTestServer"
    disable_nagle_algorithm = True  # headers and body are two writes: avoid the 40 ms ACK wait
    timeout = 120  # KHEOPS's proxy read/send timeouts

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_GET

    def _serve(self) -> None:
        assert isinstance(self.server, _HttpServer)
        if self.server.faults.refusing:
            self._drop()
            return
        try:
            body = self._read_body()
        except ValueError:  # the body's framing is lost, so is the connection
            bad = _error(400, "Bad Request", "unreadable Content-Length or chunk size")
            self._write(replace(bad, headers={"Connection": "close"}))
            return
        url = urlsplit(self.path)
        response = self.server.respond(
            _Request(self.command, url.path, url.query, self.headers, body)
        )
        if response is None:
            self._drop()
        else:
            self._write(response)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        if len(body) < length:
            raise ConnectionResetError("the client closed the connection mid-body")
        return body

    def _read_chunked(self) -> bytes:
        chunks = []
        while size := int(self.rfile.readline(1024).split(b";")[0].strip(), 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)
        while self.rfile.readline(65536).strip():
            pass  # trailer fields
        return b"".join(chunks)

    def _drop(self) -> None:
        _reset_on_close(self.connection)
        self.close_connection = True

    def _write(self, response: _Response) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        if response.status != HTTPStatus.NO_CONTENT:
            if response.content_type:
                self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if response.status != HTTPStatus.NO_CONTENT:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)


# --------------------------------------------------------------------------------------------
# The facade
# --------------------------------------------------------------------------------------------


class KheopsTestServer:
    """A KHEOPS on a local port for tests, the demo and the benchmarks; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._address = (host, port)
        self._store = _Store()
        self._faults = _Faults()
        self._api = _KheopsApi(self._store, lambda: self.url)
        self._control = _ControlApi(self)
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._requests: list[RecordedRequest] = []
        self._requests_lock = threading.Lock()

    # lifecycle

    def start(self) -> None:
        if self._httpd is not None:
            raise RuntimeError("already started")
        self._httpd = _HttpServer(self._address, self._faults, self._respond)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # stop() waits for one poll: keep fixtures quick
            name="kheops-test-server",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stops accepting and cuts open keep-alive connections, like a KHEOPS going away."""
        if self._httpd is None or self._thread is None:
            return
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The root a user types in the plugin configuration; the API is under url + "/api"."""
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        host = self._address[0]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"  # bound to every interface: loopback is the one sure to answer
        return f"http://{host}:{self._httpd.server_port}"

    # albums and tokens

    def add_album(self, album_id: str | None = None) -> str:
        album_id = album_id or _random_id(10)
        self._store.add_album(album_id)
        return album_id

    def add_token(
        self,
        *,
        album_id: str | None,
        scope: Iterable[str] = ("read", "write", "send"),
        token: str | None = None,
    ) -> str:
        """An album capability token, or a user capability token when album_id is None."""
        token = token or _random_id(22)
        self._store.add_token(token, album_id, scope)
        return token

    def revoke_token(self, token: str) -> None:
        self._store.change_token(token, active=False)

    def set_scope(self, token: str, scope: Iterable[str]) -> None:
        self._store.change_token(token, scope=_permissions(scope))

    def deny_token(self, token: str) -> None:
        """Still introspects active, but every use is refused: its creator lost admin rights."""
        self._store.change_token(token, denied=True)

    def load_seed(self, seed: Mapping[str, Any]) -> None:
        """Albums and tokens from the --seed JSON shape (see the module docstring)."""
        for album_id in seed.get("albums", []):
            self.add_album(album_id)
        for entry in seed.get("tokens", []):
            self.add_token(
                album_id=entry.get("album_id"),
                scope=entry.get("scope", ("read", "write", "send")),
                token=entry["token"],
            )

    # inspection

    def album_instances(self, album_id: str) -> set[str]:
        return self._store.album_instances(album_id)

    def album_series(self, album_id: str) -> set[tuple[str, str]]:
        return self._store.album_series(album_id)

    def store_count(self, sop_uid: str) -> int:
        return self._store.store_count(sop_uid)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests answered so far (control requests under /_test excluded)."""
        with self._requests_lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._requests_lock:
            self._requests.clear()

    # faults

    def fail_next(
        self, count: int, *, status: int = 503, method: str | None = None, path_prefix: str = "/api"
    ) -> None:
        self._faults.add(_FaultRule(count, status, method, path_prefix))

    def drop_next(
        self, count: int, *, method: str | None = None, path_prefix: str = "/api"
    ) -> None:
        """Reads the next matching requests whole, then resets the connection without answering."""
        self._faults.add(_FaultRule(count, None, method, path_prefix))

    def set_latency(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._faults.latency = seconds

    def set_down(self, down: bool) -> None:
        """Every /api request answers 503: KHEOPS reachable but its PACS down."""
        self._faults.down = down

    def set_refusing(self, refusing: bool) -> None:
        """Closes every connection, open or new, without answering."""
        self._faults.refusing = refusing
        if refusing and self._httpd is not None:
            self._httpd.close_connections()

    def reset_faults(self) -> None:
        self._faults.reset()
        self._api.reasons.clear()

    def set_redirect(
        self, status: int | None, location: str = "", *, keep_path: bool = True
    ) -> None:
        """Every /api request answers `status` (3xx) to `location`; None stops redirecting."""
        if status is not None and not 300 <= status < 400:
            raise ValueError("a redirect status is 3xx")
        self._faults.front = _Front(redirect=status, location=location, keep_path=keep_path)

    def set_html(self, html: bool) -> None:
        """Every /api request answers 200 text/html, as a catch-all or login page does."""
        self._faults.front = _Front(html=html)

    def refuse_instances(self, sop_uids: Iterable[str], reason: int | None) -> None:
        """STOW-RS lists these instances in 00081198 with `reason` (None: without a reason)."""
        self._api.reasons.set(sop_uids, reason)

    # request handling

    def _respond(self, request: _Request) -> _Response | None:
        """The answer to one request, after faults; None drops the connection."""
        rule = self._faults.take(request.method, request.path)
        api = _under(request.path, "/api")
        control = _under(request.path, "/_test")
        if api and self._faults.latency:
            time.sleep(self._faults.latency)
        response: _Response | None
        if rule is not None:
            status = rule.status
            response = (
                None if status is None else _error(status, responses.get(status, "Fault"), "fault")
            )
        elif api and (front := self._faults.front.answer(request)) is not None:
            response = front
        elif api and self._faults.down:
            response = _error(503, "Service Unavailable", "the PACS behind KHEOPS is down")
        elif api:
            response = _guarded(self._api.router.dispatch, request)
        elif control:
            response = _guarded(self._control.dispatch, request)
        else:
            response = _error(404, "Not Found", request.path)
        if not control:
            self._record(request, response)
        return response

    def _record(self, request: _Request, response: _Response | None) -> None:
        entry = RecordedRequest(
            method=request.method,
            path=request.path,
            query=request.query,
            status=None if response is None else response.status,
            headers={name.lower(): value for name, value in request.headers.items()},
            part_count=0 if response is None else response.part_count,
        )
        with self._requests_lock:
            self._requests.append(entry)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _guarded(dispatch: Callable[[_Request], _Response], request: _Request) -> _Response:
    """The route's answer; a bug in a route becomes a logged 500, not a silent dropped connection."""
    try:
        return dispatch(request)
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return _error(500, "Internal Server Error", "the test server failed; see its log")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.kheops_server", description="Run the KHEOPS test server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099, help="0 picks a free port")
    parser.add_argument("--seed", type=Path, help="JSON file with albums and tokens to create")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to /api answers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    # Block the stop signals before the serving threads exist so they all reach sigwait below.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    server = KheopsTestServer(args.host, args.port)
    if args.seed is not None:
        server.load_seed(json.loads(args.seed.read_text()))
    server.set_latency(args.latency)
    server.start()
    print(f"KHEOPS test server listening on {server.url}", flush=True)
    signal.sigwait(stop_signals)
    server.stop()


if __name__ == "__main__":
    main()
