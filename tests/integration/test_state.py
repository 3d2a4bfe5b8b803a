"""The plugin's durable state with a real Orthanc: a full disk, deletions, storage recycling."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.orthanc_process import OrthancFactory, OrthancProcess
from tests.plugin_setup import Album, single_instance, status
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def metrics_text(orthanc: OrthancProcess) -> str:
    return orthanc.get("/tools/metrics-prometheus").text


def counts(orthanc: OrthancProcess) -> dict[str, int]:
    found: dict[str, int] = status(orthanc)["Counts"]
    return found


@pytest.fixture
def small_state_directory(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB file system of its own for the state directory, which a test can fill."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "kheops-state"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Write a file until the file system has no room left."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as out:
        for chunk in (65536, 4096, 1):  # down to the last free byte
            try:
                while True:
                    out.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


def test_a_state_directory_that_fills_while_instances_are_in_flight_loses_nothing(
    orthanc_factory: OrthancFactory, album: Album, small_state_directory: Path
) -> None:
    destination, destination_token = album.other_album()
    orthanc = orthanc_factory(
        kheops=album.section(
            StateDirectory=str(small_state_directory),
            SwitchingAlbums=[{"Name": "all", "DestinationToken": destination_token}],
        )
    )
    wait_until(lambda: status(orthanc)["AlbumId"] == album.album_id, message="token checked")
    album.server.set_latency(2.0)  # answers come late: the instances are in flight meanwhile
    first = [single_instance(patient_id="P-FULL") for _ in range(3)]
    for _, data in first:
        orthanc.upload(data)
    wait_until(lambda: counts(orthanc)["InFlight"] > 0, message="instances in flight")

    filler = fill(small_state_directory)
    problem = wait_until(
        lambda: status(orthanc)["StoreError"], timeout=30, message="the status names the problem"
    )
    assert "database or disk is full" in problem["Error"]
    late_uid, late = single_instance(patient_id="P-FULL")
    late_id = orthanc.upload(late)  # Orthanc takes it; the queue cannot: its change log keeps it
    assert "cannot write the queue" in orthanc.log
    backfill = orthanc.post("/kheops/send", json={"Resources": [late_id]})
    assert backfill.status_code == 503, backfill.text
    assert "cannot be written now" in backfill.json()["Message"]

    album.server.set_latency(0.0)
    filler.unlink()

    sent = [uid for uid, _ in first] + [late_uid]
    wait_until(lambda: album.holds(sent), timeout=60, message="every instance in the album")
    wait_until(lambda: counts(orthanc)["Sent"] == 4, message="all counted as sent")
    document = status(orthanc)
    assert document["StoreError"] is None
    assert document["Counts"]["InFlight"] == 0 and document["Counts"]["Failed"] == 0
    wait_until(
        lambda: album.server.album_series(destination) >= album.server.album_series(album.album_id),
        message="the series shared once writing works again",
    )
    assert orthanc.is_running


def test_an_instance_deleted_before_it_was_sent_leaves_the_queue_quietly(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    album.server.set_down(True)
    orthanc = orthanc_factory(kheops=album.section())
    (kept_uid, kept), (_, deleted) = single_instance(), single_instance()
    orthanc.upload(kept)
    deleted_id = orthanc.upload(deleted)
    wait_until(lambda: counts(orthanc)["Queued"] == 2, message="both queued")

    orthanc.delete(f"/instances/{deleted_id}").raise_for_status()

    wait_until(lambda: counts(orthanc)["DeletedBeforeSent"] == 1, message="counted as deleted")
    album.server.set_down(False)
    wait_until(lambda: album.holds([kept_uid]), timeout=60, message="the other one sent")
    wait_until(lambda: counts(orthanc)["Sent"] == 1, message="counted as sent")
    assert counts(orthanc)["Failed"] == 0 and counts(orthanc)["Queued"] == 0
    assert "storage recycling" not in orthanc.log
    wait_until(
        lambda: "kheops_instances_deleted_unsent_total 1 " in metrics_text(orthanc),
        message="the metric counts it",
    )


def test_storage_recycling_during_an_outage_is_logged_as_an_error(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    album.server.set_down(True)
    orthanc = orthanc_factory(kheops=album.section(), extra_config={"MaximumPatientCount": 1})
    (_, oldest), (newest_uid, newest) = (
        single_instance(patient_id="P-OLDEST"),
        single_instance(patient_id="P-NEWEST"),
    )
    orthanc.upload(oldest)
    wait_until(lambda: counts(orthanc)["Queued"] == 1, message="queued")

    orthanc.upload(newest)  # Orthanc recycles the oldest patient, never sent

    wait_until(lambda: counts(orthanc)["DeletedBeforeSent"] == 1, message="counted as deleted")
    line = next(line for line in orthanc.log.splitlines() if "storage recycling" in line)
    assert line.startswith("E") and "MaximumPatientCount 1" in line
    assert "never reached KHEOPS" in line
    album.server.set_down(False)
    wait_until(lambda: album.holds([newest_uid]), timeout=60, message="the newest one sent")
    assert counts(orthanc)["Failed"] == 0


def test_a_new_queue_over_instances_orthanc_already_holds_says_how_to_queue_them(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    album.server.set_down(True)
    orthanc = orthanc_factory(kheops=album.section())
    for _ in range(2):
        orthanc.upload(single_instance()[1])
    wait_until(lambda: counts(orthanc)["Queued"] == 2, message="queued")
    orthanc.stop()
    for path in Path(orthanc.config["Kheops"]["StateDirectory"]).glob("outbox.sqlite3*"):
        path.unlink()  # an administrator deletes the queue

    orthanc.start()

    line = wait_until(
        lambda: next((x for x in orthanc.log.splitlines() if "not queued" in x), ""),
        message="the log says what is not queued",
    )
    # The figure is Orthanc's /statistics less the queue. Under load, Orthanc 1.12 and 1.13 have
    # counted 1 of the 2 instances just after a restart, so the test pins a figure from 1 to 2.
    said = re.search(r"already holds (\d+) instances that are not queued", line)
    assert said is not None and 1 <= int(said.group(1)) <= 2, line
    assert "POST /kheops/send" in line
    assert counts(orthanc)["Queued"] == 0
