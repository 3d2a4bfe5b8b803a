"""Orthanc's own REST API over loopback, for worker threads and REST handlers, and the
instance files through an in-process reader when the shell gives one.

Over loopback, requests carry the token that `GenerateRestApiAuthorizationToken()` gives,
which works with Orthanc's authentication enabled. The files a worker sends are read
in-process instead (`reader`, the SDK's GetDicomForInstance, injected by the shell): reads
from Python threads are safe, only a store from a Python thread while Orthanc stores can
deadlock (bench/sdk_threads.py shows it), and a loopback GET of a 128 KiB file cost Orthanc's
HTTP server and urllib3 more than the read itself. Python plugins before 4.3 (or without
Python.AllowThreads) hold the GIL during the call, and every store callback waits for it:
`reader_max_bytes` then keeps large files on loopback. Large files are read from Orthanc's
storage folder first, where it holds them as stored (`folder`, storage_folder.py).

The loopback client uses urllib3's connection pool directly rather than requests: requests'
own work per request (sessions, hooks, header merging) cost 0.47 ms of CPU per 512 KB file
against 0.30 ms.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import urllib3

from .observability.masking import Secret, mask_url
from .storage_folder import StorageFolder

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


Reader = Callable[[str], bytes]
"""The file of an instance by its Orthanc id; raises OrthancNotFound or OrthancUnavailable."""


class OrthancRest:
    def __init__(
        self,
        url: str,
        *,
        authorization: Secret,
        pool_size: int,
        timeout: float = 60,
        reader: Reader | None = None,
        reader_max_bytes: int | None = None,
        folder: StorageFolder | None = None,
    ) -> None:
        """`pool_size` connections are kept open, one per thread that reads at the same time.

        `folder` reads the large files it holds as Orthanc stored them; `reader` reads files of
        up to `reader_max_bytes` (None: any size) whose size is known.
        """
        self._folder = folder
        self._reader = reader
        self._reader_max_bytes = reader_max_bytes
        parts = urlsplit(url)
        self._shown = mask_url(url)
        self._prefix = parts.path.rstrip("/")
        self._authorization = authorization
        options: dict[str, object] = {
            "maxsize": pool_size,
            # Orthanc closes keep-alive connections after a second of silence: a GET that
            # meets one closing is sent once more on a new connection.
            "retries": urllib3.Retry(total=1, connect=1, read=1, redirect=0, status=0, other=0),
            "timeout": urllib3.Timeout(total=timeout),
        }
        if parts.scheme == "https":
            # Orthanc on loopback, often with a self-signed certificate.
            options["cert_reqs"] = "CERT_NONE"
        self._pool = urllib3.connection_from_url(f"{parts.scheme}://{parts.netloc}", **options)

    def read_file(self, orthanc_id: str, *, size: int = 0, file_uuid: str | None = None) -> bytes:
        """The instance's file; `size` (0: unknown) chooses between in-process and loopback,
        `file_uuid` (where it was when queued) lets it be read from the storage folder."""
        folder = self._folder
        if folder is not None and (data := folder.read(orthanc_id, size, file_uuid)) is not None:
            return data
        limit = self._reader_max_bytes
        if self._reader is not None and size > 0 and (limit is None or size <= limit):
            return self._reader(orthanc_id)
        return self._get(f"/instances/{orthanc_id}/file").data

    def locate(self, orthanc_ids: Iterable[str]) -> dict[str, str]:
        """Where these instances' files are in the storage folder, for those it holds as stored."""
        if self._folder is None:
            return {}
        found = {orthanc_id: self._folder.locate(orthanc_id) for orthanc_id in orthanc_ids}
        return {orthanc_id: uuid for orthanc_id, uuid in found.items() if uuid is not None}

    def check_api(self) -> None:
        """Raise OrthancUnavailable unless Orthanc's REST API answers at the configured URL.

        Tells "this instance is gone" from "every path is 404" (a wrong prefix).
        """
        try:
            self._get("/system")
        except OrthancNotFound:
            raise OrthancUnavailable(
                f"Orthanc's REST API is not at {self._shown}: /system answered 404"
                " (check Kheops.OrthancUrl and its path)"
            ) from None

    def get_json(self, path: str) -> object:
        return self._json(path)

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
            documents: object = [self._json(f"/instances/{orthanc_id}")]
        else:
            documents = self._json(f"/{level}/{orthanc_id}/instances")
        if not isinstance(documents, Sequence):
            raise OrthancUnavailable(f"Orthanc REST /{level}/{orthanc_id}: not a list")
        return [
            StoredInstance(orthanc_id=str(doc["ID"]), size=int(doc.get("FileSize", 0)))
            for doc in documents
            if isinstance(doc, dict)
        ]

    def write(self, method: str, path: str, body: object = None) -> object:
        """PUT, POST or DELETE `path` with a JSON body; the answer as JSON, None if empty."""
        try:
            response = self._pool.request(
                method,
                f"{self._prefix}{path}",
                body=b"" if body is None else json.dumps(body).encode(),
                headers={"Authorization": self._authorization.reveal()},
                retries=False,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise OrthancUnavailable(f"Orthanc REST {method} {path}: {type(exc).__name__}") from exc
        if response.status == 404:
            raise OrthancNotFound(f"Orthanc REST {method} {path}: not found")
        if response.status != 200:
            raise OrthancUnavailable(f"Orthanc REST {method} {path}: HTTP {response.status}")
        try:
            return json.loads(response.data) if response.data.strip() else None
        except ValueError as exc:
            raise OrthancUnavailable(f"Orthanc REST {method} {path}: not JSON") from exc

    def changes(self, since: int, *, limit: int = 1000) -> ChangePage:
        document = self._change_log({"since": since, "limit": limit})
        return ChangePage(
            changes=tuple(
                Change(seq=c["Seq"], change_type=c["ChangeType"], resource_id=c["ID"])
                for c in document.get("Changes", [])
            ),
            last=int(document["Last"]),
            done=bool(document["Done"]),
        )

    def last_change(self) -> int:
        return int(self._change_log({"last": ""})["Last"])

    def _change_log(self, params: Mapping[str, object]) -> dict[str, Any]:
        document = self._json("/changes", params)
        if not isinstance(document, dict):
            raise OrthancUnavailable("Orthanc REST /changes: not an object")
        return document

    def _json(self, path: str, params: Mapping[str, object] | None = None) -> object:
        try:
            return json.loads(self._get(path, params).data)
        except ValueError as exc:
            raise OrthancUnavailable(f"Orthanc REST {path}: not JSON") from exc

    def _get(
        self, path: str, params: Mapping[str, object] | None = None
    ) -> urllib3.BaseHTTPResponse:
        try:
            response = self._pool.request(
                "GET",
                f"{self._prefix}{path}",
                fields={k: str(v) for k, v in (params or {}).items()},
                # Orthanc gzips answers for clients that accept it (HttpCompressionEnabled):
                # over loopback that only costs ~5 ms of CPU per 512 KB file on each side.
                headers={
                    "Authorization": self._authorization.reveal(),
                    "Accept-Encoding": "identity",
                },
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise OrthancUnavailable(
                f"cannot reach Orthanc's REST API at {self._shown} ({_cause(exc)}):"
                " check Kheops.OrthancUrl"
            ) from exc
        if response.status == 404:
            raise OrthancNotFound(f"Orthanc REST {path}: not found")
        if response.status in (401, 403):
            raise OrthancUnavailable(
                f"Orthanc's REST API at {self._shown} refuses the plugin ({response.status}):"
                " Kheops.OrthancUrl must be this Orthanc's own address"
            )
        if response.status != 200:
            raise OrthancUnavailable(f"Orthanc REST {path}: HTTP {response.status}")
        return response


def _cause(exc: BaseException) -> str:
    """The innermost error's type (ConnectionRefusedError, TimeoutError...): no URL, no header."""
    while isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return type(exc).__name__
