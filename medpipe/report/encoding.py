"""DICOM datasets encoded to bytes as pydicom's ``save_as(..., enforce_file_format=True)``
writes them, fast for objects with many sequence items, such as a SEG's per-frame functional
groups (hundreds of frames, each a nest of small sequences).

pydicom encodes every element of every item on its own, through several layers of Python,
and runs its ambiguous-VR correction on each item. A SEG's items repeat the same few
elements (the same SOP class, segment numbers, codes) and the rest differ in a few values
(positions, referenced instances). Here each distinct leaf element (tag, VR, value,
character set) is encoded once, by pydicom itself, and the sequences and items around them
are framed here exactly as pydicom frames them (defined lengths, or undefined lengths with
delimiters where the element or item says so). The file preamble and meta group come from
pydicom too. Anything this module does not reproduce byte for byte goes to pydicom whole:
transfer syntaxes other than explicit VR little endian, ambiguous VRs (``US or SS``) inside
sequence items (those at the top level are resolved by pydicom's own rule first), values
read lazily from a file (buffered), and datasets whose encoding or character set differ
from what they were read with (pydicom re-encodes those).

An ``edit`` may change or leave out elements on the way (:func:`encode_dataset`): the
de-identified copy of an object is its identified dataset encoded through an edit, with no
copy of the dataset made (:func:`medpipe.report.dicom.deidentified_bytes`).

Tests compare the bytes with pydicom's for medpipe's SEG and SR, identified and de-identified.

>>> from pydicom.dataset import Dataset, FileMetaDataset
>>> ds = Dataset(); ds.file_meta = FileMetaDataset()
>>> ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
>>> ds.SOPClassUID, ds.SOPInstanceUID = "1.2.3", "1.2.3.4"
>>> item = Dataset(); item.ReferencedSegmentNumber = 1
>>> ds.SegmentIdentificationSequence = [item]
>>> import io; buf = io.BytesIO(); ds.save_as(buf, enforce_file_format=True)
>>> encode_dataset(ds) == buf.getvalue()
True
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.fileutil import buffer_remaining, read_buffer, reset_buffer_position
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR

__all__ = ["Edit", "encode_dataset", "encode_parts", "part_bytes", "write_part"]

Edit = Callable[[Any, bool], Any]
"""``edit(element, nested)``: the element to write instead of ``element`` (itself when unchanged),
or None to leave it out; ``nested`` is True inside sequence items. It must depend on the
element's tag, VR and value and on ``nested`` alone (its result is remembered for equal
elements). Sequences are given to it too; the items of one it keeps are edited in turn."""

_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_FP_ENCODING = (False, True)  # (implicit VR, little endian) of explicit VR little endian
_ASCII = "ISO_IR 6"
_NO_CACHE_BYTES = 1024  # longer byte values (pixel data) are encoded directly, not remembered


class _Fallback(Exception):
    """Something this encoder does not reproduce exactly: pydicom encodes the whole dataset."""


def _pydicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encode_dataset(ds: Dataset, edit: Edit | None = None) -> bytes:
    """The bytes ``ds.save_as(buf, enforce_file_format=True)`` writes into ``buf``.

    Parameters
    ----------
    ds : pydicom.Dataset
        With ``file_meta`` (its TransferSyntaxUID says how the dataset is encoded).
    edit : callable, optional
        Changes elements on the way (:data:`Edit`): the bytes are those of the dataset as
        edited, ``ds`` itself stays as it is. The file meta group follows the edited SOP
        class and instance UIDs, as pydicom's does.

    Returns
    -------
    bytes
        Preamble, ``DICM``, file meta group and the encoded dataset.
    """
    return b"".join(map(part_bytes, encode_parts(ds, edit)))


def encode_parts(ds: Dataset, edit: Edit | None = None) -> list[Any]:
    """:func:`encode_dataset` in parts whose concatenation is the file, for writing it without
    joining: a long byte value of the top level (a SEG's pixel data) is a part of its own, the
    very object the dataset holds, not a copy: ``bytes``, or a buffer (pydicom's buffered
    value, written from its position on as pydicom writes it; :func:`write_part`)."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        return [_pydicom_bytes(ds if edit is None else edited_copy(ds, edit))]
    try:
        return [_header(ds, edit), *_Encoder(edit).parts(ds, pydicom.charset.default_encoding)]
    except _Fallback:
        return [_pydicom_bytes(ds if edit is None else edited_copy(ds, edit))]


def part_bytes(part: Any) -> bytes:
    """The bytes of a part of :func:`encode_parts` (a buffer read from its position, which stays)."""
    if isinstance(part, bytes):
        return part
    with reset_buffer_position(part):
        return part.read()


def write_part(f: Any, part: Any) -> None:
    """Write a part of :func:`encode_parts` into the open file ``f``, a buffer chunk by chunk."""
    if isinstance(part, bytes):
        f.write(part)
        return
    with reset_buffer_position(part):
        for chunk in read_buffer(part):
            f.write(chunk)


def edited_copy(ds: Dataset, edit: Edit, nested: bool = False) -> Dataset:
    """A copy of ``ds`` with ``edit`` applied to every element (what :func:`encode_dataset`
    writes through pydicom where it does not encode itself)."""
    out = Dataset()
    for attr in ("file_meta", "preamble"):
        if hasattr(ds, attr):
            setattr(out, attr, getattr(ds, attr))
    for tag in ds.keys():
        elem = edit(ds[tag], nested)
        if elem is None:
            continue
        if elem.VR == "SQ":
            elem = pydicom.DataElement(elem.tag, "SQ", [edited_copy(item, edit, True) for item in elem.value])
        out[elem.tag] = elem
    return out


def _header(ds: Dataset, edit: Edit | None = None) -> bytes:
    """Preamble, ``DICM`` and the file meta group, as pydicom writes them for ``ds``.

    pydicom completes the meta group from the dataset's SOP class and instance UIDs, so they
    are written along (a dataset of them alone) and cut off after the group.
    """
    head = Dataset()
    head.file_meta = ds.file_meta
    head.preamble = getattr(ds, "preamble", None)
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if keyword in ds:
            elem = ds[keyword] if edit is None else edit(ds[keyword], False)
            if elem is not None:
                setattr(head, keyword, elem.value)
    data = _pydicom_bytes(head)
    start = 128 + 4  # preamble, "DICM"
    group, element, vr, length, group_length = struct.unpack_from("<HH2sHI", data, start)
    if (group, element, vr, length) != (0x0002, 0x0000, b"UL", 4):
        raise _Fallback()
    return data[: start + 12 + group_length]


def _frozen(value: Any) -> Any:
    """A hashable key that tells apart every value pydicom would encode differently."""
    if isinstance(value, (str, bytes, int, float)) and type(value) in (str, bytes, int, float):
        return (type(value).__name__, value)
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return ("seq", tuple(_frozen(v) for v in value))
    # DSfloat, DSdecimal, IS, PersonName, UID...: their text is what pydicom writes
    return (type(value).__name__, str(value), repr(value))


class _Encoder:
    def __init__(self, edit: Edit | None = None) -> None:
        self.cache: dict[Any, bytes] = {}
        self.edit = edit

    def dataset(self, ds: Dataset, parent_encoding: Any, nested: bool = False) -> bytes:
        return b"".join(map(part_bytes, self.parts(ds, parent_encoding, nested)))

    def parts(self, ds: Dataset, parent_encoding: Any, nested: bool = False) -> list[Any]:
        # As pydicom's write_dataset: a dataset not read in this encoding and character set (a
        # new one, too) has its raw elements parsed (then written from their values) and its
        # ambiguous VRs corrected (those go to pydicom: see element()).
        convert = ds.original_encoding != _FP_ENCODING or ds.original_character_set != ds._character_set
        get = ds.__getitem__ if convert else ds.get_item
        encoding = ds.get("SpecificCharacterSet", parent_encoding)
        if self.edit is not None:  # an edited element is one with its value: no raw ones
            get = ds.__getitem__
        parts: list[bytes] = []
        for tag in sorted(ds.keys()):
            if tag.element == 0 and tag.group > 6:  # retired group lengths: pydicom skips them
                continue
            elem = get(tag)
            if convert and not nested and (elem.VR is None or len(elem.VR) != 2):
                # as pydicom does for a dataset it converts (in place, as it does): PixelData's
                # 'OB or OW' of a new object; nested ones need their ancestors (pydicom's)
                elem = correct_ambiguous_vr_element(elem, ds, True)
            long = None if nested else self._long_value(elem)
            if long is not None:
                parts += long
            else:
                parts.append(self.element(elem, encoding, nested))
        return parts

    def _long_value(self, elem: Any) -> list[Any] | None:
        """``[header, value]`` of a long OB/OW value of even length (bytes, or a buffer from its
        position on), as pydicom writes it (explicit VR little endian, defined length) but with
        the value not copied; else None."""
        if elem.VR not in ("OB", "OW") or elem.is_raw:
            return None
        if self.edit is not None and self.edit(elem, False) is not elem:
            return None
        value = elem.value
        if elem.is_buffered:
            length = buffer_remaining(value)
        elif type(value) is bytes:
            length = len(value)
        else:
            return None
        if length <= _NO_CACHE_BYTES or length % 2 or elem.is_undefined_length:
            return None
        tag = BaseTag(elem.tag)
        return [struct.pack("<HH2sHI", tag.group, tag.element, elem.VR.encode(), 0, length), value]

    def element(self, elem: Any, encoding: Any, nested: bool = False) -> bytes:
        vr = elem.VR
        if vr is None or len(vr) != 2:
            raise _Fallback()  # ambiguous VR: pydicom corrects it per dataset
        if vr == "SQ" and not elem.is_raw:
            if self.edit is not None:
                elem = self.edit(elem, nested)
                if elem is None:
                    return b""
            return self.sequence(elem, encoding)
        if getattr(elem, "is_buffered", False):
            raise _Fallback()
        value = elem.value
        if isinstance(value, (bytes, bytearray)) and len(value) > _NO_CACHE_BYTES:
            return self._leaf(elem, encoding, nested)
        key = (elem.is_raw, int(elem.tag), vr, _frozen(value), _frozen(encoding),
               getattr(elem, "length", None) if elem.is_raw else elem.is_undefined_length, nested)
        data = self.cache.get(key)
        if data is None:
            data = self.cache[key] = self._leaf(elem, encoding, nested)
        return data

    def _leaf(self, elem: Any, encoding: Any, nested: bool) -> bytes:
        if self.edit is not None:
            elem = self.edit(elem, nested)
            if elem is None:
                return b""
            if elem.VR is None or len(elem.VR) != 2 or elem.VR == "SQ":
                raise _Fallback()
        return self._encode_leaf(elem, encoding)

    @staticmethod
    def _encode_leaf(elem: Any, encoding: Any) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        # Only text VRs use the character set; pydicom looks it up for every element anyway
        # (slowly for a Python codec name such as its default), so the others get a plain term.
        write_data_element(fp, elem, encoding if elem.VR in CUSTOMIZABLE_CHARSET_VR else _ASCII)
        return fp.getvalue()

    def sequence(self, elem: Any, encoding: Any) -> bytes:
        items = []
        for item in elem.value:
            body = self.dataset(item, encoding, True)
            if getattr(item, "is_undefined_length_sequence_item", False):
                items.append(_ITEM + b"\xff\xff\xff\xff" + body + _ITEM_END)
            else:
                items.append(_ITEM + struct.pack("<I", len(body)) + body)
        value = b"".join(items)
        tag = BaseTag(elem.tag)
        head = struct.pack("<HH", tag.group, tag.element) + b"SQ\x00\x00"
        if elem.is_undefined_length:
            return head + b"\xff\xff\xff\xff" + value + _SEQUENCE_END
        return head + struct.pack("<I", len(value)) + value
