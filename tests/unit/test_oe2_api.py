"""OE2's payloads, as its placeholders fill them, and the app's files."""

from __future__ import annotations

from pathlib import Path

import pytest

from orthanc_kheops.web.app_files import APP_FOLDER, app_file
from orthanc_kheops.web.oe2_api import resources_of
from orthanc_kheops.web.routing import HttpError


@pytest.mark.parametrize(
    ("payload", "ids"),
    [
        ("a-1", ["a-1"]),  # {UUID}
        (["a-1", "b-2"], ["a-1", "b-2"]),  # {JsonArrayUUIDs}
        ("a-1,b-2", ["a-1", "b-2"]),  # {CommaSeparatedUUIDs}
        (" a-1 , b-2 ", ["a-1", "b-2"]),
    ],
)
def test_every_shape_oe2_fills_names_the_resources(payload: object, ids: list[str]) -> None:
    assert resources_of(payload) == ids


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ([], "no study is selected"),
        ("", "no study is selected"),
        ("undefined", "does not know the placeholder"),
        (None, "must be an Orthanc id"),
        ({"ID": "a-1"}, "must be an Orthanc id"),
        (["a-1", 2], "must be an Orthanc id"),
    ],
)
def test_a_payload_that_names_nothing_usable_is_a_400_naming_resources(
    payload: object, words: str
) -> None:
    with pytest.raises(HttpError) as raised:
        resources_of(payload)
    assert raised.value.status == 400
    assert raised.value.field == "Resources"
    assert words in raised.value.message


def test_the_app_serves_its_own_files_with_their_type_and_nothing_else() -> None:
    index = app_file("index.html")
    assert index is not None
    assert index.content_type == "text/html; charset=utf-8"
    assert index.body == (APP_FOLDER / "index.html").read_bytes()
    script = app_file("app.js")
    assert script is not None
    assert script.content_type == "text/javascript; charset=utf-8"
    for name in ("", "../app_files.py", "app_files.py", "/etc/passwd", "app/index.html", "x.js"):
        assert app_file(name) is None, name


def test_a_file_of_a_type_the_app_does_not_serve_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("private")
    (tmp_path / "page.html").write_text("<p>")
    assert app_file("notes.txt", tmp_path) is None
    assert app_file("page.html", tmp_path) is not None
