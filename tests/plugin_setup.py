"""What the plugin's integration and browser tests share: fast settings, a main album on the
KHEOPS test server, single instances and small corpora, and the status routes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests

from tests.corpus import CorpusFile, make_dataset, new_uid, plan_corpus, to_bytes
from tests.kheops_server import KheopsTestServer
from tests.orthanc_process import OrthancProcess

# Short delays so that retries, token re-checks and reconciliation happen within a test.
FAST: dict[str, Any] = {
    "Workers": 2,
    "BatchMaxInstances": 10,
    "BatchLingerMilliseconds": 20,
    "RetryInitialSeconds": 0.2,
    "RetryMaximumSeconds": 1,
    "TokenRecheckSeconds": 0.5,
    "ReconcileSeconds": 1,
    "ConnectTimeoutSeconds": 2,
    "RequestTimeoutSeconds": 10,
}


class Album:
    """The main album on a KHEOPS test server, its token, and the plugin section that uses it."""

    def __init__(self, server: KheopsTestServer) -> None:
        self.server = server
        self.album_id = server.add_album()
        self.token = server.add_token(album_id=self.album_id, scope=("read", "write", "send"))
        self.tokens = [self.token]

    def section(self, **fields: Any) -> dict[str, Any]:
        return {"Url": self.server.url, "Token": self.token, **FAST, **fields}

    def other_album(self, scope: Sequence[str] = ("write",)) -> tuple[str, str]:
        """Another album of the same KHEOPS and a token of it."""
        album_id = self.server.add_album()
        token = self.server.add_token(album_id=album_id, scope=scope)
        self.tokens.append(token)
        return album_id, token

    def holds(self, sop_uids: Sequence[str], *, album_id: str | None = None) -> bool:
        return set(sop_uids) <= self.server.album_instances(album_id or self.album_id)

    def take_series(self, data: bytes) -> None:
        """Another album stores this instance first: KHEOPS then refuses its series to ours (292)."""
        _, token = self.other_album()
        boundary = "b0undary"
        body = (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        answer = requests.post(
            f"{self.server.url}/api/studies",
            data=body,
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            },
            timeout=10,
        )
        assert answer.status_code == 200, answer.text


def single_instance(**fields: Any) -> tuple[str, bytes]:
    """One instance (of a new study and series unless given): its SOP Instance UID and bytes."""
    sop_uid = new_uid()
    dataset = make_dataset(
        patient_id=fields.pop("patient_id", "P-SINGLE"),
        patient_name=fields.pop("patient_name", "SINGLE^ONE"),
        study_uid=fields.pop("study_uid", new_uid()),
        series_uid=fields.pop("series_uid", new_uid()),
        sop_uid=sop_uid,
        **fields,
    )
    return sop_uid, to_bytes(dataset)


def write_corpus(
    folder: Path, *, studies: int, series: int, instances: int, seed: int = 0
) -> list[CorpusFile]:
    files = plan_corpus(
        folder, studies=studies, series_per_study=series, instances_per_series=instances, seed=seed
    )
    for item in files:
        item.write()
    return files


def status(orthanc: OrthancProcess) -> dict[str, Any]:
    response = orthanc.get("/kheops/status")
    response.raise_for_status()
    document: dict[str, Any] = response.json()
    return document


def queue(orthanc: OrthancProcess, state: str) -> list[dict[str, Any]]:
    response = orthanc.get("/kheops/queue", params={"state": state, "limit": 1000})
    response.raise_for_status()
    entries: list[dict[str, Any]] = response.json()["Instances"]
    return entries


def orthanc_id(orthanc: OrthancProcess, sop_uid: str) -> str:
    """The Orthanc id of the instance with this SOP Instance UID."""
    response = orthanc.post("/tools/lookup", data=sop_uid)
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()
    return str(found[0]["ID"])
