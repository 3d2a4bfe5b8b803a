"""Workers read instance files in-process: from Orthanc's storage folder where it keeps them as
stored (large ones, and those queued with their place in it), the others through the SDK; a large one not in the folder goes over
loopback while a store callback would wait for the GIL a read holds (with OverwriteInstances)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.orthanc_process import OrthancFactory, OrthancProcess
from tests.plugin_setup import Album, orthanc_id, queue, single_instance, status
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def loopback_reads(orthanc: OrthancProcess) -> set[str]:
    """Orthanc ids whose file was asked for over Orthanc's HTTP server (its verbose log)."""
    return set(re.findall(r"\(http\) GET /instances/([0-9a-f-]+)/file", orthanc.log))


def stored_file(orthanc: OrthancProcess, instance: str) -> Path:
    """Where Orthanc keeps an instance's file in its storage folder."""
    uuid = orthanc.get(f"/instances/{instance}/attachments/dicom/info").json()["Uuid"]
    return Path(orthanc.config["StorageDirectory"]) / uuid[:2] / uuid[2:4] / uuid


@pytest.mark.parametrize(
    ("store_callback", "compression"),
    [(False, False), (True, False), (True, True)],
    ids=["default", "overwrite", "overwrite-compressed"],
)
def test_a_large_file_goes_over_loopback_only_beside_a_store_callback_when_compressed(
    orthanc_factory: OrthancFactory, album: Album, store_callback: bool, compression: bool
) -> None:
    small = [single_instance() for _ in range(3)]
    large = single_instance(rows=1024, columns=1024)  # 2 MiB: a store would wait for its read
    orthanc = orthanc_factory(
        kheops=album.section(),
        extra_config={"OverwriteInstances": store_callback, "StorageCompression": compression},
    )

    for _, data in [*small, large]:
        orthanc.upload(data)
    wait_until(lambda: album.holds([uid for uid, _ in [*small, large]]), timeout=60)

    # Compressed, the large file is not in the storage folder as stored: read over loopback.
    expected = {orthanc_id(orthanc, large[0])} if compression else set()
    assert loopback_reads(orthanc) == expected


def reads_small_files_from_the_folder(orthanc: OrthancProcess) -> bool:
    """From Orthanc 1.12 on, where a read through the SDK costs more (sdk.py)."""
    version = orthanc.get("/system").json()["Version"]
    if version == "mainline":
        return True
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) >= (1, 12)


@pytest.mark.parametrize(
    ("rows", "sent_again"),
    [(512, False), (64, False), (64, True)],
    ids=["large-looked-up", "small-queued-with-its-place", "small-sent-again"],
)
def test_a_file_is_sent_as_it_is_in_orthancs_storage_folder(
    orthanc_factory: OrthancFactory, album: Album, rows: int, sent_again: bool
) -> None:
    """A large file's place is looked up as it is read; a small one's is queued with it, from
    the change events or from a request to send it again, and used at 64 KiB from Orthanc 1.12
    on (on 1.10 a read through the SDK costs less below 128 KiB)."""
    orthanc = orthanc_factory(kheops=album.section())
    from_folder = rows >= 512 or reads_small_files_from_the_folder(orthanc)
    sop_uid, data = single_instance(rows=rows, columns=512)
    if sent_again:
        instance = orthanc.upload(data)
        wait_until(lambda: album.holds([sop_uid]), timeout=60, message="sent once")
        album.server.set_down(True)
        orthanc.post("/kheops/send", json={"Resources": [instance]}).raise_for_status()
    else:
        album.server.set_down(True)
        instance = orthanc.upload(data)
    wait_until(lambda: status(orthanc)["Counts"]["Queued"] == 1)
    # The file in the folder now names another instance, of the same length: only a read
    # from the folder sends that one.
    other = sop_uid[:-1] + ("1" if sop_uid[-1] != "1" else "2")
    path = stored_file(orthanc, instance)
    path.write_bytes(path.read_bytes().replace(sop_uid.encode(), other.encode()))

    album.server.set_down(False)

    if from_folder:
        wait_until(lambda: album.holds([other]), timeout=60, message="the folder's file sent")
        assert album.holds([sop_uid]) is sent_again
    else:
        wait_until(lambda: status(orthanc)["Counts"]["Queued"] == 0, timeout=60)
        assert album.holds([sop_uid]) and not album.holds([other])


def test_a_large_compressed_file_is_sent_as_orthanc_reads_it(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    orthanc = orthanc_factory(kheops=album.section(), extra_config={"StorageCompression": True})
    sop_uid, data = single_instance(rows=512, columns=512)
    instance = orthanc.upload(data)

    wait_until(lambda: album.holds([sop_uid]), timeout=60, message="sent")
    assert stored_file(orthanc, instance).stat().st_size < len(data)  # compressed on disk
    assert loopback_reads(orthanc) == set()  # read in-process, through Orthanc


def test_an_instance_deleted_before_it_is_sent_is_never_counted_as_sent(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    kept, gone = single_instance(), single_instance()
    album.server.set_down(True)
    orthanc = orthanc_factory(kheops=album.section())
    orthanc.upload(kept[1])
    gone_id = orthanc.upload(gone[1])
    wait_until(lambda: status(orthanc)["Counts"]["Queued"] == 2)
    orthanc.delete(f"/instances/{gone_id}").raise_for_status()

    album.server.set_down(False)
    wait_until(lambda: album.holds([kept[0]]), timeout=60)

    def settled() -> bool:
        """Failed as deleted (the read says so), or dropped from the queue: never retried."""
        failed = [e for e in queue(orthanc, "failed") if e["ID"] == gone_id]
        pending = [e for e in queue(orthanc, "pending") if e["ID"] == gone_id]
        return not pending and all("deleted" in str(e["LastError"]) for e in failed)

    wait_until(settled, timeout=30, message="the deleted instance settled")
    assert not album.holds([gone[0]])
    assert all(e["ID"] != gone_id for e in queue(orthanc, "sent"))
