"""The SOP Instance UID of a Part-10 file from its file meta group, without pydicom.

Sending needs only that UID (the verdicts are keyed on it); the rest of the header matters
only when a switching rule could read it. Group 0002 is always explicit VR little endian
right after the preamble, so a few struct reads find it: microseconds, where pydicom's read
of the whole header cost about a tenth of the drain's CPU. Anything unexpected answers None,
and the caller parses the file with pydicom as before.
"""

from __future__ import annotations

import re
import struct

_PREAMBLE = 128
_MAGIC = b"DICM"
# VRs whose length is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_MEDIA_STORAGE_SOP_INSTANCE_UID = 0x0003
_UID = re.compile(rb"[0-9]+(\.[0-9]+)*")
_UID_MAX = 64


def sop_instance_uid(data: bytes) -> str | None:
    """(0002,0003) MediaStorageSOPInstanceUID, or None when the file meta cannot say."""
    if data[_PREAMBLE : _PREAMBLE + 4] != _MAGIC:
        return None
    position = _PREAMBLE + 4
    end = len(data)
    while position + 8 <= end:
        group, element = struct.unpack_from("<HH", data, position)
        if group != 0x0002:
            return None
        vr = data[position + 4 : position + 6]
        if vr in _LONG_VRS:
            if position + 12 > end:
                return None
            (length,) = struct.unpack_from("<I", data, position + 8)
            position += 12
        else:
            (length,) = struct.unpack_from("<H", data, position + 6)
            position += 8
        if position + length > end:
            return None
        if element == _MEDIA_STORAGE_SOP_INSTANCE_UID:
            value = data[position : position + length].rstrip(b"\0 ")
            if len(value) <= _UID_MAX and _UID.fullmatch(value):
                return value.decode("ascii")
            return None
        position += length
    return None
