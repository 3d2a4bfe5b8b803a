"""Bare STOW-RS clients, no Orthanc involved: the sink limit and the per-instance gateway.

Both read the corpus into memory before the clock starts, so that they measure what KHEOPS
(the test server) can take, not how fast this process reads files.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import requests
from requests.adapters import HTTPAdapter


class StowError(RuntimeError):
    """The test server did not store a request whole."""


def _session(connections: int, verify: bool | str) -> requests.Session:
    session = requests.Session()
    session.verify = verify
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=connections, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def multipart(parts: Sequence[bytes]) -> tuple[str, bytes]:
    """(Content-Type, body) of a STOW-RS request: one application/dicom part per instance."""
    boundary = f"bench-{secrets.token_hex(16)}"
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
    chunks: list[bytes] = []
    for part in parts:
        chunks += (head, part, b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return content_type, b"".join(chunks)


def _post(
    session: requests.Session, api: str, token: str, parts: Sequence[bytes], *, chunk: int = 0
) -> None:
    """One STOW-RS request of `parts`; with `chunk`, its body goes in chunks of that size."""
    content_type, body = multipart(parts)
    response = session.post(
        f"{api}/studies",
        data=(body[i : i + chunk] for i in range(0, len(body), chunk)) if chunk else body,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": content_type,
            "Accept": "application/dicom+json",
        },
        timeout=300,
        verify=session.verify,  # given here, requests' environment (REQUESTS_CA_BUNDLE) cannot win
    )
    if response.status_code != 200:
        raise StowError(f"STOW-RS answered {response.status_code}: {response.text[:300]}")


def post_chunked(
    api: str, token: str, files: Sequence[bytes], *, chunk: int, verify: bool | str = True
) -> None:
    """Every instance in one request whose body goes in chunks of `chunk` bytes
    (Transfer-Encoding: chunked), as Orthanc's DICOMweb client sends; `verify` is requests'."""
    with _session(1, verify) as session:
        _post(session, api, token, files, chunk=chunk)


def post_batches(
    api: str,
    token: str,
    files: Sequence[bytes],
    *,
    batch: int,
    connections: int,
    verify: bool | str = True,
) -> None:
    """Batches of `batch` instances, `connections` requests in flight at a time."""
    batches = [files[i : i + batch] for i in range(0, len(files), batch)]
    local = threading.local()
    sessions: list[requests.Session] = []
    lock = threading.Lock()

    def send(parts: Sequence[bytes]) -> None:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = _session(1, verify)
            with lock:
                sessions.append(session)
        _post(session, api, token, parts)

    try:
        with ThreadPoolExecutor(max_workers=connections) as pool:
            list(pool.map(send, batches))
    finally:
        for session in sessions:
            session.close()


def post_one_by_one(
    api: str, token: str, files: Sequence[bytes], *, verify: bool | str = True
) -> None:
    """One request per instance over one keep-alive connection, as Karnak forwards."""
    with _session(1, verify) as session:
        for data in files:
            _post(session, api, token, [data])
