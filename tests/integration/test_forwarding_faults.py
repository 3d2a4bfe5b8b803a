"""Forwarding against what stands in front of KHEOPS and what archives hold, with a real Orthanc:
a redirecting or html front, files pydicom cannot read, failure reasons of each class, a wrong
OrthancUrl, configuration mistakes."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.kheops_server import KheopsTestServer
from tests.orthanc_process import OrthancFactory, OrthancProcess, OrthancStartError, free_ports
from tests.plugin_setup import Album, queue, single_instance, status, write_corpus
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def elsewhere(album: Album) -> Iterator[KheopsTestServer]:
    """A second KHEOPS the front redirects to, with the same album and token."""
    with KheopsTestServer() as server:
        server.add_album(album.album_id)
        server.add_token(album_id=album.album_id, token=album.token)
        yield server


def status_when(orthanc: OrthancProcess, state: str, **counts: int) -> dict[str, Any]:
    """The status once it is in `state` with these counts."""

    def matches() -> dict[str, Any]:
        document = status(orthanc)
        found = document["State"] == state and all(
            document["Counts"][name] == n for name, n in counts.items()
        )
        return document if found else {}

    result: dict[str, Any] = wait_until(matches, message=f"status {state} {counts}")
    return result


def test_behind_a_redirect_nothing_counts_as_sent_no_token_leaves_and_all_arrives_once_url_is_fixed(
    orthanc_factory: OrthancFactory, album: Album, elsewhere: KheopsTestServer, tmp_path: Path
) -> None:
    files = write_corpus(tmp_path / "corpus", studies=1, series=2, instances=2, seed=3)
    album.server.set_redirect(307, elsewhere.url)
    orthanc = orthanc_factory(kheops=album.section())
    orthanc.storescu([f.path for f in files])

    paused = status_when(orthanc, "paused", Queued=len(files), Sent=0, Failed=0)

    assert f"set Kheops.Url to {elsewhere.url}" in paused["StateDetail"]
    assert elsewhere.requests == []  # no token, no DICOM byte went there
    assert album.server.album_instances(album.album_id) == set()
    assert orthanc.log.count("the plugin does not follow") == 1

    orthanc.stop()
    orthanc.config["Kheops"]["Url"] = elsewhere.url
    orthanc.start()

    wait_until(
        lambda: {f.sop_uid for f in files} <= elsewhere.album_instances(album.album_id),
        message="every instance at the fixed Url",
    )
    status_when(orthanc, "sending", Sent=len(files), Queued=0)


def test_an_html_answer_counts_nothing_as_sent_and_the_status_says_what_came_back(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    album.server.set_html(True)
    orthanc = orthanc_factory(kheops=album.section())
    sop_uid, data = single_instance()
    orthanc.upload(data)

    shown = status_when(orthanc, "unreachable", Queued=1, Sent=0)

    assert "200 text/html" in shown["StateDetail"]
    assert "is Kheops.Url the KHEOPS root?" in shown["StateDetail"]

    album.server.set_html(False)
    wait_until(lambda: album.holds([sop_uid]), message="sent once KHEOPS itself answers")


def unknown_vr(data: bytes) -> bytes:
    """The first element (SpecificCharacterSet, CS) given the unknown VR "ZZ", in the long form.

    Orthanc (DCMTK) reads it as UN and stores the file; pydicom raises NotImplementedError.
    """
    end = 132 + 12 + int(struct.unpack("<I", data[140:144])[0])
    tag, length = data[end : end + 4], int(struct.unpack("<H", data[end + 6 : end + 8])[0])
    value = data[end + 8 : end + 8 + length]
    return (
        data[:end]
        + tag
        + b"ZZ\x00\x00"
        + struct.pack("<I", length)
        + value
        + data[end + 8 + length :]
    )


def test_a_poison_file_among_good_ones_fails_alone_and_a_file_without_header_is_sent(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    orthanc = orthanc_factory(kheops=album.section(Workers=1, BatchLingerMilliseconds=1000))
    good = [single_instance() for _ in range(3)]
    sop, data = single_instance()
    poison = unknown_vr(data)
    bare_uid, part10 = single_instance()
    bare = BytesIO()
    dataset = pydicom.dcmread(BytesIO(part10))
    pydicom.dcmwrite(bare, pydicom.Dataset(dataset), implicit_vr=True, little_endian=True)

    poison_id = orthanc.upload(poison)
    for _, file in good:
        orthanc.upload(file)
    orthanc.upload(bare.getvalue())

    expected = [uid for uid, _ in good] + [bare_uid]
    wait_until(lambda: album.holds(expected), message="the good files and the bare data set")
    failed = wait_until(lambda: queue(orthanc, "failed"), message="the poison file failed")
    assert [entry["ID"] for entry in failed] == [poison_id]
    assert failed[0]["LastError"].startswith("Orthanc's file cannot be read as DICOM: ")
    assert "force" not in failed[0]["LastError"]
    assert not album.holds([sop])


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        (0xA900, "data set does not match SOP class (43264, 0xA900)"),
        (0xC000, "cannot understand (49152, 0xC000)"),
        (0x0122, "SOP class not supported (290, 0x0122)"),
    ],
)
def test_a_reason_retrying_cannot_fix_fails_at_once_with_its_code(
    orthanc_factory: OrthancFactory, album: Album, reason: int, words: str
) -> None:
    refused, data = single_instance()
    album.server.refuse_instances([refused], reason)
    orthanc = orthanc_factory(kheops=album.section())
    orthanc.upload(data)

    failed = wait_until(lambda: queue(orthanc, "failed"), message="failed")

    assert failed[0]["LastError"].startswith(words)
    assert failed[0]["Attempts"] == 1


def test_a_reason_not_known_here_fails_after_a_bounded_number_of_attempts(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    refused, data = single_instance()
    album.server.refuse_instances([refused], 12345)
    orthanc = orthanc_factory(
        kheops=album.section(RetryInitialSeconds=0.05, RetryMaximumSeconds=0.1)
    )
    orthanc.upload(data)

    failed = wait_until(lambda: queue(orthanc, "failed"), message="failed after a few attempts")

    assert failed[0]["LastError"] == (
        "failure reason 12345 (0x3039), which this plugin does not know; gave up after 5 attempts"
    )


@pytest.mark.parametrize(
    ("orthanc_url", "cause"),
    [
        ("http://127.0.0.1:{closed}", "ConnectionRefusedError"),
        ("{url}/wrong", "/system answered 404"),
    ],
    ids=["wrong-port", "wrong-prefix"],
)
def test_a_wrong_orthanc_url_shows_as_its_own_state_and_fails_nothing(
    orthanc_factory: OrthancFactory, album: Album, orthanc_url: str, cause: str
) -> None:
    orthanc = orthanc_factory(kheops=album.section(), start=False)
    closed = free_ports(1)[0]
    orthanc.config["Kheops"]["OrthancUrl"] = orthanc_url.format(closed=closed, url=orthanc.url)
    orthanc.start()
    orthanc.upload(single_instance()[1])

    shown = status_when(orthanc, "orthanc-unavailable", Failed=0)

    assert cause in shown["StateDetail"]
    assert "Kheops.OrthancUrl" in shown["StateDetail"]
    assert status(orthanc)["Counts"]["Failed"] == 0


def test_a_state_directory_that_is_a_file_stops_orthanc_with_one_line_and_no_traceback(
    orthanc_factory: OrthancFactory, album: Album, tmp_path: Path
) -> None:
    state = tmp_path / "state-file"
    state.write_text("not a folder")

    with pytest.raises(OrthancStartError) as error:
        orthanc_factory(kheops=album.section(StateDirectory=str(state)), verbose=False)

    assert f"KHEOPS: invalid configuration: Kheops.StateDirectory: {str(state)!r} is a file" in str(
        error.value
    )
    assert 'File "' not in str(error.value)
    assert "Traceback" not in str(error.value)


def test_a_burst_of_503s_with_the_default_backoff_does_not_hold_delivery_back(
    orthanc_factory: OrthancFactory, album: Album, tmp_path: Path
) -> None:
    files = write_corpus(tmp_path / "corpus", studies=2, series=2, instances=5, seed=5)
    album.server.fail_next(5, status=503, method="POST", path_prefix="/api/studies")
    orthanc = orthanc_factory(
        kheops=album.section(
            Workers=4, BatchMaxInstances=2, RetryInitialSeconds=2, RetryMaximumSeconds=300
        )
    )
    orthanc.storescu([f.path for f in files])

    # With the default backoff, instances that met 503s wait seconds to minutes: only the
    # probe, at most 5 s apart, and the backlog made due when it goes through bring them back.
    wait_until(
        lambda: album.holds([f.sop_uid for f in files]),
        timeout=20,
        message="every instance soon after the burst",
    )
    assert orthanc.log.count("KHEOPS is unreachable") <= 1


def test_an_orthanc_url_that_refuses_the_plugin_shows_why_and_fails_nothing(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    # OrthancUrl names another Orthanc, one with authentication: the token this Orthanc
    # generates for the plugin means nothing there.
    other = orthanc_factory(credentials=("admin", "s3cret"))
    orthanc = orthanc_factory(kheops=album.section(OrthancUrl=other.url))
    orthanc.upload(single_instance()[1])

    shown = status_when(orthanc, "orthanc-unavailable", Failed=0)

    assert "refuses the plugin (401)" in shown["StateDetail"]
    assert "Kheops.OrthancUrl must be this Orthanc's own address" in shown["StateDetail"]


def test_a_state_file_that_is_not_a_database_stops_orthanc_with_one_line(
    orthanc_factory: OrthancFactory, album: Album, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "outbox.sqlite3").write_bytes(b"this is not an SQLite file, but it is long enough" * 4)

    with pytest.raises(OrthancStartError) as error:
        orthanc_factory(kheops=album.section(StateDirectory=str(state)), verbose=False)

    assert (
        f"KHEOPS: invalid configuration: Kheops.StateDirectory: cannot open the state in {state}"
        in str(error.value)
    )
    assert 'File "' not in str(error.value)
