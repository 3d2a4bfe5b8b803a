"""Synthetic DICOM instances for tests, the demo and the benchmarks.

Every instance is a valid Part-10 file (explicit VR little endian, 16-bit MONOCHROME2 pixels)
with the type 1 and 2 attributes Orthanc, DICOMweb servers and KHEOPS expect. A corpus is
deterministic for a seed: the same call writes the same UIDs and the same bytes.

    python -m tests.corpus OUTDIR --studies 4 --series 3 --instances 10 --size 512
"""

from __future__ import annotations

import argparse
import io
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

_SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}
_STORED_BITS = 12  # pixel values stay below 4096, as on most CT and MR scanners


def new_uid() -> str:
    """A new random UID."""
    return str(generate_uid())


def make_dataset(
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str | None = None,
    modality: str = "CT",
    series_number: int = 1,
    instance_number: int = 1,
    rows: int = 64,
    columns: int = 64,
    study_description: str = "",
    series_description: str = "",
    **extra: object,
) -> Dataset:
    """One image instance with file meta, ready for `to_bytes`.

    CT and MR get CT and MR Image Storage; any other modality gets Secondary Capture Image
    Storage. `extra` sets or overrides attributes by DICOM keyword, last (for example
    StationName="CT1234" or ImageType=["ORIGINAL", "PRIMARY", "AXIAL"]); an unknown keyword
    raises ValueError.
    """
    unknown = [keyword for keyword in extra if tag_for_keyword(keyword) is None]
    if unknown:
        raise ValueError(f"not DICOM keywords: {', '.join(sorted(unknown))}")
    sop_uid = sop_uid or new_uid()
    sop_class = _SOP_CLASSES.get(modality, SecondaryCaptureImageStorage)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]

    # SOP Common, General Study, Patient
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240115"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "083000"
    ds.AccessionNumber = "A" + study_uid.replace(".", "")[-15:]
    ds.Modality = modality
    ds.Manufacturer = "orthanc-kheops tests"
    ds.InstitutionName = "Test Hospital"
    ds.ReferringPhysicianName = "REFERRING^DOCTOR"
    ds.StationName = f"{modality}01"
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = "Synthetic"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number

    # Modality-specific acquisition attributes (type 1 and 2 of the CT and MR Image modules)
    if modality == "CT":
        ds.KVP = "120"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "1024"
        ds.WindowWidth = "4096"
    elif modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.EchoTrainLength = "1"
        ds.MagneticFieldStrength = "3"
        ds.WindowCenter = "2048"
        ds.WindowWidth = "4096"
    else:
        ds.ConversionType = "WSD"

    # Frame of Reference, Image Plane
    ds.FrameOfReferenceUID = str(generate_uid(entropy_srcs=[series_uid, "frame of reference"]))
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.SliceThickness = "5"
    ds.SliceLocation = str(5 * instance_number)
    ds.ImagePositionPatient = ["-160", "-160", str(5 * instance_number)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = ["0.625", "0.625"]

    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = _STORED_BITS
    ds.HighBit = _STORED_BITS - 1
    ds.PixelRepresentation = 0
    ds.PixelData = _pixel_data(rows, columns, phase=instance_number)
    ds["PixelData"].VR = "OW"

    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part-10 file: preamble, file meta, then the dataset."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _pixel_data(rows: int, columns: int, *, phase: int) -> bytes:
    """A diagonal ramp, shifted by `phase`: each row is a slice of one precomputed line."""
    line = array("H", (((i + phase) * 16) % (1 << _STORED_BITS) for i in range(rows + columns)))
    if sys.byteorder == "big":
        line.byteswap()
    raw = line.tobytes()
    return b"".join(raw[2 * row : 2 * (row + columns)] for row in range(rows))


# --- Corpora -------------------------------------------------------------------------------

_PATIENT_NAMES = ("DOE^JANE", "SMITH^JOHN", "MULLER^ANNA", "ROSSI^MARCO", "DUBOIS^CLAIRE")
_STUDY_DESCRIPTIONS = (
    "CT THORAX",
    "IRM CEREBRALE",
    "ABDOMEN PELVIS",
    "GENOU GAUCHE",
    "RESEARCH PROTOCOL R42",
)
_BODY_PARTS = ("CHEST", "HEAD", "ABDOMEN", "KNEE", "PELVIS")
_STATION_NAMES = {"CT": ("CT1234", "CT5678"), "MR": ("MR3T01", "MR15T02")}
_SERIES_DESCRIPTIONS = {
    "CT": ("AXIAL 5MM", "AXIAL 1MM LUNG", "CORONAL MPR"),
    "MR": ("T1 SAG", "T2 AX", "FLAIR AX", "DWI"),
}


@dataclass(frozen=True)
class CorpusFile:
    """Where one instance of a corpus goes, and the `make_dataset` arguments that make it."""

    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    attributes: Mapping[str, Any]

    def dataset(self) -> Dataset:
        return make_dataset(**self.attributes)

    def write(self) -> Path:
        """Write the instance to `path` (creating its directory) and return the path."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(to_bytes(self.dataset()))
        return self.path


def plan_corpus(
    directory: Path,
    *,
    studies: int,
    series_per_study: int,
    instances_per_series: int,
    rows: int = 64,
    columns: int = 64,
    modalities: Sequence[str] = ("CT", "MR"),
    seed: int = 0,
) -> list[CorpusFile]:
    """The corpus `generate_corpus` writes, without writing it.

    One patient per study; series take the modalities in turn; study descriptions, body parts,
    station names and series descriptions cycle through small lists (shifted by the seed) so
    rules have something to select on. Files go to
    `directory/study-SSS/series-EE/instance-IIII.dcm`.
    """
    if not modalities:
        raise ValueError("modalities must not be empty")

    def uid(*parts: object) -> str:
        return str(
            generate_uid(entropy_srcs=["orthanc-kheops corpus", str(seed), *map(str, parts)])
        )

    files = []
    for study in range(studies):
        study_uid = uid("study", study)
        k = study + seed
        study_attributes: dict[str, Any] = {
            "patient_id": f"KHEOPS-TEST-{seed}-{study:04d}",
            "patient_name": _PATIENT_NAMES[k % len(_PATIENT_NAMES)],
            "study_uid": study_uid,
            "study_description": _STUDY_DESCRIPTIONS[k % len(_STUDY_DESCRIPTIONS)],
            "rows": rows,
            "columns": columns,
            "BodyPartExamined": _BODY_PARTS[k % len(_BODY_PARTS)],
            "PatientSex": "FM"[k % 2],
            "StudyID": str(study + 1),
            "AccessionNumber": f"ACC{seed % 1000:03d}{study:06d}",
        }
        study_date = (date(2024, 1, 1) + timedelta(days=k)).strftime("%Y%m%d")
        for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            study_attributes[keyword] = study_date
        for series in range(series_per_study):
            series_uid = uid("series", study, series)
            modality = modalities[(study + series) % len(modalities)]
            j = k + series
            stations = _STATION_NAMES.get(modality, (f"{modality}01",))
            descriptions = _SERIES_DESCRIPTIONS.get(modality, (f"{modality} SERIES",))
            for instance in range(instances_per_series):
                sop_uid = uid("instance", study, series, instance)
                attributes = {
                    **study_attributes,
                    "series_uid": series_uid,
                    "sop_uid": sop_uid,
                    "modality": modality,
                    "series_number": series + 1,
                    "instance_number": instance + 1,
                    "series_description": descriptions[j % len(descriptions)],
                    "StationName": stations[k % len(stations)],
                }
                path = (
                    directory
                    / f"study-{study:03d}"
                    / f"series-{series:02d}"
                    / f"instance-{instance:04d}.dcm"
                )
                files.append(CorpusFile(path, study_uid, series_uid, sop_uid, attributes))
    return files


def generate_corpus(
    directory: Path,
    *,
    studies: int,
    series_per_study: int,
    instances_per_series: int,
    rows: int = 64,
    columns: int = 64,
    modalities: Sequence[str] = ("CT", "MR"),
    seed: int = 0,
) -> list[Path]:
    """Write the corpus `plan_corpus` describes and return the file paths, in study order.

    To keep the UIDs at hand: `files = plan_corpus(...)`, then `item.write()` for each.
    """
    plan = plan_corpus(
        directory,
        studies=studies,
        series_per_study=series_per_study,
        instances_per_series=instances_per_series,
        rows=rows,
        columns=columns,
        modalities=modalities,
        seed=seed,
    )
    return [item.write() for item in plan]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.corpus", description="Write a synthetic DICOM corpus."
    )
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--series", type=int, default=3, help="series per study")
    parser.add_argument("--instances", type=int, default=10, help="instances per series")
    parser.add_argument("--size", type=int, default=64, help="rows and columns of each image")
    parser.add_argument("--modalities", default="CT,MR", help="comma-separated, taken in turn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = generate_corpus(
        args.outdir,
        studies=args.studies,
        series_per_study=args.series,
        instances_per_series=args.instances,
        rows=args.size,
        columns=args.size,
        modalities=[m.strip() for m in args.modalities.split(",") if m.strip()],
        seed=args.seed,
    )
    total = sum(path.stat().st_size for path in paths)
    print(f"wrote {len(paths)} instances ({total / 1e6:.1f} MB) to {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
