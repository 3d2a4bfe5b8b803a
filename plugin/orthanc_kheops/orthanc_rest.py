"""Orthanc's own REST API over loopback, for worker threads and REST handlers.

Worker threads must not call the SDK's RestApi* functions (they can deadlock
while a store callback is registered), so they use HTTP with the token that
`GenerateRestApiAuthorizationToken()` gives, which works with Orthanc's
authentication enabled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import requests
from urllib3.exceptions import HTTPError as Urllib3Error

from .masking import Secret

LEVELS = ("patients", "studies", "series", "instances")


class OrthancError(Exception):
    """Orthanc's REST API did not give what was asked."""


class OrthancNotFound(OrthancError):
    """No resource with that id (deleted, or never there)."""


class OrthancUnavailable(OrthancError):
    """Orthanc did not answer (shutting down, overloaded): try again later."""


@dataclass(frozen=True)
class StoredInstance:
    orthanc_id: str
    size: int


@dataclass(frozen=True)
class Change:
    seq: int
    change_type: str
    resource_id: str


@dataclass(frozen=True)
class ChangePage:
    changes: tuple[Change, ...]
    last: int
    done: bool


class OrthancRest:
    def __init__(
        self, url: str, *, authorization: Secret, session: requests.Session, timeout: float = 60
    ) -> None:
        self._url = url.rstrip("/")
        self._authorization = authorization
        self._session = session
        # Orthanc is on loopback: no proxy or .netrc applies, and looking them up again for
        # every request costs about as much CPU as reading a 512 KB file.
        self._session.trust_env = False
        self._timeout = timeout

    def read_file(self, orthanc_id: str) -> bytes:
        path = f"/instances/{orthanc_id}/file"
        # One read of the whole body: requests' .content loops over 10 KB chunks in Python.
        response = self._get(path, stream=True)
        try:
            return bytes(response.raw.read(decode_content=True))
        except (Urllib3Error, OSError) as exc:
            raise OrthancUnavailable(f"Orthanc REST {path}: {type(exc).__name__}") from exc
        finally:
            response.close()

    def get_json(self, path: str) -> object:
        return self._get(path).json()

    def resource_level(self, orthanc_id: str) -> str:
        """The level of an Orthanc id: patients, studies, series or instances."""
        for level in LEVELS:
            try:
                self._get(f"/{level}/{orthanc_id}")
            except OrthancNotFound:
                continue
            return level
        raise OrthancNotFound(f"no patient, study, series or instance has the id {orthanc_id!r}")

    def instances_of(self, level: str, orthanc_id: str) -> list[StoredInstance]:
        """Every instance below a resource, with its size."""
        if level == "instances":
            documents: Sequence[object] = [self._get(f"/instances/{orthanc_id}").json()]
        else:
            documents = self._get(f"/{level}/{orthanc_id}/instances").json()
        return [
            StoredInstance(orthanc_id=str(doc["ID"]), size=int(doc.get("FileSize", 0)))
            for doc in documents
            if isinstance(doc, dict)
        ]

    def changes(self, since: int, *, limit: int = 1000) -> ChangePage:
        document = self._get("/changes", params={"since": since, "limit": limit}).json()
        return ChangePage(
            changes=tuple(
                Change(seq=c["Seq"], change_type=c["ChangeType"], resource_id=c["ID"])
                for c in document.get("Changes", [])
            ),
            last=int(document["Last"]),
            done=bool(document["Done"]),
        )

    def last_change(self) -> int:
        return int(self._get("/changes", params={"last": ""}).json()["Last"])

    def _get(
        self, path: str, params: dict[str, object] | None = None, *, stream: bool = False
    ) -> requests.Response:
        try:
            response = self._session.get(
                f"{self._url}{path}",
                params=params,  # type: ignore[arg-type]
                # Orthanc gzips answers for clients that accept it (HttpCompressionEnabled):
                # over loopback that only costs ~5 ms of CPU per 512 KB file on each side.
                headers={
                    "Authorization": self._authorization.reveal(),
                    "Accept-Encoding": "identity",
                },
                timeout=self._timeout,
                stream=stream,
            )
        except requests.RequestException as exc:
            raise OrthancUnavailable(f"Orthanc REST {path}: {type(exc).__name__}") from exc
        if response.status_code != 200:
            response.close()
        if response.status_code == 404:
            raise OrthancNotFound(f"Orthanc REST {path}: not found")
        if response.status_code != 200:
            raise OrthancUnavailable(f"Orthanc REST {path}: HTTP {response.status_code}")
        return response
