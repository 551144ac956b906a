"""Whether a DICOM file's bytes hold a complete object, checked without building datasets.

Verifying a study before it is published asks of each DICOM output whether it parses
completely: a file cut short, or damaged in a length, must not be published. pydicom answers
by building a dataset of every item (a SEG has thousands, one per frame, each a nest of small
sequences), which costs far more than the question. :func:`structure` walks the bytes of an
explicit VR little endian object (the transfer syntax of medpipe's SEG and SR) instead: every
element header, value length, sequence, item and delimiter must fit inside its container and
end exactly where the container ends. It is stricter than reading with pydicom (which reads
a value cut short without complaint); tests check that it finds every damage pydicom finds, on
medpipe's own objects cut at many places. Other transfer syntaxes are left to pydicom (None).

>>> import io, pydicom
>>> from pydicom.dataset import Dataset, FileMetaDataset
>>> ds = Dataset(); ds.file_meta = FileMetaDataset()
>>> ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
>>> ds.SOPClassUID, ds.SOPInstanceUID, ds.Rows = "1.2.3", "1.2.3.4", 8
>>> buf = io.BytesIO(); ds.save_as(buf, enforce_file_format=True)
>>> found = structure(buf.getvalue())
>>> found.problem, found.top["Rows"], "SOPInstanceUID" in found.top
(None, 8, True)
>>> structure(buf.getvalue()[:-1]).problem
'element (0028,0010) needs 2 bytes at byte 312, 1 left in the file'
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from typing import Any, Union

from pydicom.datadict import keyword_for_tag

__all__ = ["Structure", "structure"]

Buffer = Union[bytes, bytearray, memoryview, mmap.mmap]

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
_VRS = frozenset(x.encode() for x in (
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV"
).split())
# VRs whose explicit-VR header holds 2 reserved bytes and a 4-byte length (PS3.5 7.1.2).
_LONG = frozenset(x.encode() for x in "OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
# Top-level values the checks of a published object read (their VR's first value).
_US_VALUES = {0x00280010: "Rows", 0x00280011: "Columns", 0x00280100: "BitsAllocated", 0x00280002: "SamplesPerPixel"}
_IS_VALUES = {0x00280008: "NumberOfFrames"}
_TAG = struct.Struct("<HH")
_ITEM_HEADER = struct.Struct("<HHI")
_SHORT = struct.Struct("<H")
_LONG_LENGTH = struct.Struct("<I")


@dataclass
class Structure:
    """What :func:`structure` found: ``problem`` (None when the object is complete), the
    keywords of its top-level elements (``top``; with values for Rows, Columns, BitsAllocated,
    SamplesPerPixel and NumberOfFrames, None for the others), and the length of its pixel data
    (None when there is none or it is encapsulated)."""

    problem: str | None
    top: dict[str, Any] = field(default_factory=dict)
    pixel_bytes: int | None = None


class _Damaged(Exception):
    pass


def structure(data: Buffer) -> Structure | None:
    """Walk the whole object in ``data`` (preamble, ``DICM``, file meta group, data set): bytes,
    or a memory map of the file (only the element headers are read).

    Returns
    -------
    Structure or None
        None where the data set is not explicit VR little endian (pydicom is the judge then).
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        return Structure("no DICM prefix after the 128-byte preamble")
    walker = _Walker(data)
    try:
        meta: dict[int, bytes] = {}
        pos = walker.meta_group(132, meta)
        syntax = meta.get(0x00020010, b"").decode("ascii", "replace").strip(" \0")
        if syntax != EXPLICIT_VR_LITTLE_ENDIAN:
            return None
        found = Structure(None)
        walker.dataset(pos, len(data), False, "the file", found)
    except _Damaged as exc:
        return Structure(str(exc))
    return found


class _Walker:
    def __init__(self, data: Buffer):
        self.data = data

    def meta_group(self, pos: int, values: dict[int, bytes]) -> int:
        """The file meta elements (group 0002, always explicit VR little endian); the position after them."""
        data = self.data
        while pos + 8 <= len(data):
            group, _ = _TAG.unpack_from(data, pos)
            if group != 0x0002:
                return pos
            tag, start, length, _ = self.header(pos, len(data), "the file meta group")
            if length == _UNDEFINED:
                raise _Damaged(f"file meta element {_name(tag)} has an undefined length")
            values[tag] = data[start:start + length]
            pos = start + length
        raise _Damaged("the file ends in its file meta group")

    def header(self, pos: int, end: int, where: str) -> tuple[int, int, int, bytes]:
        """(tag, value start, value length, VR) of the element at ``pos``, its value inside ``end``."""
        data = self.data
        if pos + 8 > end:
            raise _Damaged(f"element header at byte {pos} cut off ({end - pos} bytes left in {where})")
        group, element = _TAG.unpack_from(data, pos)
        tag = group << 16 | element
        vr = data[pos + 4:pos + 6]
        if vr not in _VRS:
            raise _Damaged(f"element {_name(tag)} at byte {pos} has no valid VR ({vr!r})")
        if vr in _LONG:
            if pos + 12 > end:
                raise _Damaged(f"element header at byte {pos} cut off ({end - pos} bytes left in {where})")
            start, length = pos + 12, _LONG_LENGTH.unpack_from(data, pos + 8)[0]
        else:
            start, length = pos + 8, _SHORT.unpack_from(data, pos + 6)[0]
        if length != _UNDEFINED and start + length > end:
            raise _Damaged(f"element {_name(tag)} needs {length} bytes at byte {start}, "
                           f"{end - start} left in {where}")
        return tag, start, length, vr

    def dataset(self, pos: int, end: int, delimited: bool, where: str, top: Structure | None = None) -> int:
        """Walk the elements from ``pos``: to ``end`` exactly, or (``delimited``, an item of
        undefined length) to its item delimiter. Returns the position after them; the
        top-level elements are recorded in ``top``."""
        data = self.data
        while True:
            if pos == end and not delimited:
                return pos
            if pos + 4 <= end and _TAG.unpack_from(data, pos) == (0xFFFE, 0xE00D):
                if not delimited:
                    raise _Damaged(f"item delimiter at byte {pos} outside an item of undefined length")
                return self.delimiter(pos, end)
            tag, start, length, vr = self.header(pos, end, where)
            if tag >> 16 == 0xFFFE:
                raise _Damaged(f"item tag {_name(tag)} at byte {pos} where an element was expected")
            if length == _UNDEFINED:
                if vr == b"SQ" or vr == b"UN":
                    pos = self.sequence(start, end, None)
                elif tag == _PIXEL_DATA:
                    pos = self.sequence(start, end, None, fragments=True)
                else:
                    raise _Damaged(f"element {_name(tag)} ({vr.decode()}) at byte {pos} has an undefined length")
                pixel_bytes = None
            else:
                if vr == b"SQ":
                    self.sequence(start, start + length, start + length)
                pos, pixel_bytes = start + length, length
            if top is not None:
                self.record(top, tag, vr, start, length, pixel_bytes)

    def sequence(self, pos: int, end: int, defined_end: int | None, fragments: bool = False) -> int:
        """Walk the items from ``pos``: to ``defined_end`` exactly, or (None) to the sequence
        delimiter before ``end``. Returns the position after the sequence."""
        data = self.data
        while True:
            if defined_end is not None and pos == defined_end:
                return pos
            if pos + 8 > end:
                raise _Damaged(f"sequence cut off at byte {pos} ({end - pos} bytes left)")
            group, element, length = _ITEM_HEADER.unpack_from(data, pos)
            tag = group << 16 | element
            if tag == _SEQUENCE_END and defined_end is None:
                return self.delimiter(pos, end)
            if tag != _ITEM:
                raise _Damaged(f"{_name(tag)} at byte {pos} where a sequence item was expected")
            if length == _UNDEFINED:
                if fragments:
                    raise _Damaged(f"pixel data fragment at byte {pos} has an undefined length")
                pos = self.dataset(pos + 8, end, True, "an item")
            else:
                item_end = pos + 8 + length
                if item_end > end:
                    raise _Damaged(f"item at byte {pos} needs {length} bytes, {end - pos - 8} left")
                if not fragments:
                    self.dataset(pos + 8, item_end, False, "an item")
                pos = item_end

    def delimiter(self, pos: int, end: int) -> int:
        if pos + 8 > end:
            raise _Damaged(f"delimiter at byte {pos} cut off")
        if _LONG_LENGTH.unpack_from(self.data, pos + 4)[0] != 0:
            raise _Damaged(f"delimiter at byte {pos} with a non-zero length")
        return pos + 8

    def record(self, top: Structure, tag: int, vr: bytes, start: int, length: int, pixel_bytes: int | None) -> None:
        keyword = keyword_for_tag(tag) or f"{tag:08X}"
        value = None
        if tag in _US_VALUES and vr == b"US" and length >= 2:
            value = _SHORT.unpack_from(self.data, start)[0]
        elif tag in _IS_VALUES and vr == b"IS":
            text = self.data[start:start + length].decode("ascii", "replace").strip(" \0")
            value = int(text) if text.lstrip("+-").isdigit() else None
        top.top[keyword] = value
        if tag == _PIXEL_DATA:
            top.pixel_bytes = pixel_bytes


def _name(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
