"""KheopsClient against a tiny local HTTP server that records what it receives."""

from __future__ import annotations

import email.utils
import json
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orthanc_kheops.kheops.client import (
    Introspection,
    KheopsBadAnswer,
    KheopsClient,
    KheopsError,
    KheopsNotFound,
    KheopsRedirected,
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
        session=make_session(url=url, pool_size=2, verify=True),
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


def test_a_netrc_entry_for_the_host_does_not_replace_the_token(
    server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password other\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    server.answer(Answer(202, STORED_ANSWER, "application/dicom+json"))

    _client(server.url).stow(TOKEN, [PART])

    assert server.received[0].headers["authorization"] == f"Bearer {TOKEN.reveal()}"


def test_a_proxy_set_in_the_environment_is_used_for_kheops_unless_no_proxy_names_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    proxied = make_session(url="https://kheops.example", pool_size=1, verify=True)
    monkeypatch.setenv("NO_PROXY", "kheops.example")
    direct = make_session(url="https://kheops.example", pool_size=1, verify=True)

    assert proxied.proxies.get("https") == "http://proxy.example:3128"
    assert "https" not in direct.proxies


def test_the_api_is_under_the_url_a_user_types(server: RecordingServer) -> None:
    server.answer(Answer(200, STORED_ANSWER), Answer(200, STORED_ANSWER))

    _client(server.url + "/").stow(TOKEN, [PART])
    _client(server.url + "/kheops").stow(TOKEN, [PART])

    assert [r.path for r in server.received] == ["/api/studies", "/kheops/api/studies"]


@pytest.mark.parametrize("status", [200, 202, 409])
def test_stow_answered_by_an_html_page_is_not_a_stow_answer_and_says_what_came_back(
    server: RecordingServer, status: int
) -> None:
    server.answer(Answer(status, b"<html>Welcome</html>", "text/html; charset=utf-8"))

    with pytest.raises(KheopsBadAnswer) as caught:
        _client(server.url).stow(TOKEN, [PART])

    assert isinstance(caught.value, KheopsUnavailable)  # retried with backoff
    assert caught.value.status == status
    assert str(caught.value) == (
        f"KHEOPS answered {status} text/html with a body that is not JSON,"
        " not a STOW-RS response: is Kheops.Url the KHEOPS root?"
    )


@pytest.mark.parametrize(
    ("body", "content_type", "words"),
    [
        (b'{"status": "ok"}', "application/json", "JSON that is not DICOM JSON (keys 'status')"),
        (b"[]", "application/dicom+json", "JSON that is not an object (a list)"),
        (b"", "application/dicom+json", "an empty body"),
        (b"{truncated", "application/dicom+json", "a body that is not JSON"),
    ],
    ids=["json-of-another-shape", "json-list", "empty", "truncated"],
)
def test_stow_answered_with_json_of_the_wrong_shape_is_not_a_stow_answer(
    server: RecordingServer, body: bytes, content_type: str, words: str
) -> None:
    server.answer(Answer(200, body, content_type))

    with pytest.raises(KheopsBadAnswer) as caught:
        _client(server.url).stow(TOKEN, [PART])

    assert str(caught.value).startswith(f"KHEOPS answered 200 {content_type} with {words},")


def test_dicom_json_sent_as_plain_json_is_still_read_as_a_stow_answer(
    server: RecordingServer,
) -> None:
    server.answer(Answer(202, STORED_ANSWER, "application/json"))

    assert _client(server.url).stow(TOKEN, [PART]).stored == frozenset({"1.2.3.4.5.6"})


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
        (
            {"active": True, "scope": "writer", "album_id": ""},
            Introspection(True, frozenset({"writer"}), None),
        ),
    ],
    ids=["album-all", "album-write", "user", "no-scope", "inactive", "writer"],
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


@pytest.mark.parametrize(
    "body",
    [b"<html>", b"[1, 2]", b'{"status": "ok"}', b'{"active": "true", "scope": "write"}'],
    ids=["not-json", "not-object", "no-active", "active-string"],
)
def test_introspection_answer_of_another_shape_is_retried(
    server: RecordingServer, body: bytes
) -> None:
    server.answer(Answer(200, body))

    with pytest.raises(KheopsBadAnswer, match="token introspection answered"):
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


@pytest.mark.parametrize("status", [200, 204])
def test_share_answered_by_anything_but_201_is_not_a_share(
    server: RecordingServer, status: int
) -> None:
    server.answer(Answer(status, b"<html>portal</html>" if status == 200 else b"", "text/html"))

    if status == 204:
        _client(server.url).share_series(
            destination=TOKEN, source=SOURCE, study_uid="1.2.3", series_uid="1.2.3.4"
        )
        return
    with pytest.raises(KheopsBadAnswer, match="share: KHEOPS answered 200 text/html, not 201"):
        _client(server.url).share_series(
            destination=TOKEN, source=SOURCE, study_uid="1.2.3", series_uid="1.2.3.4"
        )


# --- redirects: never followed -------------------------------------------------------------------

REDIRECTS = [301, 302, 303, 307, 308]


@pytest.fixture
def other_host() -> Iterator[RecordingServer]:
    """Where a redirect points: must never receive anything."""
    other = RecordingServer()
    yield other
    other.close()
    assert other.received == [], "a request reached the host the redirect named"


def _calls(client: KheopsClient) -> dict[str, Callable[[], object]]:
    return {
        "stow": lambda: client.stow(TOKEN, [PART]),
        "introspect": lambda: client.introspect(TOKEN),
        "share": lambda: client.share_series(
            destination=TOKEN, source=SOURCE, study_uid="1.2.3", series_uid="1.2.3.4"
        ),
    }


@pytest.mark.parametrize("call", ["stow", "introspect", "share"])
@pytest.mark.parametrize("status", REDIRECTS)
def test_a_redirect_to_another_host_is_not_followed_and_nothing_reaches_that_host(
    server: RecordingServer, other_host: RecordingServer, status: int, call: str
) -> None:
    target = other_host.url.replace("127.0.0.1", "localhost")
    server.answer(Answer(status, b"", "text/html", headers=(("Location", f"{target}/login"),)))

    with pytest.raises(KheopsRedirected) as caught:
        _calls(_client(server.url))[call]()

    assert len(server.received) == 1
    assert caught.value.status == status
    assert caught.value.location == f"{target}/login"
    assert f"redirects ({status}) to {target}/login" in str(caught.value)
    assert "a login page?" in str(caught.value)
    assert not isinstance(caught.value, KheopsRejected | KheopsUnavailable)
    _no_token_in(caught.value)


@pytest.mark.parametrize("status", REDIRECTS)
def test_a_redirect_from_http_to_https_says_what_to_set_the_url_to(
    server: RecordingServer, status: int
) -> None:
    https = server.url.replace("http://", "https://") + "/kheops"
    server.answer(Answer(status, b"", "text/html", headers=(("Location", f"{https}/api/studies"),)))

    with pytest.raises(KheopsRedirected) as caught:
        _client(server.url + "/kheops").stow(TOKEN, [PART])

    assert str(caught.value) == (
        f"STOW-RS: {server.url}/kheops redirects ({status}) to {https}/api/studies; KHEOPS never"
        f" redirects its API and the plugin does not follow: set Kheops.Url to {https}"
    )
    assert len(server.received) == 1


@pytest.mark.parametrize("status", REDIRECTS)
def test_a_redirect_within_the_same_host_is_not_followed_either(
    server: RecordingServer, status: int
) -> None:
    server.answer(Answer(status, b"", "text/html", headers=(("Location", "/sso/login?next=/"),)))

    with pytest.raises(KheopsRedirected) as caught:
        _client(server.url).introspect(TOKEN)

    assert caught.value.location == f"{server.url}/sso/login?…"
    assert [r.path for r in server.received] == ["/api/token/introspect"]


def test_credentials_in_a_redirect_target_are_masked(server: RecordingServer) -> None:
    location = f"https://admin:hunter2@sso.example.org/login?token={TOKEN.reveal()}"
    server.answer(Answer(302, b"", "text/html", headers=(("Location", location),)))

    with pytest.raises(KheopsRedirected) as caught:
        _client(server.url).stow(TOKEN, [PART])

    assert caught.value.location == "https://…@sso.example.org/login?…"
    assert "hunter2" not in str(caught.value)
    _no_token_in(caught.value)


def test_a_redirect_without_a_location_is_still_a_redirect(server: RecordingServer) -> None:
    server.answer(Answer(302, b"", "text/html"))

    with pytest.raises(KheopsRedirected, match="302 without a Location"):
        _client(server.url).stow(TOKEN, [PART])


# --- Retry-After ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_in_seconds_is_kept_with_the_error(
    server: RecordingServer, status: int
) -> None:
    server.answer(Answer(status, b"", "text/plain", headers=(("Retry-After", "120"),)))

    with pytest.raises(KheopsUnavailable) as caught:
        _client(server.url).stow(TOKEN, [PART])

    assert caught.value.retry_after == 120.0


def test_retry_after_as_an_http_date_is_read_as_a_delay(server: RecordingServer) -> None:
    when = email.utils.formatdate(time.time() + 60, usegmt=True)
    server.answer(Answer(503, b"", "text/plain", headers=(("Retry-After", when),)))

    with pytest.raises(KheopsUnavailable) as caught:
        _client(server.url).stow(TOKEN, [PART])

    assert caught.value.retry_after is not None
    assert 50 < caught.value.retry_after <= 60


def test_a_503_without_retry_after_leaves_the_delay_to_the_backoff(
    server: RecordingServer,
) -> None:
    server.answer(Answer(503, b"", "text/plain", headers=(("Retry-After", "soon"),)))

    with pytest.raises(KheopsUnavailable) as caught:
        _client(server.url).stow(TOKEN, [PART])

    assert caught.value.retry_after is None
