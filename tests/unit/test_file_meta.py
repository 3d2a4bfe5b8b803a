"""The SOP Instance UID from a file's meta group, and None whenever the meta cannot say."""

from __future__ import annotations

import struct

import pytest

from orthanc_kheops.forwarding.file_meta import sop_instance_uid
from tests.corpus import make_dataset, to_bytes

SOP_UID = "1.2.826.0.1.3680043.10.77.1"


def part10() -> bytes:
    dataset = make_dataset(
        patient_id="P1",
        patient_name="DOE^JANE",
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        sop_uid=SOP_UID,
        rows=4,
        columns=4,
    )
    return to_bytes(dataset)


def test_the_uid_of_a_part10_file_is_read_from_its_meta() -> None:
    assert sop_instance_uid(part10()) == SOP_UID


@pytest.mark.parametrize(
    ("why", "data"),
    [
        ("no preamble", part10()[128:]),
        ("cut inside the meta", part10()[:150]),
        ("not DICOM", b"\x00" * 128 + b"DICM" + b"garbage" * 10),
        ("empty", b""),
    ],
)
def test_a_file_whose_meta_cannot_say_answers_none(why: str, data: bytes) -> None:
    assert sop_instance_uid(data) is None, why


def test_a_uid_that_is_not_a_uid_answers_none() -> None:
    element = struct.pack("<HH2sH", 2, 3, b"UI", 8) + b"1.2.x.4\0"
    data = b"\x00" * 128 + b"DICM" + element
    assert sop_instance_uid(data) is None


def test_a_meta_without_the_element_answers_none() -> None:
    element = struct.pack("<HH2sH", 2, 2, b"UI", 4) + b"1.2\0"
    data = b"\x00" * 128 + b"DICM" + element + struct.pack("<HH", 8, 0x18)
    assert sop_instance_uid(data) is None
