"""KheopsClient against a tiny local HTTP server that records what it receives."""

from __future__ import annotations

import json
import socket
import traceback

import pytest

from orthanc_kheops.kheops.client import (
    Introspection,
    KheopsClient,
    KheopsError,
    KheopsNotFound,
    KheopsRejected,
    KheopsUnauthorized,
    KheopsUnavailable,
    make_session,
)
from orthanc_kheops.kheops.stow import StowAnswer
from orthanc_kheops.observability.masking import Secret
from tests.recording_server import Answer, RecordingServer

TOKEN = Secret("KbSVRVsa0rTCh6D5l9JnAb")
SOURCE = Secret("See1fW5f2ZhxS6Q2nv0Xyz")
PART = b"\x00" * 128 + b"DICM" + b"a part-10 file"

STORED_ANSWER = json.dumps(
    {
        "00081199": {
            "vr": "SQ",
            "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.4.5.6"]}}],
        },
        "00081198": {
            "vr": "SQ",
            "Value": [
                {
                    "00081155": {"vr": "UI", "Value": ["1.2.3.9.9.9"]},
                    "00081197": {"vr": "US", "Value": [292]},
                }
            ],
        },
    }
).encode()


def _client(url: str, *, read_timeout: float = 10.0) -> KheopsClient:
    return KheopsClient(
        url,
        session=make_session(pool_size=2, verify=True),
        connect_timeout=5.0,
        read_timeout=read_timeout,
    )


def _no_token_in(error: BaseException) -> None:
    text = "".join(traceback.format_exception(error))
    for secret in (TOKEN, SOURCE):
        assert secret.reveal() not in str(error)
        assert secret.reveal() not in text


# --- STOW-RS -------------------------------------------------------------------------------------


def test_stow_posts_the_multipart_body_with_the_bearer_token(server: RecordingServer) -> None:
    server.answer(Answer(202, STORED_ANSWER, "application/dicom+json"))

    answer = _client(server.url).stow(TOKEN, [PART, b"second"])

    request = server.received[0]
    assert (request.method, request.path, request.version) == ("POST", "/api/studies", "HTTP/1.1")
    assert request.headers["authorization"] == f"Bearer {TOKEN.reveal()}"
    assert request.headers["accept"] == "application/dicom+json"
    content_type = request.headers["content-type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    boundary = content_type.rsplit("boundary=", 1)[1].encode()
    assert request.body == (
        b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + PART + b"\r\n"
        b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\nsecond\r\n"
        b"--" + boundary + b"--\r\n"
    )
    # Some proxies in front of KHEOPS refuse chunked uploads: the length is always given.
    assert request.headers["content-length"] == str(len(request.body))
    assert "transfer-encoding" not in request.headers
    assert answer == StowAnswer(
        status=202,
        stored=frozenset({"1.2.3.4.5.6"}),
        failed={"1.2.3.9.9.9": 292},
        other_failures=(),
    )


def test_the_api_is_under_the_url_a_user_types(server: RecordingServer) -> None:
    server.answer(Answer(200), Answer(200))

    _client(server.url + "/").stow(TOKEN, [PART])
    _client(server.url + "/kheops").stow(TOKEN, [PART])

    assert [r.path for r in server.received] == ["/api/studies", "/kheops/api/studies"]


def test_stow_that_stored_everything_with_an_unreadable_body_counts_as_stored(
    server: RecordingServer,
) -> None:
    server.answer(Answer(200, b"<html>OK</html>", "text/html"))

    answer = _client(server.url).stow(TOKEN, [PART])

    assert answer == StowAnswer(status=200, stored=frozenset(), failed={}, other_failures=())


@pytest.mark.parametrize("status", [202, 409])
def test_stow_partial_answer_with_an_unreadable_body_is_retried(
    server: RecordingServer, status: int
) -> None:
    server.answer(Answer(status, b"{truncated"))

    with pytest.raises(KheopsUnavailable, match=f"STOW-RS answered {status} with an unreadable"):
        _client(server.url).stow(TOKEN, [PART])


def test_stow_409_is_an_answer_naming_the_refused_instances(server: RecordingServer) -> None:
    body = json.dumps(
        {
            "00081198": {
                "vr": "SQ",
                "Value": [
                    {
                        "00081155": {"vr": "UI", "Value": ["1.2"]},
                        "00081197": {"vr": "US", "Value": [262]},
                    }
                ],
            }
        }
    ).encode()
    server.answer(Answer(409, body, "application/dicom+json"))

    assert _client(server.url).stow(TOKEN, [PART]).failed == {"1.2": 262}


STATUSES = [
    (500, KheopsUnavailable),
    (502, KheopsUnavailable),
    (503, KheopsUnavailable),
    (504, KheopsUnavailable),
    (429, KheopsUnavailable),
    (408, KheopsUnavailable),
    (401, KheopsUnauthorized),
    (403, KheopsUnauthorized),
    (404, KheopsNotFound),
    (400, KheopsRejected),
    (413, KheopsRejected),
    (415, KheopsRejected),
]


@pytest.mark.parametrize(("status", "kind"), STATUSES)
def test_stow_error_statuses_map_to_what_the_plugin_should_do(
    server: RecordingServer, status: int, kind: type[KheopsError]
) -> None:
    server.answer(Answer(status, b"Authorization is not valid for posting", "text/plain"))

    with pytest.raises(KheopsError) as caught:
        _client(server.url).stow(TOKEN, [PART])

    assert type(caught.value) is kind
    assert caught.value.status == status
    assert str(caught.value) == (
        f"STOW-RS: KHEOPS answered {status} (Authorization is not valid for posting)"
    )
    _no_token_in(caught.value)


def test_retryable_and_permanent_errors_are_told_apart_by_type() -> None:
    assert issubclass(KheopsUnauthorized, KheopsRejected)
    assert issubclass(KheopsNotFound, KheopsRejected)
    assert not issubclass(KheopsUnavailable, KheopsRejected)


def test_a_json_error_body_is_summarised_by_its_message_and_detail(
    server: RecordingServer,
) -> None:
    body = {"message": "Authorization error", "detail": "No write access with this credential"}
    server.answer(Answer(403, json.dumps(body).encode()))

    with pytest.raises(KheopsUnauthorized) as caught:
        _client(server.url).stow(TOKEN, [PART])

    assert str(caught.value) == (
        "STOW-RS: KHEOPS answered 403 (Authorization error: No write access with this credential)"
    )


def test_an_empty_error_body_gives_the_status_alone(server: RecordingServer) -> None:
    server.answer(Answer(503))

    with pytest.raises(KheopsUnavailable) as caught:
        _client(server.url).stow(TOKEN, [PART])

    assert str(caught.value) == "STOW-RS: KHEOPS answered 503"


def test_a_long_error_body_is_cut_short(server: RecordingServer) -> None:
    server.answer(Answer(400, b"x" * 5000, "text/plain"))

    with pytest.raises(KheopsRejected) as caught:
        _client(server.url).stow(TOKEN, [PART])

    assert len(str(caught.value)) < 300


@pytest.mark.parametrize(
    "body",
    [
        b"invalid token KbSVRVsa0rTCh6D5l9JnAb",
        json.dumps({"message": "Unauthorized", "detail": "token KbSVRVsa0rTCh6D5l9JnAb"}).encode(),
    ],
    ids=["text", "json"],
)
def test_a_token_echoed_by_the_server_is_masked_in_the_error(
    server: RecordingServer, body: bytes
) -> None:
    server.answer(Answer(401, body))

    with pytest.raises(KheopsUnauthorized) as caught:
        _client(server.url).stow(TOKEN, [PART])

    _no_token_in(caught.value)
    assert TOKEN.masked in str(caught.value)


# --- failures without an answer ------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_connection_refused_is_kheops_unavailable() -> None:
    client = _client(f"http://127.0.0.1:{_closed_port()}")

    with pytest.raises(KheopsUnavailable) as caught:
        client.stow(TOKEN, [PART])

    assert str(caught.value).startswith("STOW-RS: cannot reach KHEOPS (")
    assert caught.value.status is None
    _no_token_in(caught.value)


def test_a_connection_dropped_without_an_answer_is_kheops_unavailable(
    server: RecordingServer,
) -> None:
    server.answer(Answer(0, drop=True))

    with pytest.raises(KheopsUnavailable) as caught:
        _client(server.url).stow(TOKEN, [PART])

    assert str(caught.value).startswith("STOW-RS: cannot reach KHEOPS (")
    _no_token_in(caught.value)


def test_a_server_that_never_answers_is_kheops_unavailable() -> None:
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        client = _client(f"http://127.0.0.1:{port}", read_timeout=0.2)

        with pytest.raises(KheopsUnavailable) as caught:
            client.introspect(TOKEN)

    assert str(caught.value) == "token introspection: KHEOPS did not answer in time"
    _no_token_in(caught.value)


# --- introspection -------------------------------------------------------------------------------


def test_introspection_posts_the_token_as_a_form_without_authorization(
    server: RecordingServer,
) -> None:
    server.answer(Answer(200, b'{"active": false}'))

    _client(server.url).introspect(TOKEN)

    request = server.received[0]
    assert (request.method, request.path) == ("POST", "/api/token/introspect")
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert "authorization" not in request.headers
    assert request.body == f"token={TOKEN.reveal()}".encode()


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            {
                "active": True,
                "sub": "c2fd0b66",
                "scope": "read write send",
                "cap_token": "KbSVRVsa0r",
                "album_id": "hx7S6Q2nv0",
            },
            Introspection(True, frozenset({"read", "write", "send"}), "hx7S6Q2nv0"),
        ),
        (
            {"album_id": "hx7S6Q2nv0", "scope": "write", "active": True, "sub": "c2fd0b66"},
            Introspection(True, frozenset({"write"}), "hx7S6Q2nv0"),
        ),
        (
            {"active": True, "scope": "user read write downloadbutton send", "cap_token": "x"},
            Introspection(
                True, frozenset({"user", "read", "write", "downloadbutton", "send"}), None
            ),
        ),
        (
            {"active": True, "album_id": "hx7S6Q2nv0"},
            Introspection(True, frozenset(), "hx7S6Q2nv0"),
        ),
        ({"active": False}, Introspection(False, frozenset(), None)),
        ({"active": "true", "scope": "write"}, Introspection(False, frozenset({"write"}), None)),
        (
            {"active": True, "scope": "writer", "album_id": ""},
            Introspection(True, frozenset({"writer"}), None),
        ),
    ],
    ids=["album-all", "album-write", "user", "no-scope", "inactive", "active-string", "writer"],
)
def test_introspection_answers_are_parsed_not_matched(
    server: RecordingServer, document: dict[str, object], expected: Introspection
) -> None:
    server.answer(Answer(200, json.dumps(document).encode()))

    introspection = _client(server.url).introspect(TOKEN)

    assert introspection == expected
    assert not introspection.can("write") or "write" in introspection.scopes


def test_introspection_describes_the_token_for_the_log() -> None:
    album = Introspection(True, frozenset({"write", "read"}), "hx7S6Q2nv0")
    user = Introspection(True, frozenset(), None)

    assert album.describe() == "album hx7S6Q2nv0, read write"
    assert user.describe() == "user token (no album), no permission"
    assert Introspection(False, frozenset(), None).describe().startswith("inactive")
    assert album.is_album_token and not user.is_album_token
    assert album.can("read", "write") and not album.can("send")


@pytest.mark.parametrize("body", [b"<html>", b"[1, 2]"], ids=["not-json", "not-object"])
def test_introspection_answer_that_is_not_a_json_object_is_retried(
    server: RecordingServer, body: bytes
) -> None:
    server.answer(Answer(200, body))

    with pytest.raises(KheopsUnavailable, match="token introspection answered"):
        _client(server.url).introspect(TOKEN)


@pytest.mark.parametrize(("status", "kind"), STATUSES)
def test_introspection_error_statuses_map_like_stow(
    server: RecordingServer, status: int, kind: type[KheopsError]
) -> None:
    server.answer(Answer(status, b"{}"))

    with pytest.raises(KheopsError) as caught:
        _client(server.url).introspect(TOKEN)

    assert type(caught.value) is kind
    assert str(caught.value).startswith(f"token introspection: KHEOPS answered {status}")
    _no_token_in(caught.value)


# --- sharing -------------------------------------------------------------------------------------


def test_share_puts_the_series_with_both_tokens(server: RecordingServer) -> None:
    server.answer(Answer(201))

    _client(server.url).share_series(
        destination=TOKEN, source=SOURCE, study_uid="1.2.3", series_uid="1.2.3.4"
    )

    request = server.received[0]
    assert (request.method, request.path, request.body) == (
        "PUT",
        "/api/studies/1.2.3/series/1.2.3.4",
        b"",
    )
    assert request.headers["authorization"] == f"Bearer {TOKEN.reveal()}"
    assert request.headers["x-authorization-source"] == f"Bearer {SOURCE.reveal()}"


@pytest.mark.parametrize(
    ("study", "series"),
    [("1.2.3", "1.2.3.4#x"), ("1.2.3/../../../x", "1.2.3.4"), ("1.2..3", "1.2"), ("1.2", "9" * 65)],
)
def test_a_share_of_uids_kheops_routes_cannot_carry_sends_nothing(
    server: RecordingServer, study: str, series: str
) -> None:
    with pytest.raises(KheopsRejected, match="is not a DICOM UID|more than the 64"):
        _client(server.url).share_series(
            destination=TOKEN, source=SOURCE, study_uid=study, series_uid=series
        )

    assert server.received == []


@pytest.mark.parametrize(
    ("status", "kind"),
    [(404, KheopsNotFound), (403, KheopsUnauthorized), (401, KheopsUnauthorized)],
)
def test_share_errors_keep_both_tokens_out_of_the_message(
    server: RecordingServer, status: int, kind: type[KheopsError]
) -> None:
    echoed = f"source {SOURCE.reveal()} destination {TOKEN.reveal()}"
    server.answer(
        Answer(status, json.dumps({"message": "Series Not Found", "detail": echoed}).encode())
    )

    with pytest.raises(KheopsError) as caught:
        _client(server.url).share_series(
            destination=TOKEN, source=SOURCE, study_uid="1.2.3", series_uid="1.2.3.4"
        )

    assert type(caught.value) is kind
    assert str(caught.value).startswith(f"share: KHEOPS answered {status} (Series Not Found: ")
    _no_token_in(caught.value)
