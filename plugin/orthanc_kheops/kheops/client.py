"""The KHEOPS API, as the plugin uses it: introspection, STOW-RS and sharing.

`KheopsApi` is the contract; `KheopsClient` implements it over one pooled
`requests.Session`. Every failure leaves this module as a `KheopsError`
subclass that says whether retrying can help, with the token masked.

No request follows a redirect: KHEOPS never redirects its API, and following one
turns a POST into a GET and may carry tokens and patient data to another host. Only
what KHEOPS itself answers counts (kheops-api.md, "What is in front of KHEOPS is
not KHEOPS").
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Protocol
from urllib.parse import quote, urljoin, urlsplit

import requests

from ..observability.masking import Secret, mask_url
from .stow import MalformedAnswer, StowAnswer, encode_multipart, parse_answer
from .transport import Body, BuffersAdapter

_RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_DICOM_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_UID_LENGTH = 64


def uid_problem(uid: str) -> str | None:
    """Why a text cannot be a DICOM UID in a KHEOPS path (its routes take digits and dots only)."""
    if _DICOM_UID.fullmatch(uid) is None:
        return "is not a DICOM UID (digits in components joined by single dots)"
    if len(uid) > _UID_LENGTH:
        return f"is {len(uid)} characters long, more than the {_UID_LENGTH} of a DICOM UID"
    return None


def series_uid_problem(study_uid: str, series_uid: str) -> str | None:
    """Why KHEOPS cannot share a series with these UIDs, in words; None when it can."""
    for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)):
        problem = uid_problem(uid)
        if problem:
            shown = uid if len(uid) <= _UID_LENGTH else f"{uid[:_UID_LENGTH]}…"
            return f"{name} {shown!r} {problem}: KHEOPS cannot share it"
    return None


class KheopsError(Exception):
    """Base of every error raised by the KHEOPS client."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class KheopsUnavailable(KheopsError):
    """KHEOPS could not be reached or answered 5xx: retry later, nothing was lost.

    `retry_after` is the delay a 429 or 503 asked for in its Retry-After header, in seconds.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class KheopsBadAnswer(KheopsUnavailable):
    """Something answered that is not what KHEOPS answers (an html page, JSON of another shape).

    Retried like an outage: what answers may be a proxy whose KHEOPS is not up yet, but
    the message says what came back, since it is most often a wrong Kheops.Url.
    """


class KheopsRedirected(KheopsError):
    """A 3xx: whatever is at Kheops.Url is not KHEOPS's API. Nothing was sent to the target.

    `location` is the redirect target with any credentials masked; the message says what
    to set Kheops.Url to. Only an administrator can fix it.
    """

    def __init__(self, message: str, *, status: int, location: str) -> None:
        super().__init__(message, status=status)
        self.location = location


class KheopsRejected(KheopsError):
    """KHEOPS refused the request for a reason that retrying the same request cannot fix."""


class KheopsUnauthorized(KheopsRejected):
    """401 or 403: the token is wrong, expired or lacks a permission."""


class KheopsNotFound(KheopsRejected):
    """404: for a share, the series is not (yet) in the source album, or the source lacks send."""


@dataclass(frozen=True)
class Introspection:
    active: bool
    scopes: frozenset[str]
    album_id: str | None

    @property
    def is_album_token(self) -> bool:
        return self.active and self.album_id is not None

    def can(self, *permissions: str) -> bool:
        return self.active and all(p in self.scopes for p in permissions)

    def describe(self) -> str:
        if not self.active:
            return "inactive (expired, revoked or unknown)"
        kind = f"album {self.album_id}" if self.album_id else "user token (no album)"
        scopes = " ".join(sorted(self.scopes)) or "no permission"
        return f"{kind}, {scopes}"


class KheopsApi(Protocol):
    def introspect(self, token: Secret) -> Introspection: ...

    def stow(self, token: Secret, parts: Sequence[bytes]) -> StowAnswer: ...

    def share_series(
        self, *, destination: Secret, source: Secret, study_uid: str, series_uid: str
    ) -> None: ...


def make_session(*, url: str, pool_size: int, verify: bool | str) -> requests.Session:
    """The one pooled session, sized so that no worker waits for a connection.

    The environment (HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE) is read once, for `url`, the
    only host the session talks to: requests would read it again for every request, and a
    ~/.netrc entry for the host would replace the token in the Authorization header.
    """
    session = requests.Session()
    adapter = BuffersAdapter(pool_connections=2, pool_maxsize=max(pool_size, 1), max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    settings = session.merge_environment_settings(url, {}, None, verify, None)
    session.proxies = settings["proxies"]
    session.verify = settings["verify"]
    session.trust_env = False
    session.headers["User-Agent"] = "orthanc-kheops"
    return session


class KheopsClient:
    """KheopsApi over HTTP/1.1 (requests never speaks HTTP/2, which KHEOPS's nginx cuts off)."""

    def __init__(
        self,
        url: str,
        *,
        session: requests.Session,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self.url = url.rstrip("/")
        self._api = f"{self.url}/api"
        self._session = session
        self._timeout = (connect_timeout, read_timeout)

    def introspect(self, token: Secret) -> Introspection:
        response = self._send(
            "POST", "/token/introspect", data={"token": token.reveal()}, what="token introspection"
        )
        if response.status_code != 200:
            raise _error_for(response, "token introspection", token)
        try:
            document = response.json()
        except ValueError as exc:
            raise KheopsBadAnswer(
                f"token introspection answered 200 {_content_type(response)} that is not JSON"
                f"{_ROOT_HINT}",
                status=200,
            ) from exc
        if not isinstance(document, dict) or not isinstance(document.get("active"), bool):
            raise KheopsBadAnswer(
                f'token introspection answered JSON without an "active" field{_ROOT_HINT}',
                status=200,
            )
        scope = document.get("scope")
        album = document.get("album_id")
        return Introspection(
            active=document.get("active") is True,
            scopes=frozenset(scope.split()) if isinstance(scope, str) else frozenset(),
            album_id=album if isinstance(album, str) and album else None,
        )

    def stow(self, token: Secret, parts: Sequence[bytes]) -> StowAnswer:
        body = encode_multipart(parts)
        response = self._send(
            "POST",
            "/studies",
            data=Body(body.chunks, body.length),  # with a length: never chunked
            headers={
                "Authorization": f"Bearer {token.reveal()}",
                "Content-Type": body.content_type,
                "Accept": "application/dicom+json",
            },
            what="STOW-RS",
        )
        if response.status_code not in (200, 202, 409):
            raise _error_for(response, "STOW-RS", token)
        try:
            return parse_answer(response.status_code, response.content)
        except MalformedAnswer as exc:
            raise KheopsBadAnswer(
                f"KHEOPS answered {response.status_code} {_content_type(response)} with {exc},"
                f" not a STOW-RS response{_ROOT_HINT}",
                status=response.status_code,
            ) from exc

    def share_series(
        self, *, destination: Secret, source: Secret, study_uid: str, series_uid: str
    ) -> None:
        problem = series_uid_problem(study_uid, series_uid)
        if problem:  # never a path KHEOPS could read as another resource
            raise KheopsRejected(problem)
        response = self._send(
            "PUT",
            f"/studies/{quote(study_uid, safe='')}/series/{quote(series_uid, safe='')}",
            headers={
                "Authorization": f"Bearer {destination.reveal()}",
                "X-Authorization-Source": f"Bearer {source.reveal()}",
            },
            what="share",
        )
        if response.status_code in (201, 204):
            return
        if response.status_code < 300:
            # A catch-all page answers 200 to anything: KHEOPS answers a share with 201.
            raise KheopsBadAnswer(
                f"share: KHEOPS answered {response.status_code} {_content_type(response)},"
                f" not 201 Created{_ROOT_HINT}",
                status=response.status_code,
            )
        raise _error_for(response, "share", destination, source)

    def _send(self, method: str, path: str, *, what: str, **kwargs: object) -> requests.Response:
        url = f"{self._api}{path}"
        try:
            response = self._session.request(
                method,
                url,
                timeout=self._timeout,
                allow_redirects=False,
                **kwargs,  # type: ignore[arg-type]
            )
        except requests.Timeout as exc:
            raise KheopsUnavailable(f"{what}: KHEOPS did not answer in time") from exc
        except requests.ConnectionError as exc:
            raise KheopsUnavailable(f"{what}: cannot reach KHEOPS ({_root_cause(exc)})") from exc
        except requests.RequestException as exc:
            raise KheopsUnavailable(f"{what}: request failed ({type(exc).__name__})") from exc
        if 300 <= response.status_code < 400:
            response.close()
            raise self._redirected(response, url, path, what)
        return response

    def _redirected(
        self, response: requests.Response, url: str, path: str, what: str
    ) -> KheopsRedirected:
        status = response.status_code
        header = response.headers.get("Location")
        if not header:
            return KheopsRedirected(
                f"{what}: KHEOPS answered {status} without a Location: KHEOPS never redirects its"
                f" API; set Kheops.Url to the address where KHEOPS itself answers",
                status=status,
                location="",
            )
        target = urljoin(url, header)
        shown = mask_url(target)
        suffix = f"/api{path}"
        split = urlsplit(target)
        if split.path.endswith(suffix) and not split.query:
            root = mask_url(target[: -len(suffix)])
            todo = f"set Kheops.Url to {root}"
        else:
            todo = (
                "it leads away from KHEOPS's API (a login page?); set Kheops.Url to the address"
                " where KHEOPS itself answers"
            )
        return KheopsRedirected(
            f"{what}: {mask_url(self.url)} redirects ({status}) to {shown}; KHEOPS never"
            f" redirects its API and the plugin does not follow: {todo}",
            status=status,
            location=shown,
        )


_ROOT_HINT = ": is Kheops.Url the KHEOPS root?"


def _content_type(response: requests.Response) -> str:
    value = response.headers.get("Content-Type", "").split(";")[0].strip()
    return value or "without a Content-Type"


def _retry_after(response: requests.Response) -> float | None:
    """Retry-After in seconds, from either form the header takes (delta or HTTP date)."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _root_cause(exc: BaseException) -> str:
    """A short, token-free description of a connection failure."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return type(exc).__name__


def _detail(response: requests.Response, secrets: Sequence[Secret]) -> str:
    text = response.text.strip()
    # A server or proxy may echo the credentials it refuses; mask them before cutting the text.
    for secret in secrets:
        text = text.replace(secret.reveal(), secret.masked)
    try:
        document = json.loads(text)
    except ValueError:
        return text[:200]
    if isinstance(document, dict):
        parts = [str(document[k]) for k in ("message", "detail") if document.get(k)]
        if parts:
            return ": ".join(parts)[:200]
    return text[:200]


def _error_for(response: requests.Response, what: str, *secrets: Secret) -> KheopsError:
    status = response.status_code
    detail = _detail(response, secrets)
    message = f"{what}: KHEOPS answered {status}" + (f" ({detail})" if detail else "")
    if status in _RETRYABLE_STATUSES or status >= 500:
        return KheopsUnavailable(message, status=status, retry_after=_retry_after(response))
    if status in (401, 403):
        return KheopsUnauthorized(message, status=status)
    if status == 404:
        return KheopsNotFound(message, status=status)
    return KheopsRejected(message, status=status)
