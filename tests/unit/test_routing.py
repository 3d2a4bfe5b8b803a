"""The plugin's REST routes as plain values: routing, errors as JSON, request bodies."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

import pytest

from orthanc_kheops.state.errors import StoreUnavailable
from orthanc_kheops.web.routing import (
    MAXIMUM_BODY_BYTES,
    HttpError,
    Request,
    Response,
    Router,
    json_object,
    nesting_depth,
    string_list,
)


def _echo(request: Request, groups: Sequence[str]) -> Response:
    return Response(200, {"Method": request.method, "Groups": list(groups)})


def _router() -> Router:
    router = Router()
    router.add("GET", "status", _echo)
    router.add("GET", r"queue/([^/]+)", _echo)
    router.add("POST", r"queue/([^/]+)", _echo)
    router.add("DELETE", r"queue/([^/]+)", _echo)
    return router


def test_a_route_gets_its_groups() -> None:
    response = _router().handle(Request("POST", "queue/abc"))

    assert response == Response(200, {"Method": "POST", "Groups": ["abc"]})


def test_routes_match_the_whole_path() -> None:
    router = _router()

    assert router.handle(Request("GET", "status/more")).status == 404
    assert router.handle(Request("GET", "xstatus")).status == 404


def test_an_unknown_route_is_a_404_naming_it() -> None:
    response = _router().handle(Request("GET", "nowhere"))

    assert response.status == 404
    assert response.body == {
        "HttpStatus": 404,
        "Message": "no route GET /kheops/nowhere",
        "Field": "path",
    }


def test_a_known_route_with_another_method_is_a_405_listing_the_allowed_ones() -> None:
    router = _router()

    assert router.handle(Request("PUT", "queue/abc")) == Response(
        405, allowed=("DELETE", "GET", "POST")
    )
    assert router.handle(Request("POST", "status")).allowed == ("GET",)


def test_an_http_error_becomes_a_json_body_naming_the_field() -> None:
    def handler(request: Request, groups: Sequence[str]) -> Response:
        raise HttpError(400, "limit: 'x' is not a whole number", field="limit")

    router = Router()
    router.add("GET", "queue", handler)

    response = router.handle(Request("GET", "queue"))

    assert response.status == 400
    assert json.loads(response.encoded()) == {
        "HttpStatus": 400,
        "Message": "limit: 'x' is not a whole number",
        "Field": "limit",
    }


def test_an_http_error_without_a_field_has_no_field_key() -> None:
    assert HttpError(503, "Orthanc did not answer").response().body == {
        "HttpStatus": 503,
        "Message": "Orthanc did not answer",
    }


def test_an_unexpected_exception_is_left_to_the_shell() -> None:
    def handler(request: Request, groups: Sequence[str]) -> Response:
        raise RuntimeError("bug")

    router = Router()
    router.add("GET", "status", handler)

    with pytest.raises(RuntimeError):
        router.handle(Request("GET", "status"))


def _body_route(request: Request, groups: Sequence[str]) -> Response:
    document = json_object(request)
    return Response(200, {"Ids": string_list(document, "Instances", required=False)})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "the body is not valid JSON"),
        (b"[1, 2]", "the body must be a JSON object"),
        (b'"text"', "the body must be a JSON object"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_a_400(body: bytes, message: str) -> None:
    router = Router()
    router.add("POST", "retry", _body_route)

    response = router.handle(Request("POST", "retry", body=body))

    assert response.status == 400
    assert isinstance(response.body, dict)
    assert str(response.body["Message"]).startswith(message)


@pytest.mark.parametrize("body", [b"", b"  \n"], ids=["empty", "blank"])
def test_an_empty_body_reads_as_an_empty_object(body: bytes) -> None:
    assert Request("POST", "retry", body=body).json() == {}


def test_a_list_of_ids_is_read() -> None:
    assert string_list({"Instances": ["a", "b"]}, "Instances", required=True) == ["a", "b"]
    assert string_list({}, "Instances", required=False) is None


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "Resources: is required (a list of Orthanc ids)"),
        ({"Resources": None}, "Resources: is required (a list of Orthanc ids)"),
        ({"Resources": "abc"}, "Resources: must be a list of Orthanc ids (strings)"),
        ({"Resources": ["a", 3]}, "Resources: must be a list of Orthanc ids (strings)"),
        ({"Resources": ["a", ""]}, "Resources: must be a list of Orthanc ids (strings)"),
    ],
)
def test_a_wrong_list_of_ids_names_the_field(document: dict[str, object], message: str) -> None:
    with pytest.raises(HttpError) as caught:
        string_list(document, "Resources", required=True)

    assert (caught.value.status, caught.value.message, caught.value.field) == (
        400,
        message,
        "Resources",
    )


def test_responses_are_encoded_as_utf8_json() -> None:
    assert Response(200, {"Name": "Zoë"}).encoded() == '{\n  "Name": "Zoë"\n}'.encode()


@pytest.mark.parametrize(
    "error",
    [
        sqlite3.OperationalError("database or disk is full"),
        StoreUnavailable("state database: database or disk is full"),  # either back-end
    ],
)
def test_a_state_that_cannot_be_written_is_a_503_with_the_cause(error: Exception) -> None:
    def handler(request: Request, groups: Sequence[str]) -> Response:
        raise error

    router = Router()
    router.add("POST", "rules", handler)

    response = router.handle(Request("POST", "rules", body=b"{}"))

    assert response.status == 503
    assert isinstance(response.body, dict)
    assert "database or disk is full" in str(response.body["Message"])


def test_a_store_that_is_unavailable_is_a_503_whatever_the_back_end() -> None:
    def handler(request: Request, groups: Sequence[str]) -> Response:
        raise StoreUnavailable("database or disk is full")

    router = Router()
    router.add("POST", "send", handler)

    response = router.handle(Request("POST", "send", body=b"{}"))

    assert response.status == 503
    assert isinstance(response.body, dict)
    assert "cannot be written now" in str(response.body["Message"])


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"[" * 65 + b"]" * 65, 400, "deeper than 64 levels"),
        (b'{"a": "' + b"x" * MAXIMUM_BODY_BYTES + b'"}', 413, "at most 1048576"),
    ],
    ids=["deep", "huge"],
)
def test_a_body_past_the_limits_is_refused_before_it_is_parsed(
    body: bytes, status: int, words: str
) -> None:
    with pytest.raises(HttpError) as caught:
        Request("POST", "send", body=body).json()

    assert (caught.value.status, caught.value.field) == (status, "body")
    assert words in caught.value.message


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    assert nesting_depth(b'{"a": "[[[[\\"[[[[", "b": [1]}') == 2


def test_a_lone_surrogate_is_a_400_naming_its_field() -> None:
    with pytest.raises(HttpError) as caught:
        Request("POST", "rules", body=b'{"Rule": {"Condition": "\\ud800"}}').json()

    assert (caught.value.status, caught.value.field) == (400, "Rule.Condition")


def test_a_reply_never_shows_a_value_sent_under_a_token_key_nor_a_known_token() -> None:
    def handler(request: Request, groups: Sequence[str]) -> Response:
        raise HttpError(400, f"Condition: {request.json()}", field="Condition")

    router = Router(redact=lambda text: text.replace("KnownToken123", "Know…23"))
    router.add("POST", "rules", handler)

    reply = router.reply(
        Request(
            "POST", "rules", body=b'{"DestinationToken": "Secret0123456", "X": "KnownToken123"}'
        )
    )

    body = reply.encoded()
    assert b"Secret0123456" not in body and b"KnownToken123" not in body
    assert reply.status == 400


def test_a_token_that_reads_like_a_key_of_the_answer_leaves_its_shape_alone() -> None:
    def handler(request: Request, groups: Sequence[str]) -> Response:
        raise HttpError(404, "no rule named 'x'; Message sent", field="Name")

    router = Router()
    router.add("PUT", "rules/x", handler)

    reply = router.reply(Request("PUT", "rules/x", body=b'{"DestinationToken": "Message"}'))

    assert json.loads(reply.encoded()) == {
        "HttpStatus": 404,
        "Message": "no rule named 'x'; (hidden) sent",
        "Field": "Name",
    }


def test_an_unexpected_error_is_a_500_without_its_text() -> None:
    def handler(request: Request, groups: Sequence[str]) -> Response:
        raise RuntimeError("secret detail")

    router = Router()
    router.add("GET", "status", handler)

    reply = router.reply(Request("GET", "status"))

    assert reply.status == 500 and b"secret detail" not in reply.encoded()


def test_text_utf8_cannot_carry_is_escaped_not_a_crash() -> None:
    """A rule saved by an older version with a lone surrogate must not make GET /rules a 500."""
    encoded = Response(200, {"Condition": "x\ud800"}).encoded()

    assert json.loads(encoded) == {"Condition": "x\ud800"}
