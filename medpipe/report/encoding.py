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
transfer syntaxes other than explicit VR little endian, ambiguous VRs (``US or SS``), values
read lazily from a file (buffered), and datasets whose encoding or character set differ
from what they were read with (pydicom re-encodes those).

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
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian

__all__ = ["encode_dataset"]

_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_FP_ENCODING = (False, True)  # (implicit VR, little endian) of explicit VR little endian
_NO_CACHE_BYTES = 1024  # longer byte values (pixel data) are encoded directly, not remembered


class _Fallback(Exception):
    """Something this encoder does not reproduce exactly: pydicom encodes the whole dataset."""


def _pydicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encode_dataset(ds: Dataset) -> bytes:
    """The bytes ``ds.save_as(buf, enforce_file_format=True)`` writes into ``buf``.

    Parameters
    ----------
    ds : pydicom.Dataset
        With ``file_meta`` (its TransferSyntaxUID says how the dataset is encoded).

    Returns
    -------
    bytes
        Preamble, ``DICM``, file meta group and the encoded dataset.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        return _pydicom_bytes(ds)
    try:
        return _header(ds) + _Encoder().dataset(ds, pydicom.charset.default_encoding)
    except _Fallback:
        return _pydicom_bytes(ds)


def _header(ds: Dataset) -> bytes:
    """Preamble, ``DICM`` and the file meta group, as pydicom writes them for ``ds``.

    pydicom completes the meta group from the dataset's SOP class and instance UIDs, so they
    are written along (a dataset of them alone) and cut off after the group.
    """
    head = Dataset()
    head.file_meta = ds.file_meta
    head.preamble = getattr(ds, "preamble", None)
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if keyword in ds:
            setattr(head, keyword, ds[keyword].value)
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
    def __init__(self) -> None:
        self.cache: dict[Any, bytes] = {}

    def dataset(self, ds: Dataset, parent_encoding: Any) -> bytes:
        # As pydicom's write_dataset: a dataset not read in this encoding and character set (a
        # new one, too) has its raw elements parsed (then written from their values) and its
        # ambiguous VRs corrected (those go to pydicom: see element()).
        convert = ds.original_encoding != _FP_ENCODING or ds.original_character_set != ds._character_set
        get = ds.__getitem__ if convert else ds.get_item
        encoding = ds.get("SpecificCharacterSet", parent_encoding)
        parts = []
        for tag in sorted(ds.keys()):
            if tag.element == 0 and tag.group > 6:  # retired group lengths: pydicom skips them
                continue
            parts.append(self.element(get(tag), encoding))
        return b"".join(parts)

    def element(self, elem: Any, encoding: Any) -> bytes:
        vr = elem.VR
        if vr is None or len(vr) != 2:
            raise _Fallback()  # ambiguous VR: pydicom corrects it per dataset
        if vr == "SQ" and not elem.is_raw:
            return self.sequence(elem, encoding)
        if getattr(elem, "is_buffered", False):
            raise _Fallback()
        value = elem.value
        if isinstance(value, (bytes, bytearray)) and len(value) > _NO_CACHE_BYTES:
            return self._encode_leaf(elem, encoding)
        key = (elem.is_raw, int(elem.tag), vr, _frozen(value), _frozen(encoding),
               getattr(elem, "length", None) if elem.is_raw else elem.is_undefined_length)
        data = self.cache.get(key)
        if data is None:
            data = self.cache[key] = self._encode_leaf(elem, encoding)
        return data

    @staticmethod
    def _encode_leaf(elem: Any, encoding: Any) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, encoding)
        return fp.getvalue()

    def sequence(self, elem: Any, encoding: Any) -> bytes:
        items = []
        for item in elem.value:
            body = self.dataset(item, encoding)
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
