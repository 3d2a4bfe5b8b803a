"""From the bytes Orthanc holds to a Part-10 file KHEOPS can take, one instance at a time.

Pure: `prepare` either gives what the forwarder sends and the rules read, or raises
`UnreadableFile` with a reason in words a person understands. Nothing one file does (a
damaged header, an odd VR, a missing UID) escapes as anything else, so one file can never
hold back another instance of its batch.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from io import BytesIO

import pydicom
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

_PREAMBLE = b"\x00" * 128 + b"DICM"
_META_GROUP = b"\x02\x00"  # the first tag of a file meta group, little endian


class UnreadableFile(ValueError):
    """The file cannot be sent; the message says why, without library jargon."""


@dataclass(frozen=True)
class PreparedFile:
    data: bytes  # a Part-10 file: what the STOW-RS request carries
    dataset: pydicom.Dataset  # its header, up to the pixel data, for the switching rules
    sop_uid: str
    study_uid: str
    series_uid: str
    header_added: bool


def prepare(data: bytes) -> PreparedFile:
    """The file as KHEOPS wants it: a Part-10 header is added to a bare data set, as Orthanc's
    own DICOMweb server does when it answers with a file stored without one."""
    header_added = data[128:132] != b"DICM"
    if header_added:
        data = _with_header(data)
    dataset = _read(data)
    sop_uid = _text(dataset, "SOPInstanceUID")
    if not sop_uid:
        raise UnreadableFile("Orthanc's file has no SOP Instance UID")
    return PreparedFile(
        data=data,
        dataset=dataset,
        sop_uid=sop_uid,
        study_uid=_text(dataset, "StudyInstanceUID"),
        series_uid=_text(dataset, "SeriesInstanceUID"),
        header_added=header_added,
    )


def _read(data: bytes) -> pydicom.Dataset:
    try:
        # Values are read lazily: a damaged element no one reads does not stop the file
        # (KHEOPS judges it), and the rules catch what they meet in one.
        dataset = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 -- every way a file can be unreadable is one outcome
        raise UnreadableFile(f"Orthanc's file cannot be read as DICOM: {_why(exc)}") from None
    return dataset


def _with_header(data: bytes) -> bytes:
    """A bare data set (or a file meta group without its preamble) made a Part-10 file."""
    if data[:2] == _META_GROUP:
        return _PREAMBLE + data
    try:
        dataset = pydicom.dcmread(BytesIO(data), force=True, stop_before_pixels=True)
        implicit, little = dataset.original_encoding
        sop_class = _text(dataset, "SOPClassUID")
        sop_uid = _text(dataset, "SOPInstanceUID")
    except Exception as exc:  # noqa: BLE001 -- see _read
        raise UnreadableFile(
            f"Orthanc's file has no DICOM file header and cannot be read as DICOM: {_why(exc)}"
        ) from None
    if not sop_class or not sop_uid:
        missing = "SOP Class UID" if not sop_class else "SOP Instance UID"
        raise UnreadableFile(
            f"Orthanc's file is not a DICOM file: it has no DICOM file header, and no {missing}"
            " to write one with"
        )
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian
        if implicit
        else ExplicitVRLittleEndian
        if little
        else ExplicitVRBigEndian
    )
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return _PREAMBLE + buffer.getvalue() + data


def _text(dataset: pydicom.Dataset, keyword: str) -> str:
    try:
        return str(dataset.get(keyword, "") or "").strip()
    except Exception:  # noqa: BLE001 -- a damaged UID element is a missing UID
        return ""


def _why(exc: BaseException) -> str:
    """What went wrong in words, never the library's own advice (such as "use force=True")."""
    if isinstance(exc, InvalidDicomError):
        return "it is not a DICOM file (no DICOM header at the start)"
    if isinstance(exc, BytesLengthException):
        return "an element of its header has a length that does not fit its value type"
    if isinstance(exc, NotImplementedError):
        return "its header uses an encoding (a value representation) that cannot be read"
    if isinstance(exc, EOFError | struct.error):
        return "the file ends in the middle of its header"
    if isinstance(exc, UnicodeError):
        return "a text element is not in the character set the file declares"
    return "its header is damaged"
