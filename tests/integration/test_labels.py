"""Study labels in a real Orthanc: kheops-failed while something failed, kheops-sent if asked.

On an Orthanc without labels (before 1.12) the plugin says so once and carries on; the label
assertions then have nothing to check and the test ends there.
"""

from __future__ import annotations

import pytest
import requests

from tests.corpus import new_uid
from tests.orthanc_process import OrthancFactory, OrthancProcess
from tests.plugin_setup import Album, single_instance
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def labels(orthanc: OrthancProcess, study: str) -> list[str]:
    return sorted(orthanc.get(f"/studies/{study}").json().get("Labels", []))


def stow(album: Album, token: str, data: bytes) -> None:
    boundary = "b0undary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    answer = requests.post(
        f"{album.server.url}/api/studies",
        data=body,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        },
        timeout=10,
    )
    assert answer.status_code == 200, answer.text


def test_a_study_is_labelled_failed_until_its_failed_instance_is_sent_and_then_sent(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    # Another album holds the series first: KHEOPS refuses it to ours (292) until it shares it.
    other_album, other_token = album.other_album(scope=("read", "write", "send"))
    study_uid, series_uid = new_uid(), new_uid()
    sop_uid, data = single_instance(study_uid=study_uid, series_uid=series_uid)
    stow(album, other_token, data)
    orthanc = orthanc_factory(kheops=album.section(SentLabel=True))
    if orthanc.get("/tools/labels").status_code == 404:
        wait_until(lambda: "this Orthanc has no labels (1.12+)" in orthanc.log)
        orthanc.upload(data)
        wait_until(lambda: orthanc.get("/kheops/status").json()["Counts"]["Failed"] == 1)
        assert orthanc.is_running
        pytest.skip(f"Orthanc {orthanc.get('/system').json()['Version']} has no labels")

    orthanc.upload(data)
    study = orthanc.get("/studies").json()[0]
    wait_until(lambda: labels(orthanc, study) == ["kheops-failed"], message="failed label")

    shared = requests.put(
        f"{album.server.url}/api/studies/{study_uid}/series/{series_uid}",
        headers={
            "Authorization": f"Bearer {album.token}",
            "X-Authorization-Source": f"Bearer {other_token}",
        },
        timeout=10,
    )
    assert shared.status_code in (200, 201), shared.text
    assert orthanc.post("/kheops/queue/retry", json={}).json() == {"Retried": 1}
    wait_until(lambda: album.holds([sop_uid]), message="sent after the share")
    wait_until(lambda: labels(orthanc, study) == ["kheops-sent"], message="sent label")
    assert other_album != album.album_id
