from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from tests.corpus import generate_corpus, main, make_dataset, new_uid, plan_corpus, to_bytes


def _dataset(**overrides: Any) -> pydicom.Dataset:
    arguments: dict[str, Any] = {
        "patient_id": "P1",
        "patient_name": "DOE^JANE",
        "study_uid": "1.2.3.4",
        "series_uid": "1.2.3.4.5",
        "sop_uid": "1.2.3.4.5.6",
        **overrides,
    }
    return make_dataset(**arguments)


def _parse(data: bytes) -> pydicom.FileDataset:
    return pydicom.dcmread(io.BytesIO(data))


def test_instance_is_a_part10_file_in_explicit_vr_little_endian() -> None:
    data = to_bytes(_dataset())

    assert data[128:132] == b"DICM"
    parsed = _parse(data)
    assert parsed.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert parsed.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5.6"
    assert parsed.SOPInstanceUID == "1.2.3.4.5.6"
    assert parsed.StudyInstanceUID == "1.2.3.4"
    assert parsed.SeriesInstanceUID == "1.2.3.4.5"


@pytest.mark.parametrize(
    ("modality", "sop_class"), [("CT", CTImageStorage), ("MR", MRImageStorage)]
)
def test_sop_class_follows_the_modality(modality: str, sop_class: str) -> None:
    parsed = _parse(to_bytes(_dataset(modality=modality)))

    assert parsed.SOPClassUID == sop_class
    assert parsed.file_meta.MediaStorageSOPClassUID == sop_class
    assert parsed.Modality == modality


def test_pixel_data_is_16_bit_monochrome2_of_the_requested_size() -> None:
    parsed = _parse(to_bytes(_dataset(rows=32, columns=48)))

    assert (parsed.Rows, parsed.Columns) == (32, 48)
    assert (parsed.BitsAllocated, parsed.SamplesPerPixel) == (16, 1)
    assert parsed.PhotometricInterpretation == "MONOCHROME2"
    assert len(parsed.PixelData) == 32 * 48 * 2


def test_type_1_and_2_attributes_are_present() -> None:
    parsed = _parse(to_bytes(_dataset()))

    for keyword in (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "ReferringPhysicianName",
        "PatientBirthDate",
        "PatientSex",
        "SeriesNumber",
        "InstanceNumber",
        "FrameOfReferenceUID",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
    ):
        assert keyword in parsed, keyword


def test_extra_keywords_set_attributes_last() -> None:
    parsed = _parse(
        to_bytes(
            _dataset(
                StationName="CT1234",
                ImageType=["DERIVED", "SECONDARY"],
                PatientSex="F",
                study_description="CT THORAX",
            )
        )
    )

    assert parsed.StationName == "CT1234"
    assert list(parsed.ImageType) == ["DERIVED", "SECONDARY"]
    assert parsed.PatientSex == "F"
    assert parsed.StudyDescription == "CT THORAX"


def test_an_unknown_keyword_is_refused() -> None:
    with pytest.raises(ValueError, match="NotAKeyword"):
        _dataset(NotAKeyword="x")


def test_sop_uid_is_new_for_each_instance_when_not_given() -> None:
    first = _dataset(sop_uid=None)
    second = _dataset(sop_uid=None)

    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert new_uid() != new_uid()


def test_same_arguments_give_the_same_bytes() -> None:
    assert to_bytes(_dataset()) == to_bytes(_dataset())


def test_corpus_has_the_requested_shape_and_every_file_parses(tmp_path: Path) -> None:
    paths = generate_corpus(tmp_path, studies=2, series_per_study=3, instances_per_series=4)

    assert len(paths) == 2 * 3 * 4
    datasets = [pydicom.dcmread(path) for path in paths]
    assert len({ds.SOPInstanceUID for ds in datasets}) == 24
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 6
    assert len({ds.StudyInstanceUID for ds in datasets}) == 2
    assert {ds.Modality for ds in datasets} == {"CT", "MR"}
    assert sorted({int(ds.InstanceNumber) for ds in datasets}) == [1, 2, 3, 4]


def test_corpus_uids_and_bytes_are_deterministic_for_a_seed(tmp_path: Path) -> None:
    first = generate_corpus(
        tmp_path / "a", studies=2, series_per_study=2, instances_per_series=2, seed=7
    )
    second = generate_corpus(
        tmp_path / "b", studies=2, series_per_study=2, instances_per_series=2, seed=7
    )
    other = generate_corpus(
        tmp_path / "c", studies=2, series_per_study=2, instances_per_series=2, seed=8
    )

    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    first_uids = {pydicom.dcmread(p).SOPInstanceUID for p in first}
    other_uids = {pydicom.dcmread(p).SOPInstanceUID for p in other}
    assert not first_uids & other_uids


def test_plan_matches_what_is_written(tmp_path: Path) -> None:
    plan = plan_corpus(tmp_path, studies=1, series_per_study=2, instances_per_series=2)
    paths = generate_corpus(tmp_path, studies=1, series_per_study=2, instances_per_series=2)

    assert [item.path for item in plan] == paths
    for item in plan:
        written = pydicom.dcmread(item.path)
        assert (written.StudyInstanceUID, written.SeriesInstanceUID, written.SOPInstanceUID) == (
            item.study_uid,
            item.series_uid,
            item.sop_uid,
        )


def test_corpus_varies_the_attributes_rules_select_on(tmp_path: Path) -> None:
    plan = plan_corpus(tmp_path, studies=4, series_per_study=3, instances_per_series=1)
    datasets = [item.dataset() for item in plan]

    for keyword in ("StudyDescription", "StationName", "BodyPartExamined", "SeriesDescription"):
        assert len({getattr(ds, keyword) for ds in datasets}) >= 3, keyword


def test_instance_size_is_dominated_by_pixel_data(tmp_path: Path) -> None:
    (path,) = generate_corpus(
        tmp_path, studies=1, series_per_study=1, instances_per_series=1, rows=512, columns=512
    )

    pixel_bytes = 512 * 512 * 2
    assert pixel_bytes < path.stat().st_size < pixel_bytes + 4096


def test_command_line_writes_the_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        [str(tmp_path), "--studies", "2", "--series", "1", "--instances", "3", "--size", "16"]
    )

    assert status == 0
    files = sorted(tmp_path.rglob("*.dcm"))
    assert len(files) == 6
    assert pydicom.dcmread(files[0]).Rows == 16
    assert "wrote 6 instances" in capsys.readouterr().out
