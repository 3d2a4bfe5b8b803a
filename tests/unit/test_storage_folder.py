"""Large files come from Orthanc's storage folder only where it holds them as Orthanc stored them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from orthanc_kheops.config import load_config
from orthanc_kheops.storage_folder import DIRECT_MIN_BYTES, Attachment, StorageFolder

UUID = "3554f9d0-ef03-44c1-9c73-997861bdc220"
SIZE = DIRECT_MIN_BYTES


def stored(root: Path, uuid: str = UUID, data: bytes = b"D" * SIZE) -> bytes:
    """A file where Orthanc's filesystem storage puts it."""
    path = root / uuid[:2] / uuid[2:4] / uuid
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def folder(root: Path, **attachments: Attachment | None) -> tuple[StorageFolder, list[str]]:
    asked: list[str] = []

    def lookup(orthanc_id: str) -> Attachment | None:
        asked.append(orthanc_id)
        return attachments[orthanc_id]

    return StorageFolder(root, lookup=lookup), asked


def test_a_large_file_is_read_from_the_folder(tmp_path: Path) -> None:
    data = stored(tmp_path)
    files, _ = folder(tmp_path, a=Attachment(UUID, SIZE, SIZE))

    assert files.read("a", SIZE) == data


def test_a_small_file_is_left_to_orthanc_without_a_lookup(tmp_path: Path) -> None:
    stored(tmp_path, data=b"D" * 100)
    files, asked = folder(tmp_path, a=Attachment(UUID, 100, 100))

    assert files.read("a", 100) is None
    assert asked == []


@pytest.mark.parametrize(
    "attachment",
    [
        Attachment(UUID, SIZE, SIZE - 500),  # compressed on disk
        Attachment(UUID, SIZE + 1, SIZE + 1),  # not the file the row was queued with
        Attachment("../../../etc/passwd", SIZE, SIZE),  # not a UUID: never a path
        None,  # Orthanc could not say
    ],
    ids=["compressed", "other-size", "not-a-uuid", "unknown"],
)
def test_a_file_orthanc_does_not_keep_there_as_stored_is_left_to_orthanc(
    tmp_path: Path, attachment: Attachment | None
) -> None:
    stored(tmp_path)
    files, _ = folder(tmp_path, a=attachment)

    assert files.read("a", SIZE) is None


def test_a_small_file_whose_place_the_queue_knows_is_read_from_the_folder_without_a_lookup(
    tmp_path: Path,
) -> None:
    data = stored(tmp_path, data=b"S" * 100)
    files, asked = folder(tmp_path)

    assert files.read("a", 100, UUID) == data
    assert asked == []


def test_files_below_the_size_where_orthancs_reads_cost_less_are_left_to_it(
    tmp_path: Path,
) -> None:
    data = stored(tmp_path, data=b"S" * 100)
    files = StorageFolder(tmp_path, lookup=lambda _: None, known_min_bytes=100)

    assert files.read("a", 100, UUID) == data
    assert files.read("a", 99, UUID) is None  # left to Orthanc before the file is even opened


@pytest.mark.parametrize(
    ("on_disk", "known"),
    [
        (None, UUID),  # Orthanc deleted or replaced the file since it was queued
        (b"S" * 99, UUID),  # another file than the one queued
        (b"S" * 100, "../../../etc/passwd"),  # not a UUID: never a path
    ],
    ids=["gone", "other-size", "not-a-uuid"],
)
def test_a_known_place_that_no_longer_holds_the_file_is_left_to_orthanc(
    tmp_path: Path, on_disk: bytes | None, known: str
) -> None:
    if on_disk is not None:
        stored(tmp_path, data=on_disk)
    files, asked = folder(tmp_path)

    assert files.read("a", 100, known) is None
    assert asked == []


@pytest.mark.parametrize(
    ("attachment", "place"),
    [
        (Attachment(UUID, 100, 100), UUID),
        (Attachment(UUID, 100, 80), None),  # compressed on disk
        (Attachment("not/a-uuid", 100, 100), None),
        (None, None),
    ],
    ids=["as-stored", "compressed", "not-a-uuid", "unknown"],
)
def test_the_place_of_a_file_is_given_only_where_the_folder_holds_it_as_stored(
    tmp_path: Path, attachment: Attachment | None, place: str | None
) -> None:
    files, _ = folder(tmp_path, a=attachment)

    assert files.locate("a") == place


def test_a_file_of_another_size_on_disk_is_left_to_orthanc(tmp_path: Path) -> None:
    stored(tmp_path, data=b"D" * (SIZE - 1))
    files, _ = folder(tmp_path, a=Attachment(UUID, SIZE, SIZE))

    assert files.read("a", SIZE) is None


def test_after_twenty_files_in_a_row_not_in_the_folder_it_is_not_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="orthanc_kheops")
    files, asked = folder(tmp_path, a=Attachment(UUID, SIZE, SIZE))  # never written: elsewhere

    for _ in range(25):
        assert files.read("a", SIZE) is None

    assert len(asked) == 20
    assert not files.in_use
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(said) == 1 and "storage plugin" in said[0]


def test_a_file_found_resets_the_count_of_misses(tmp_path: Path) -> None:
    other = "0554f9d0-ef03-44c1-9c73-997861bdc220"
    stored(tmp_path, uuid=other)
    files, _ = folder(
        tmp_path, gone=Attachment(UUID, SIZE, SIZE), here=Attachment(other, SIZE, SIZE)
    )

    for _ in range(19):
        files.read("gone", SIZE)
    assert files.read("here", SIZE) is not None
    for _ in range(19):
        files.read("gone", SIZE)

    assert files.in_use


def configuration(**orthanc: object) -> dict[str, object]:
    return {"Kheops": {"Url": "https://kheops.example.org", "Token": "t" * 22}, **orthanc}


def test_the_folder_is_orthancs_storage_directory_resolved_as_orthanc_does(tmp_path: Path) -> None:
    config = load_config(configuration(StorageDirectory="db"), config_directory=tmp_path)

    assert config.storage_folder == tmp_path / "db"


def test_no_folder_is_read_when_orthanc_compresses_its_files(tmp_path: Path) -> None:
    config = load_config(
        configuration(StorageDirectory="db", StorageCompression=True), config_directory=tmp_path
    )

    assert config.storage_folder is None
