"""The KHEOPS test server's faults of what stands in front of KHEOPS (redirects, html pages) and
its per-instance reasons, met by the plugin's real KheopsClient."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from pydicom.uid import generate_uid

from orthanc_kheops.kheops.client import (
    KheopsBadAnswer,
    KheopsClient,
    KheopsRedirected,
    make_session,
)
from orthanc_kheops.kheops.stow import Verdict, judge
from orthanc_kheops.observability.masking import Secret
from tests.kheops_server import KheopsTestServer
from tests.unit.test_kheops_server import dicom_file


@pytest.fixture
def front() -> Iterator[KheopsTestServer]:
    """The server at Kheops.Url: it redirects or answers html when told to."""
    with KheopsTestServer() as running:
        yield running


@pytest.fixture
def target() -> Iterator[KheopsTestServer]:
    """Another host, where redirects point: it must never receive a request."""
    with KheopsTestServer() as running:
        yield running
        assert running.requests == [], "a request reached the host a redirect named"


def _client(server: KheopsTestServer) -> KheopsClient:
    return KheopsClient(
        server.url,
        session=make_session(url=server.url, pool_size=1, verify=True),
        connect_timeout=5,
        read_timeout=10,
    )


def _album(server: KheopsTestServer) -> tuple[str, Secret]:
    album = server.add_album()
    return album, Secret(server.add_token(album_id=album))


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_front_that_redirects_to_another_host_gets_one_request_and_the_other_host_none(
    front: KheopsTestServer, target: KheopsTestServer, status: int
) -> None:
    album, token = _album(front)
    target_token = target.add_token(album_id=target.add_album())
    front.set_redirect(status, target.url)
    client = _client(front)
    study = generate_uid()

    with pytest.raises(KheopsRedirected) as stow:
        client.stow(token, [dicom_file(study, generate_uid(), generate_uid())])
    with pytest.raises(KheopsRedirected):
        client.introspect(token)
    with pytest.raises(KheopsRedirected):
        client.share_series(
            destination=token, source=Secret(target_token), study_uid=study, series_uid="1.2"
        )

    assert [r.status for r in front.requests] == [status] * 3
    assert stow.value.location == f"{target.url}/api/studies"
    assert str(stow.value).endswith(f"set Kheops.Url to {target.url}")
    assert front.album_instances(album) == set()


def test_a_redirect_to_a_login_page_says_it_leads_away_from_the_api(
    front: KheopsTestServer,
) -> None:
    _, token = _album(front)
    front.set_redirect(302, "https://sso.example.org/login", keep_path=False)

    with pytest.raises(KheopsRedirected) as caught:
        _client(front).stow(token, [dicom_file(generate_uid(), generate_uid(), generate_uid())])

    assert caught.value.location == "https://sso.example.org/login"
    assert "a login page?" in str(caught.value)


def test_an_html_front_answers_are_not_kheops_answers(front: KheopsTestServer) -> None:
    _, token = _album(front)
    front.set_html(True)
    client = _client(front)

    with pytest.raises(KheopsBadAnswer, match="200 text/html"):
        client.stow(token, [dicom_file(generate_uid(), generate_uid(), generate_uid())])
    with pytest.raises(KheopsBadAnswer, match="200 text/html"):
        client.introspect(token)
    with pytest.raises(KheopsBadAnswer, match="not 201 Created"):
        client.share_series(destination=token, source=token, study_uid="1.2", series_uid="1.3")


def test_the_front_is_gone_once_the_faults_are_reset(front: KheopsTestServer) -> None:
    album, token = _album(front)
    front.set_redirect(301, "https://elsewhere")
    front.reset_faults()
    sop = generate_uid()

    answer = _client(front).stow(token, [dicom_file(generate_uid(), generate_uid(), sop)])

    assert answer.stored == {sop}
    assert front.album_instances(album) == {sop}


@pytest.mark.parametrize("reason", [0xA700, 0xA900, 0xC000, 0xC122, 0x0122, 12345, None])
def test_scripted_per_instance_reasons_are_answered_in_the_failed_sequence(
    front: KheopsTestServer, reason: int | None
) -> None:
    album, token = _album(front)
    study, series = generate_uid(), generate_uid()
    good, bad = generate_uid(), generate_uid()
    front.refuse_instances([bad], reason)

    answer = _client(front).stow(
        token, [dicom_file(study, series, good), dicom_file(study, series, bad)]
    )

    assert answer.status == 202
    assert answer.stored == {good}
    assert answer.failed == {bad: reason}
    assert front.album_instances(album) == {good}
    verdicts = judge([good, bad], answer)
    assert verdicts[good].verdict is Verdict.SENT
    assert verdicts[bad].verdict is not Verdict.SENT


def test_the_faults_have_control_routes(front: KheopsTestServer) -> None:
    _, token = _album(front)
    sop = generate_uid()
    with requests.Session() as http:
        for method, path, body in [
            ("PUT", "/redirect", {"status": 307, "location": "https://x"}),
            ("PUT", "/redirect", {"status": None}),
            ("PUT", "/html", {"html": False}),
            ("POST", "/refuse_instances", {"sop_uids": [sop], "reason": 43264}),
        ]:
            answer = http.request(method, f"{front.url}/_test/faults{path}", json=body, timeout=10)
            assert answer.status_code == 204, answer.text

    stow = _client(front).stow(token, [dicom_file(generate_uid(), generate_uid(), sop)])

    assert stow.failed == {sop: 43264}
