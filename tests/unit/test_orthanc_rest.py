"""OrthancRest, the workers' loopback client, against a tiny local HTTP server."""

from __future__ import annotations

import json
import socket

import pytest

from orthanc_kheops.observability.masking import Secret
from orthanc_kheops.orthanc_rest import (
    Change,
    OrthancNotFound,
    OrthancRest,
    OrthancUnavailable,
    StoredInstance,
)
from tests.recording_server import Answer, RecordingServer

AUTHORIZATION = Secret("Bearer 6c1b5a6e-orthanc-generated")
FILE = b"\x00" * 128 + b"DICM" + bytes(range(256)) * 64


def _client(url: str, timeout: float = 10.0) -> OrthancRest:
    return OrthancRest(url, authorization=AUTHORIZATION, pool_size=2, timeout=timeout)


def _json(document: object) -> Answer:
    return Answer(200, json.dumps(document).encode())


def test_read_file_gets_the_file_with_orthancs_token_and_without_compression(
    server: RecordingServer,
) -> None:
    server.answer(Answer(200, FILE, "application/dicom"))

    data = _client(server.url).read_file("abc-123")

    assert data == FILE
    request = server.received[0]
    assert (request.method, request.path) == ("GET", "/instances/abc-123/file")
    assert request.headers["authorization"] == AUTHORIZATION.reveal()
    assert request.headers["accept-encoding"] == "identity"


def test_requests_reuse_one_connection(server: RecordingServer) -> None:
    server.answer(*[Answer(200, FILE, "application/dicom")] * 3)
    client = _client(server.url)

    for _ in range(3):
        client.read_file("abc-123")

    assert len({r.client_port for r in server.received}) == 1


def test_an_orthanc_url_with_a_path_keeps_it(server: RecordingServer) -> None:
    server.answer(Answer(200, FILE, "application/dicom"))

    _client(f"{server.url}/orthanc/").read_file("abc-123")

    assert server.received[0].path == "/orthanc/instances/abc-123/file"


def test_an_unknown_id_is_not_found(server: RecordingServer) -> None:
    server.answer(Answer(404, b'{"Message": "Unknown resource"}'))

    with pytest.raises(OrthancNotFound, match="/instances/gone/file"):
        _client(server.url).read_file("gone")


@pytest.mark.parametrize("status", [500, 503])
def test_other_statuses_mean_orthanc_is_unavailable_for_now(
    server: RecordingServer, status: int
) -> None:
    server.answer(Answer(status, b"{}"))

    with pytest.raises(OrthancUnavailable, match=f"HTTP {status}"):
        _client(server.url).read_file("abc-123")


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_say_that_orthanc_url_must_be_this_orthanc(
    server: RecordingServer, status: int
) -> None:
    server.answer(Answer(status, b"{}"))

    with pytest.raises(OrthancUnavailable) as caught:
        _client(server.url).read_file("abc-123")

    assert str(caught.value) == (
        f"Orthanc's REST API at {server.url} refuses the plugin ({status}):"
        " Kheops.OrthancUrl must be this Orthanc's own address"
    )


def test_a_closed_port_names_the_url_and_the_setting() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with pytest.raises(OrthancUnavailable) as caught:
        _client(f"http://127.0.0.1:{port}").read_file("abc-123")

    assert str(caught.value) == (
        f"cannot reach Orthanc's REST API at http://127.0.0.1:{port} (ConnectionRefusedError):"
        " check Kheops.OrthancUrl"
    )


def test_check_api_passes_when_system_answers(server: RecordingServer) -> None:
    server.answer(Answer(200, b"{}"))

    _client(server.url + "/orthanc").check_api()  # so an instance that answers 404 is gone

    assert [r.path for r in server.received] == ["/orthanc/system"]


def test_check_api_raises_when_system_is_not_found(server: RecordingServer) -> None:
    server.answer(Answer(404, b"{}"))

    with pytest.raises(OrthancUnavailable) as caught:
        _client(server.url + "/wrong").check_api()

    assert str(caught.value) == (
        f"Orthanc's REST API is not at {server.url}/wrong: /system answered 404"
        " (check Kheops.OrthancUrl and its path)"
    )


def test_an_answer_that_is_not_json_means_orthanc_is_unavailable(
    server: RecordingServer,
) -> None:
    server.answer(Answer(200, b"<html>proxy error</html>", "text/html"))

    with pytest.raises(OrthancUnavailable, match="not JSON"):
        _client(server.url).last_change()


def test_a_closed_port_means_orthanc_is_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with pytest.raises(OrthancUnavailable) as caught:
        _client(f"http://127.0.0.1:{port}").read_file("abc-123")

    assert AUTHORIZATION.reveal() not in str(caught.value)


def test_a_connection_dropped_once_is_tried_again(server: RecordingServer) -> None:
    server.answer(Answer(200, drop=True), Answer(200, FILE, "application/dicom"))

    assert _client(server.url).read_file("abc-123") == FILE
    assert len(server.received) == 2


def test_a_connection_dropped_twice_means_orthanc_is_unavailable(server: RecordingServer) -> None:
    server.answer(Answer(200, drop=True), Answer(200, drop=True))

    with pytest.raises(OrthancUnavailable):
        _client(server.url).read_file("abc-123")


def test_changes_are_read_from_a_sequence_number_on(server: RecordingServer) -> None:
    server.answer(
        _json(
            {
                "Changes": [
                    {"Seq": 8, "ChangeType": "NewInstance", "ID": "i-1"},
                    {"Seq": 9, "ChangeType": "NewSeries", "ID": "s-1"},
                ],
                "Last": 9,
                "Done": True,
            }
        )
    )

    page = _client(server.url).changes(7, limit=100)

    assert server.received[0].path in ("/changes?since=7&limit=100", "/changes?limit=100&since=7")
    assert page.changes == (Change(8, "NewInstance", "i-1"), Change(9, "NewSeries", "s-1"))
    assert (page.last, page.done) == (9, True)


def test_the_last_change_is_asked_for_with_last(server: RecordingServer) -> None:
    server.answer(_json({"Changes": [], "Last": 42, "Done": True}))

    assert _client(server.url).last_change() == 42
    assert server.received[0].path == "/changes?last="


def test_instances_of_a_series_come_with_their_sizes(server: RecordingServer) -> None:
    server.answer(_json([{"ID": "i-1", "FileSize": 1234}, {"ID": "i-2"}]))

    found = _client(server.url).instances_of("series", "s-1")

    assert server.received[0].path == "/series/s-1/instances"
    assert found == [StoredInstance("i-1", 1234), StoredInstance("i-2", 0)]


def test_the_level_of_an_id_is_the_first_level_that_knows_it(server: RecordingServer) -> None:
    server.answer(Answer(404, b"{}"), _json({"ID": "st-1"}))

    assert _client(server.url).resource_level("st-1") == "studies"
    assert [r.path for r in server.received] == ["/patients/st-1", "/studies/st-1"]
