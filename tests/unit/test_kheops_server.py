"""The KHEOPS test server answers every row of kheops-api.md, and its faults happen as scripted.

Everything goes through real HTTP with requests, as the plugin will.
"""

import json
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.kheops_server import KheopsTestServer

BOUNDARY = "kheops-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def dicom_file(
    study: str,
    series: str,
    sop: str,
    attributes: Mapping[str, str] | None = None,
    pixel_bytes: int = 0,
) -> bytes:
    """A small Part-10 CT instance; attributes override the defaults."""
    dataset = Dataset()
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = sop
    dataset.StudyInstanceUID = study
    dataset.SeriesInstanceUID = series
    dataset.PatientID = "PAT-1"
    dataset.PatientName = "Doe^Jane"
    dataset.StudyDate = "20240102"
    dataset.StudyDescription = "CT THORAX"
    dataset.Modality = "CT"
    dataset.SeriesNumber = "1"
    for keyword, value in (attributes or {}).items():
        setattr(dataset, keyword, value)
    if pixel_bytes:
        dataset.Rows, dataset.Columns = 512, pixel_bytes // 1024
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
        dataset.SamplesPerPixel, dataset.PixelRepresentation = 1, 0
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.PixelData = bytes(pixel_bytes)
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def part(content: bytes, content_type: str | None = "application/dicom") -> bytes:
    headers = f"Content-Type: {content_type}\r\n" if content_type else ""
    return f"--{BOUNDARY}\r\n{headers}\r\n".encode() + content + b"\r\n"


def multipart(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Kheops:
    """A client bound to one server, so tests read as the requests the plugin makes."""

    def __init__(self, server: KheopsTestServer, http: requests.Session) -> None:
        self.server = server
        self.http = http
        self.api = server.url + "/api"

    def stow(
        self, token: str | None, *files: bytes, params: dict[str, str] | None = None
    ) -> requests.Response:
        headers = {"Content-Type": STOW_TYPE, "Accept": "application/dicom+json"}
        headers |= bearer(token) if token else {}
        body = multipart(*(part(file) for file in files))
        return self.http.post(
            self.api + "/studies", data=body, headers=headers, params=params, timeout=10
        )

    def introspect(self, token: str, headers: dict[str, str] | None = None) -> requests.Response:
        return self.http.post(
            self.api + "/token/introspect", data={"token": token}, headers=headers, timeout=10
        )

    def share(
        self,
        destination: str | None,
        source: str | None,
        study: str,
        series: str | None = None,
    ) -> requests.Response:
        headers = bearer(destination) if destination else {}
        if source:
            headers["X-Authorization-Source"] = f"Bearer {source}"
        path = f"/studies/{study}" + (f"/series/{series}" if series else "")
        return self.http.put(self.api + path, headers=headers, timeout=10)

    def studies(self, token: str, **params: str) -> requests.Response:
        return self.http.get(
            self.api + "/studies", headers=bearer(token), params=params, timeout=10
        )

    def album(self, scope: tuple[str, ...] = ("read", "write", "send")) -> tuple[str, str]:
        """A new album and a token for it."""
        album_id = self.server.add_album()
        return album_id, self.server.add_token(album_id=album_id, scope=scope)

    def control(self, method: str, path: str, body: Any = None) -> requests.Response:
        return self.http.request(method, self.server.url + "/_test" + path, json=body, timeout=10)


def uids(answer: dict[str, Any], tag: str) -> list[str]:
    """The SOP Instance UIDs listed in one sequence of a STOW answer."""
    return [item["00081155"]["Value"][0] for item in answer[tag]["Value"]]


def reasons(answer: dict[str, Any], tag: str) -> list[int]:
    return [item["00081197"]["Value"][0] for item in answer[tag]["Value"]]


@pytest.fixture
def server() -> Iterator[KheopsTestServer]:
    with KheopsTestServer() as running:
        yield running


@pytest.fixture
def kheops(server: KheopsTestServer) -> Iterator[Kheops]:
    with requests.Session() as http:
        yield Kheops(server, http)


@pytest.fixture
def study() -> str:
    return generate_uid()


# ---------------------------------------------------------------------------------------------
# STOW-RS
# ---------------------------------------------------------------------------------------------


def test_stow_of_a_new_series_stores_every_part_and_answers_200(kheops: Kheops, study: str) -> None:
    album, token = kheops.album()
    series, sops = generate_uid(), [generate_uid(), generate_uid()]

    response = kheops.stow(token, *(dicom_file(study, series, sop) for sop in sops))

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/dicom+json"
    answer = response.json()
    assert uids(answer, "00081199") == sops
    assert answer["00081199"]["Value"][0]["00081150"] == {"vr": "UI", "Value": [CTImageStorage]}
    assert answer["00081190"]["Value"] == [f"{kheops.server.url}/api/studies/{study}"]
    assert "00081198" not in answer and "0008119A" not in answer
    assert kheops.server.album_instances(album) == set(sops)
    assert kheops.server.album_series(album) == {(study, series)}


def test_stow_answers_202_when_some_parts_are_stored_and_others_fail(
    kheops: Kheops, study: str
) -> None:
    _album, token = kheops.album()
    sop = generate_uid()

    response = kheops.stow(token, dicom_file(study, generate_uid(), sop), b"not a DICOM file")

    assert response.status_code == 202
    answer = response.json()
    assert uids(answer, "00081199") == [sop]
    assert reasons(answer, "0008119A") == [272]


def test_stow_answers_409_when_nothing_is_stored(kheops: Kheops) -> None:
    _album, token = kheops.album()

    response = kheops.stow(token, b"garbage", b"more garbage")

    assert response.status_code == 409
    assert reasons(response.json(), "0008119A") == [272, 272]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ('multipart/related; type="application/dicom"', multipart(part(b"x"))),
        ("application/dicom", b"DICM"),
        (STOW_TYPE, b"this body has no boundary line at all"),
        (STOW_TYPE, f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\nno end".encode()),
        (STOW_TYPE, f"--{BOUNDARY}--\r\n".encode()),
    ],
    ids=["no-boundary", "not-multipart", "no-delimiter", "no-close-delimiter", "no-parts"],
)
def test_stow_answers_400_to_a_body_it_cannot_understand(
    kheops: Kheops, content_type: str, body: bytes
) -> None:
    _album, token = kheops.album()
    headers = bearer(token) | {"Content-Type": content_type}

    response = kheops.http.post(kheops.api + "/studies", data=body, headers=headers, timeout=10)

    assert response.status_code == 400


@pytest.mark.parametrize("token_kind", ["missing", "unknown", "revoked"])
def test_stow_answers_401_with_a_bearer_challenge_without_a_valid_token(
    kheops: Kheops, study: str, token_kind: str
) -> None:
    album, token = kheops.album()
    if token_kind == "revoked":
        kheops.server.revoke_token(token)
    presented = {"missing": None, "unknown": "A" * 22, "revoked": token}[token_kind]

    response = kheops.stow(presented, dicom_file(study, generate_uid(), generate_uid()))

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer, Basic"
    assert kheops.server.album_instances(album) == set()


def test_stow_answers_403_in_plain_text_to_a_token_without_write(
    kheops: Kheops, study: str
) -> None:
    _album, token = kheops.album(scope=("read", "send"))

    response = kheops.stow(token, dicom_file(study, generate_uid(), generate_uid()))

    assert response.status_code == 403
    assert response.text == "Authorization is not valid for posting"
    assert response.headers["Content-Type"].startswith("text/plain")


def test_series_held_by_another_album_is_refused_with_292(kheops: Kheops, study: str) -> None:
    _first, first_token = kheops.album()
    second, second_token = kheops.album()
    series, refused = generate_uid(), generate_uid()
    assert kheops.stow(first_token, dicom_file(study, series, generate_uid())).status_code == 200

    response = kheops.stow(second_token, dicom_file(study, series, refused))

    assert response.status_code == 409
    answer = response.json()
    assert uids(answer, "00081198") == [refused]
    assert reasons(answer, "00081198") == [292]
    assert kheops.server.album_instances(second) == set()


def test_a_new_series_of_a_study_held_by_another_album_is_accepted(
    kheops: Kheops, study: str
) -> None:
    _first, first_token = kheops.album()
    second, second_token = kheops.album()
    kheops.stow(first_token, dicom_file(study, generate_uid(), generate_uid()))
    series, sop = generate_uid(), generate_uid()

    assert kheops.stow(second_token, dicom_file(study, series, sop)).status_code == 200
    assert kheops.server.album_instances(second) == {sop}


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("PatientID", "PAT-2"),
        ("PatientName", "Doe^John"),
        ("StudyDescription", "CT ABDOMEN"),
        ("AccessionNumber", "ACC9"),
        ("Modality", "MR"),
        ("SeriesNumber", "2"),
        ("BodyPartExamined", "CHEST"),
    ],
)
def test_instance_whose_study_or_series_attributes_differ_is_refused_with_262(
    kheops: Kheops, study: str, attribute: str, value: str
) -> None:
    _album, token = kheops.album()
    series, refused = generate_uid(), generate_uid()
    stored = generate_uid()

    response = kheops.stow(
        token,
        dicom_file(study, series, stored),
        dicom_file(study, series, refused, {attribute: value}),
    )

    assert response.status_code == 202
    answer = response.json()
    assert uids(answer, "00081199") == [stored]
    assert uids(answer, "00081198") == [refused]
    assert reasons(answer, "00081198") == [262]


def test_part_without_its_own_content_type_is_refused_with_272(kheops: Kheops, study: str) -> None:
    _album, token = kheops.album()
    body = multipart(part(dicom_file(study, generate_uid(), generate_uid()), content_type=None))
    headers = bearer(token) | {"Content-Type": STOW_TYPE}

    response = kheops.http.post(kheops.api + "/studies", data=body, headers=headers, timeout=10)

    assert response.status_code == 409
    assert reasons(response.json(), "0008119A") == [272]


def test_resending_a_stored_instance_is_accepted_and_counted(kheops: Kheops, study: str) -> None:
    album, token = kheops.album()
    sop = generate_uid()
    file = dicom_file(study, generate_uid(), sop)

    first, second = kheops.stow(token, file), kheops.stow(token, file)

    assert (first.status_code, second.status_code) == (200, 200)
    assert kheops.server.store_count(sop) == 2
    assert kheops.server.album_instances(album) == {sop}


def test_album_parameter_with_an_album_token_refuses_every_instance_with_292(
    kheops: Kheops, study: str
) -> None:
    album, token = kheops.album()
    files = [dicom_file(study, generate_uid(), generate_uid()) for _ in range(2)]

    response = kheops.stow(token, *files, params={"album": album})

    assert response.status_code == 409
    assert reasons(response.json(), "00081198") == [292, 292]
    assert kheops.server.album_instances(album) == set()


def test_user_token_upload_lands_in_no_album_and_an_album_may_claim_the_series(
    kheops: Kheops, study: str
) -> None:
    album, album_token = kheops.album()
    user_token = kheops.server.add_token(album_id=None)
    series, first, second = generate_uid(), generate_uid(), generate_uid()

    assert kheops.stow(user_token, dicom_file(study, series, first)).status_code == 200
    assert kheops.server.store_count(first) == 1
    assert kheops.server.album_instances(album) == set()

    assert kheops.stow(album_token, dicom_file(study, series, second)).status_code == 200
    assert kheops.server.album_instances(album) == {first, second}


def test_denied_token_introspects_active_but_its_stow_parts_are_refused_with_292(
    kheops: Kheops, study: str
) -> None:
    album, token = kheops.album()
    kheops.server.deny_token(token)

    assert kheops.introspect(token).json()["active"] is True
    response = kheops.stow(token, dicom_file(study, generate_uid(), generate_uid()))

    assert response.status_code == 409
    assert reasons(response.json(), "00081198") == [292]
    assert kheops.server.album_instances(album) == set()


def test_chunked_stow_body_is_accepted(kheops: Kheops, study: str) -> None:
    album, token = kheops.album()
    sop = generate_uid()
    body = multipart(part(dicom_file(study, generate_uid(), sop)))
    chunks = (body[start : start + 100] for start in range(0, len(body), 100))
    headers = bearer(token) | {"Content-Type": STOW_TYPE}

    response = kheops.http.post(kheops.api + "/studies", data=chunks, headers=headers, timeout=10)

    assert response.status_code == 200
    assert kheops.server.album_instances(album) == {sop}


# ---------------------------------------------------------------------------------------------
# Introspection
# ---------------------------------------------------------------------------------------------


def test_introspection_of_an_album_token_lists_its_scope_in_order_and_its_album(
    kheops: Kheops,
) -> None:
    album = kheops.server.add_album()
    token = kheops.server.add_token(
        album_id=album, scope=("send", "downloadbutton", "write", "read")
    )

    response = kheops.introspect(token)

    assert response.status_code == 200
    answer = response.json()
    assert answer["active"] is True
    assert answer["scope"] == "read write downloadbutton send"
    assert answer["album_id"] == album
    assert answer["sub"] and len(answer["cap_token"]) == 10


def test_introspection_of_a_write_only_token_says_write(kheops: Kheops) -> None:
    _album, token = kheops.album(scope=("write",))

    assert kheops.introspect(token).json()["scope"] == "write"


def test_introspection_omits_scope_when_the_token_has_no_permission(kheops: Kheops) -> None:
    _album, token = kheops.album(scope=())

    answer = kheops.introspect(token).json()

    assert answer["active"] is True
    assert "scope" not in answer


def test_introspection_of_a_user_token_has_a_user_scope_and_no_album(kheops: Kheops) -> None:
    token = kheops.server.add_token(
        album_id=None, scope=("read", "write", "downloadbutton", "send")
    )

    answer = kheops.introspect(token).json()

    assert answer["scope"] == "user read write downloadbutton send"
    assert "album_id" not in answer


def test_introspection_of_unknown_or_revoked_tokens_is_inactive_and_nothing_else(
    kheops: Kheops,
) -> None:
    _album, token = kheops.album()
    kheops.server.revoke_token(token)

    assert kheops.introspect(token).json() == {"active": False}
    assert kheops.introspect("B" * 22).json() == {"active": False}


def test_introspection_with_basic_credentials_answers_401_and_ignores_a_bearer_header(
    kheops: Kheops,
) -> None:
    _album, token = kheops.album()

    basic = kheops.introspect(token, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    with_bearer = kheops.introspect(token, headers=bearer("C" * 22))

    assert basic.status_code == 401
    assert with_bearer.status_code == 200 and with_bearer.json()["active"] is True


def test_set_scope_changes_what_a_token_may_do(kheops: Kheops, study: str) -> None:
    _album, token = kheops.album(scope=("read",))
    kheops.server.set_scope(token, ("read", "write"))

    assert kheops.introspect(token).json()["scope"] == "read write"
    assert kheops.stow(token, dicom_file(study, generate_uid(), generate_uid())).status_code == 200


# ---------------------------------------------------------------------------------------------
# Sharing
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def shared_setup(kheops: Kheops, study: str) -> tuple[str, str, str, str, str]:
    """A source album holding one series, and an empty destination album: ids and tokens."""
    source, source_token = kheops.album(scope=("read", "send"))
    destination, destination_token = kheops.album(scope=("write",))
    uploader = kheops.server.add_token(album_id=source, scope=("write",))
    series = generate_uid()
    assert kheops.stow(uploader, dicom_file(study, series, generate_uid())).status_code == 200
    return source, source_token, destination, destination_token, series


def test_sharing_a_series_answers_201_and_sharing_it_again_changes_nothing(
    kheops: Kheops, study: str, shared_setup: tuple[str, str, str, str, str]
) -> None:
    source, source_token, destination, destination_token, series = shared_setup

    first = kheops.share(destination_token, source_token, study, series)
    again = kheops.share(destination_token, source_token, study, series)

    assert (first.status_code, again.status_code) == (201, 201)
    assert first.content == b""
    assert kheops.server.album_series(destination) == {(study, series)}
    assert kheops.server.album_instances(destination) == kheops.server.album_instances(source)


def test_instances_stored_in_a_shared_series_later_are_visible_in_the_destination(
    kheops: Kheops, study: str, shared_setup: tuple[str, str, str, str, str]
) -> None:
    source, source_token, destination, destination_token, series = shared_setup
    kheops.share(destination_token, source_token, study, series)
    uploader = kheops.server.add_token(album_id=source, scope=("write",))
    later = generate_uid()

    assert kheops.stow(uploader, dicom_file(study, series, later)).status_code == 200

    assert later in kheops.server.album_instances(destination)


def test_sharing_a_study_shares_a_snapshot_of_its_series_in_the_source_album(
    kheops: Kheops, study: str, shared_setup: tuple[str, str, str, str, str]
) -> None:
    source, source_token, destination, destination_token, first_series = shared_setup
    uploader = kheops.server.add_token(album_id=source, scope=("write",))
    second_series, later_series = generate_uid(), generate_uid()
    kheops.stow(uploader, dicom_file(study, second_series, generate_uid()))

    assert kheops.share(destination_token, source_token, study).status_code == 201
    kheops.stow(uploader, dicom_file(study, later_series, generate_uid()))

    assert kheops.server.album_series(destination) == {
        (study, first_series),
        (study, second_series),
    }


@pytest.mark.parametrize("missing", ["destination", "unknown-destination", "source-header"])
def test_sharing_answers_401_without_a_destination_token_or_source_header(
    kheops: Kheops, study: str, shared_setup: tuple[str, str, str, str, str], missing: str
) -> None:
    _source, source_token, destination, destination_token, series = shared_setup
    tokens = {
        "destination": (None, source_token),
        "unknown-destination": ("D" * 22, source_token),
        "source-header": (destination_token, None),
    }[missing]

    response = kheops.share(*tokens, study, series)

    assert response.status_code == 401
    assert kheops.server.album_series(destination) == set()


@pytest.mark.parametrize("source_kind", ["revoked", "unknown", "denied"])
def test_sharing_answers_403_when_the_source_token_is_not_valid(
    kheops: Kheops, study: str, shared_setup: tuple[str, str, str, str, str], source_kind: str
) -> None:
    _source, source_token, _destination, destination_token, series = shared_setup
    if source_kind == "revoked":
        kheops.server.revoke_token(source_token)
    if source_kind == "denied":
        kheops.server.deny_token(source_token)
    presented = "E" * 22 if source_kind == "unknown" else source_token

    response = kheops.share(destination_token, presented, study, series)

    assert response.status_code == 403
    assert set(response.json()) == {"message", "detail"}


@pytest.mark.parametrize("destination_kind", ["without-write", "denied"])
def test_sharing_answers_403_with_a_json_body_when_the_destination_may_not_write(
    kheops: Kheops, study: str, shared_setup: tuple[str, str, str, str, str], destination_kind: str
) -> None:
    _source, source_token, destination, destination_token, series = shared_setup
    if destination_kind == "without-write":
        kheops.server.set_scope(destination_token, ("read",))
    else:
        kheops.server.deny_token(destination_token)

    response = kheops.share(destination_token, source_token, study, series)

    assert response.status_code == 403
    assert response.json() == {
        "message": "Authorization error",
        "detail": "No write access with this credential",
    }
    assert kheops.server.album_series(destination) == set()


def test_sharing_a_series_the_source_album_does_not_hold_answers_404(
    kheops: Kheops, study: str, shared_setup: tuple[str, str, str, str, str]
) -> None:
    _source, _source_token, _destination, destination_token, series = shared_setup
    _other, other_token = kheops.album(scope=("read", "send"))

    response = kheops.share(destination_token, other_token, study, series)
    unknown = kheops.share(destination_token, other_token, study, generate_uid())

    assert (response.status_code, unknown.status_code) == (404, 404)
    assert response.json()["message"] == "Series Not Found"


def test_sharing_with_a_source_token_without_send_answers_404(
    kheops: Kheops, study: str, shared_setup: tuple[str, str, str, str, str]
) -> None:
    _source, source_token, destination, destination_token, series = shared_setup
    kheops.server.set_scope(source_token, ("read",))

    response = kheops.share(destination_token, source_token, study, series)

    assert response.status_code == 404
    assert response.json()["message"] == "Series Not Found"
    assert kheops.server.album_series(destination) == set()


@pytest.mark.parametrize("target", ["study", "series"])
def test_albums_variants_of_sharing_answer_403_to_album_tokens(
    kheops: Kheops, study: str, shared_setup: tuple[str, str, str, str, str], target: str
) -> None:
    _source, source_token, destination, destination_token, series = shared_setup
    path = f"/studies/{study}" + (f"/series/{series}" if target == "series" else "")
    headers = bearer(destination_token) | {"X-Authorization-Source": f"Bearer {source_token}"}

    response = kheops.http.put(
        f"{kheops.api}{path}/albums/{destination}", headers=headers, timeout=10
    )

    assert response.status_code == 403


# ---------------------------------------------------------------------------------------------
# QIDO-RS
# ---------------------------------------------------------------------------------------------


def test_searching_an_empty_album_answers_204(kheops: Kheops) -> None:
    _album, token = kheops.album()

    response = kheops.studies(token)

    assert response.status_code == 204
    assert response.content == b""


def test_searching_lists_the_album_studies_with_a_total_count_and_filters(
    kheops: Kheops, study: str
) -> None:
    _album, token = kheops.album()
    series = generate_uid()
    kheops.stow(token, dicom_file(study, series, generate_uid()))
    kheops.stow(token, dicom_file(generate_uid(), generate_uid(), generate_uid()))

    everything = kheops.studies(token)
    one = kheops.studies(token, StudyInstanceUID=study)
    none = kheops.studies(token, StudyInstanceUID=generate_uid())

    assert everything.status_code == 200
    assert everything.headers["X-Total-Count"] == "2"
    assert one.headers["X-Total-Count"] == "1"
    [row] = one.json()
    assert row["0020000D"]["Value"] == [study]
    assert row["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]
    assert none.status_code == 204


def test_searching_the_series_of_a_study_lists_only_those_in_the_album(
    kheops: Kheops, study: str
) -> None:
    _first, first_token = kheops.album()
    _second, second_token = kheops.album()
    mine = generate_uid()
    kheops.stow(first_token, dicom_file(study, mine, generate_uid()))
    kheops.stow(second_token, dicom_file(study, generate_uid(), generate_uid()))

    response = kheops.http.get(
        f"{kheops.api}/studies/{study}/series", headers=bearer(first_token), timeout=10
    )

    assert response.status_code == 200
    assert [row["0020000E"]["Value"][0] for row in response.json()] == [mine]


def test_searching_needs_read(kheops: Kheops) -> None:
    _album, token = kheops.album(scope=("write",))

    assert kheops.studies(token).status_code == 403
    assert kheops.studies("F" * 22).status_code == 401


# ---------------------------------------------------------------------------------------------
# Faults, request log, lifecycle
# ---------------------------------------------------------------------------------------------


def test_fail_next_answers_the_status_to_the_next_matching_requests_only(kheops: Kheops) -> None:
    _album, token = kheops.album()
    kheops.server.fail_next(2, status=502, method="POST")

    search = kheops.studies(token)
    statuses = [kheops.introspect(token).status_code for _ in range(3)]

    assert search.status_code == 204
    assert statuses == [502, 502, 200]


def test_drop_next_resets_the_connection_without_answering(kheops: Kheops) -> None:
    _album, token = kheops.album()
    kheops.server.drop_next(1, path_prefix="/api/token")

    with pytest.raises(requests.ConnectionError):
        kheops.introspect(token)
    after = kheops.introspect(token)

    assert after.status_code == 200
    assert [entry.status for entry in kheops.server.requests] == [None, 200]


def test_latency_delays_every_api_answer(kheops: Kheops) -> None:
    _album, token = kheops.album()
    kheops.server.set_latency(2)

    # A client that waits for less than the added latency gives up.
    with pytest.raises(requests.ReadTimeout):
        kheops.http.post(kheops.api + "/token/introspect", data={"token": token}, timeout=0.2)
    kheops.server.set_latency(0)
    assert kheops.introspect(token).status_code == 200


def test_down_answers_503_to_every_api_request_until_lifted(kheops: Kheops, study: str) -> None:
    album, token = kheops.album()
    kheops.server.set_down(True)

    down = kheops.stow(token, dicom_file(study, generate_uid(), generate_uid()))
    introspection = kheops.introspect(token)
    kheops.server.set_down(False)

    assert (down.status_code, introspection.status_code) == (503, 503)
    assert kheops.server.album_instances(album) == set()
    assert kheops.introspect(token).status_code == 200


def test_refusing_closes_connections_without_answering(kheops: Kheops) -> None:
    _album, token = kheops.album()
    assert kheops.introspect(token).status_code == 200  # a keep-alive connection is now open
    kheops.server.set_refusing(True)

    with pytest.raises(requests.ConnectionError):
        kheops.introspect(token)
    with pytest.raises(requests.ConnectionError):
        requests.post(kheops.api + "/token/introspect", data={"token": token}, timeout=10)
    kheops.server.set_refusing(False)

    assert kheops.introspect(token).status_code == 200


def test_reset_faults_lifts_every_fault(kheops: Kheops) -> None:
    _album, token = kheops.album()
    kheops.server.fail_next(5)
    kheops.server.drop_next(5)
    kheops.server.set_down(True)
    kheops.server.set_latency(5)

    kheops.server.reset_faults()

    assert kheops.introspect(token).status_code == 200


def test_requests_are_recorded_with_lower_case_headers_and_part_counts(
    kheops: Kheops, study: str
) -> None:
    _album, token = kheops.album()
    files = [dicom_file(study, generate_uid(), generate_uid()) for _ in range(3)]

    kheops.stow(token, *files, params={"album": "x"})

    [entry] = kheops.server.requests
    assert (entry.method, entry.path, entry.query, entry.status) == (
        "POST",
        "/api/studies",
        "album=x",
        409,
    )
    assert entry.part_count == 3
    assert entry.headers["authorization"] == f"Bearer {token}"
    kheops.server.clear_requests()
    assert kheops.server.requests == []


def test_answers_are_http_1_1_and_keep_the_connection_alive(kheops: Kheops) -> None:
    _album, token = kheops.album()

    response = kheops.introspect(token)

    assert response.raw.version == 11
    assert response.headers.get("Connection", "keep-alive").lower() != "close"


def test_stop_cuts_open_keep_alive_connections(kheops: Kheops) -> None:
    _album, token = kheops.album()
    assert kheops.introspect(token).status_code == 200

    kheops.server.stop()

    with pytest.raises(requests.ConnectionError):
        kheops.introspect(token)


@pytest.mark.slow
def test_the_server_sinks_hundreds_of_half_megabyte_instances_in_batches(
    kheops: Kheops, study: str
) -> None:
    album, token = kheops.album()
    series, count, batch = generate_uid(), 400, 50
    files = [
        dicom_file(study, series, generate_uid(), pixel_bytes=512 * 1024) for _ in range(count)
    ]

    statuses = {
        kheops.stow(token, *files[i : i + batch]).status_code for i in range(0, count, batch)
    }

    # How fast is for the benchmarks to measure; a test only pins that it all lands.
    assert statuses == {200}
    assert len(kheops.server.album_instances(album)) == count


# ---------------------------------------------------------------------------------------------
# Control API and standalone mode
# ---------------------------------------------------------------------------------------------


def test_control_api_sets_up_albums_and_tokens_and_inspects_what_was_stored(
    kheops: Kheops, study: str
) -> None:
    album = kheops.control("POST", "/albums", {"album_id": "mainAlbum1"}).json()["album_id"]
    created = kheops.control("POST", "/tokens", {"album_id": album, "scope": ["read", "write"]})
    token = created.json()["token"]
    series, sop = generate_uid(), generate_uid()
    kheops.stow(token, dicom_file(study, series, sop))

    assert created.status_code == 201 and len(token) == 22
    assert kheops.control("GET", "/health").json() == {"status": "ok"}
    assert kheops.control("GET", f"/albums/{album}/instances").json() == {"instances": [sop]}
    assert kheops.control("GET", f"/albums/{album}/series").json() == {"series": [[study, series]]}
    assert kheops.control("GET", f"/instances/{sop}/count").json() == {"count": 1}
    assert kheops.control("GET", "/counts").json() == {"instances": 1, "stores": 1}
    summary = kheops.control("GET", "/requests?full=1").json()
    assert summary["total"] == 1 and summary["parts"] == 1
    assert summary["by_route"] == {"POST /api/studies": 1}
    assert summary["requests"][0]["status"] == 200
    assert kheops.control("DELETE", "/requests").status_code == 204
    assert kheops.server.requests == []


def test_control_api_revokes_denies_and_rescopes_tokens(kheops: Kheops) -> None:
    _album, revoked = kheops.album()
    _album, denied = kheops.album()
    _album, rescoped = kheops.album()

    assert kheops.control("POST", f"/tokens/{revoked}/revoke").status_code == 204
    assert kheops.control("POST", f"/tokens/{denied}/deny").status_code == 204
    assert (
        kheops.control("PUT", f"/tokens/{rescoped}/scope", {"scope": ["send"]}).status_code == 204
    )

    assert kheops.introspect(revoked).json() == {"active": False}
    assert kheops.studies(denied).status_code == 403
    assert kheops.introspect(rescoped).json()["scope"] == "send"


def test_control_api_scripts_faults(kheops: Kheops) -> None:
    _album, token = kheops.album()

    kheops.control("POST", "/faults/fail_next", {"count": 1, "status": 504})
    assert kheops.introspect(token).status_code == 504
    kheops.control("POST", "/faults/drop_next", {"count": 1, "method": "POST"})
    with pytest.raises(requests.ConnectionError):
        kheops.introspect(token)
    kheops.control("PUT", "/faults/down", {"down": True})
    assert kheops.introspect(token).status_code == 503
    kheops.control("PUT", "/faults/down", {"down": False})
    kheops.control("PUT", "/faults/latency", {"seconds": 2})
    with pytest.raises(requests.ReadTimeout):
        kheops.http.post(kheops.api + "/token/introspect", data={"token": token}, timeout=0.2)
    assert kheops.control("POST", "/faults/reset").status_code == 204
    assert kheops.introspect(token).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/tokens", {"album_id": "no-such-album"}, 404),
        ("POST", "/tokens", {"scope": ["read"]}, 400),
        ("POST", "/tokens", {"album_id": None, "scope": ["admin"]}, 400),
        ("POST", "/faults/fail_next", {"count": "two"}, 400),
        ("PUT", "/faults/down", {"down": 1}, 400),
        ("GET", "/albums/no-such-album/instances", None, 404),
        ("POST", "/tokens/no-such-token/revoke", None, 404),
        ("GET", "/no-such-route", None, 404),
    ],
)
def test_control_api_says_what_is_wrong_with_a_request(
    kheops: Kheops, method: str, path: str, body: Any, status: int
) -> None:
    response = kheops.control(method, path, body)

    assert response.status_code == status
    assert response.json()["message"]


def test_control_api_refuses_a_token_that_already_exists_with_409(kheops: Kheops) -> None:
    album, token = kheops.album()

    response = kheops.control("POST", "/tokens", {"album_id": album, "token": token})

    assert response.status_code == 409


def test_standalone_server_loads_its_seed_and_answers_until_terminated(tmp_path: Path) -> None:
    token = "SeedToken0123456789abc"
    seed = {"albums": ["mainAlbum1"], "tokens": [{"token": token, "album_id": "mainAlbum1"}]}
    (tmp_path / "seed.json").write_text(json.dumps(seed))
    command = [sys.executable, "-m", "tests.kheops_server", "--port", "0"]
    process = subprocess.Popen(
        [*command, "--seed", str(tmp_path / "seed.json")],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = _await_listening_line(process, deadline=time.monotonic() + 20)
        answer = requests.post(f"{url}/api/token/introspect", data={"token": token}, timeout=10)
        assert answer.json()["album_id"] == "mainAlbum1"
        assert answer.json()["scope"] == "read write send"
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


def _await_listening_line(process: subprocess.Popen[str], deadline: float) -> str:
    """The URL the standalone server prints once it accepts connections."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if selector.select(remaining):
                line = process.stdout.readline()
                assert line, "the server exited before listening"
                if line.startswith("KHEOPS test server listening on "):
                    return line.rsplit(" ", 1)[1].strip()
    raise AssertionError("the server did not start listening in time")
