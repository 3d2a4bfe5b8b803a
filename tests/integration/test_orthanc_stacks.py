"""What differs between the Orthanc stacks the plugin runs on; tools/matrix runs this on
bookworm's (Orthanc 1.10, python plugin 4.0), trixie's (1.12, 5.0) and forky's (1.13, 7.1).

Each test pins a defect one of them had: error answers that became 500 (python plugin 4.2
changed SendHttpStatus), a SIGSEGV at every shutdown (python plugin 5 released a callback after
Python had finalized) and two Content-Type headers (Orthanc 1.12.2 adds its own)."""

from __future__ import annotations

import json
import re

import pytest

from tests.orthanc_process import OrthancFactory
from tests.plugin_setup import Album, single_instance, status
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

_VERSIONS = re.compile(
    r"KHEOPS: running on Orthanc (\S+), python plugin (\S+), Python (\d+\.\d+\.\d+);"
    r" Python.AllowThreads is (on|off)"
)


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    [
        ("GET", "/kheops/études/…", None, 404),
        ("POST", "/kheops/send", b'{"Resources": ["caf\xc3\xa9"', 400),
        ("POST", "/kheops/send", json.dumps({"Resources": ["café-…"]}), 400),
    ],
)
def test_an_error_answer_keeps_its_status_its_json_body_and_one_content_type(
    orthanc_factory: OrthancFactory,
    album: Album,
    method: str,
    path: str,
    body: bytes | str | None,
    expected: int,
) -> None:
    orthanc = orthanc_factory(kheops=album.section())

    answer = orthanc.request(method, path, data=body)

    assert answer.status_code == expected, answer.text
    content_types = answer.raw.headers.getlist("Content-Type")
    assert len(content_types) == 1, content_types
    # Decoded as the header says, the body is the JSON document the plugin wrote.
    document = json.loads(answer.text)
    assert document["HttpStatus"] == expected
    if expected == 404:
        assert re.search("études/…|café-…", document["Message"]), document["Message"]


def test_orthanc_exits_with_0_after_the_plugin_stored_answered_and_was_called_back(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    orthanc = orthanc_factory(kheops=album.section())
    sop_uid, data = single_instance()
    orthanc.upload(data)
    wait_until(lambda: album.holds([sop_uid]), message="the instance in the album")
    assert orthanc.get("/kheops/nothing-here").status_code == 404
    assert status(orthanc)["State"]

    orthanc.stop()

    assert orthanc.returncode == 0
    assert "Segmentation fault" not in orthanc.log


def test_the_log_names_the_orthanc_python_plugin_and_python_it_runs_on(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    orthanc = orthanc_factory(kheops=album.section())
    system = orthanc.get("/system").json()
    plugin = orthanc.get("/plugins/python").json()

    found = wait_until(lambda: _VERSIONS.search(orthanc.log), message="the versions line")
    assert found is not None

    assert found.group(1) == system["Version"]
    assert found.group(2) == plugin["Version"]
    assert found.group(4) == "off"


def test_python_allow_threads_is_read_from_the_python_section(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    orthanc = orthanc_factory(
        kheops=album.section(), extra_config={"Python": {"AllowThreads": True}}
    )

    found = wait_until(lambda: _VERSIONS.search(orthanc.log), message="the versions line")
    assert found is not None

    assert found.group(4) == "on"


def test_orthancs_plugin_list_links_to_the_kheops_page(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    orthanc = orthanc_factory(kheops=album.section())

    plugin = orthanc.get("/plugins/python").json()

    # Orthanc may make it relative to Explorer (1.10 answers "../app/…").
    assert plugin["RootUri"].endswith("/kheops/app/index.html"), plugin["RootUri"]


def test_orthanc_exits_with_0_when_a_resource_becomes_stable_while_it_stops(
    orthanc_factory: OrthancFactory, album: Album, request: pytest.FixtureRequest
) -> None:
    """Python plugin 7.1 aborts here ("free(): invalid pointer" or a double free) with any
    script that registers an OnChange callback, ours or one line long: an event that comes
    after ORTHANC_STOPPED is left in its queue. Nothing a script does avoids it."""
    orthanc = orthanc_factory(kheops=album.section(), extra_config={"StableAge": 1})
    if orthanc.get("/plugins/python").json()["Version"] == "7.1":
        # Not strict: whether the event lands during the shutdown is a matter of timing.
        reason = "python plugin 7.1 aborts when an event comes while Orthanc stops"
        request.applymarker(pytest.mark.xfail(reason=reason, strict=False))
    orthanc.upload(single_instance()[1])

    orthanc.stop()  # the instance's series becomes stable during the shutdown

    assert orthanc.returncode == 0
