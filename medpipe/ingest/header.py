"""A fast reader of the few DICOM header elements that discovery needs.

``pydicom.dcmread`` builds a Dataset of every element, about 1 ms per CT file; discovery needs
28 of them. :func:`read_header` walks the elements of the common case (Part 10 file, little
endian, implicit or explicit VR), skips what it does not need by its length, and converts the
needed values exactly as pydicom 3 does with its default settings. Whenever it is not sure, it
*declines* (returns None) and the caller reads the file with pydicom, so that odd files keep
pydicom's behaviour (and its warnings and errors).
"""

from __future__ import annotations

import math
import struct
from typing import Any, BinaryIO, NamedTuple

from pydicom import config as _config
from pydicom import uid as _uid
from pydicom.datadict import dictionary_VR

# One read holds the header of most CT files; longer ones are read on. 64 KiB made the
# ingest benchmark's scan 15% slower (0.105 s against 0.089 s for 600 files on 2 threads).
CHUNK = 8 * 1024
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
DECLINED_SYNTAXES = {"1.2.840.10008.1.2.2", DEFLATED}  # big endian, deflated
PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD

# Explicit VR: these have 2 reserved bytes and a 4-byte length, the others a 2-byte length.
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())

# tag -> (keyword, VR): the elements that ``scan.read_instance`` reads, at the top level only.
WANTED: dict[int, tuple[str, str]] = {
    0x00080005: ("SpecificCharacterSet", "CS"),
    0x00080008: ("ImageType", "CS"),
    0x00080016: ("SOPClassUID", "UI"),
    0x00080018: ("SOPInstanceUID", "UI"),
    0x00080060: ("Modality", "CS"),
    0x0008103E: ("SeriesDescription", "LO"),
    0x00180015: ("BodyPartExamined", "CS"),
    0x00180050: ("SliceThickness", "DS"),
    0x00180088: ("SpacingBetweenSlices", "DS"),
    0x00181164: ("ImagerPixelSpacing", "DS"),
    0x0020000D: ("StudyInstanceUID", "UI"),
    0x0020000E: ("SeriesInstanceUID", "UI"),
    0x00200011: ("SeriesNumber", "IS"),
    0x00200013: ("InstanceNumber", "IS"),
    0x00200032: ("ImagePositionPatient", "DS"),
    0x00200037: ("ImageOrientationPatient", "DS"),
    0x00280002: ("SamplesPerPixel", "US"),
    0x00280004: ("PhotometricInterpretation", "CS"),
    0x00280008: ("NumberOfFrames", "IS"),
    0x00280010: ("Rows", "US"),
    0x00280011: ("Columns", "US"),
    0x00280030: ("PixelSpacing", "DS"),
    0x00280100: ("BitsAllocated", "US"),
    0x00280101: ("BitsStored", "US"),
    0x00280103: ("PixelRepresentation", "US"),
    0x00281052: ("RescaleIntercept", "DS"),
    0x00281053: ("RescaleSlope", "DS"),
}
PRESENCE = {0x52009230: "PerFrameFunctionalGroupsSequence"}  # only whether it is there
_SPECIAL = frozenset(WANTED) | PRESENCE.keys() | PIXEL_TAGS  # elements the walk looks at
META = {0x00020002: "MediaStorageSOPClassUID", 0x00020010: "TransferSyntaxUID"}
# keywords whose value read_instance uses as one value: several values -> pydicom's path
_SINGLE = {"SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "Modality", "SeriesDescription", "BodyPartExamined",
           "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "InstanceNumber", "NumberOfFrames",
           "PhotometricInterpretation", "SliceThickness", "SpacingBetweenSlices", "RescaleIntercept",
           "RescaleSlope"}
# SpecificCharacterSet -> Python codec, as pydicom maps it (ISO_IR 6 and none decode as ISO 8859-1)
_CHARSETS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}

_IMPLICIT_HEAD = struct.Struct("<HHL").unpack_from  # also item and delimiter headers
_EXPLICIT_HEAD = struct.Struct("<HH2sH").unpack_from
_U32 = struct.Struct("<L").unpack_from
_U16 = struct.Struct("<H").unpack_from


class PixelElement(NamedTuple):
    """The facts of a file's pixel data element that its header can be checked against."""

    present: bool
    problem: str | None = None  # the declared length does not fit in the file
    offset: int | None = None  # native little-endian PixelData: byte offset of the value
    nbytes: int | None = None  # native: declared length; encapsulated: bytes after the element's header
    encapsulated: bool = False
    floats: bool = False  # FloatPixelData or DoubleFloatPixelData


class Header(NamedTuple):
    """What :func:`read_header` found: mappings that answer ``get`` and ``in`` like pydicom's
    Dataset and FileMetaDataset for the keywords read, and the pixel data facts of
    :func:`pixel_element_at` (the fields of :class:`PixelElement`)."""

    dataset: dict[str, Any]
    meta: dict[str, Any]
    has_pixels: bool
    problem: str | None
    offset: int | None
    nbytes: int | None = None
    encapsulated: bool = False
    floats: bool = False


class _Decline(Exception):
    """Not the common case: let pydicom read the file."""


class _Short(Exception):
    """The buffer ends before byte ``need``: read more of the file."""

    def __init__(self, need: int) -> None:
        self.need = need


def read_header(fp: BinaryIO, size: int) -> Header | None:
    """Read the header elements that discovery needs, or None to leave the file to pydicom.

    Parameters
    ----------
    fp : binary file
        Open at its start. Read once (8 KiB) unless the header is longer; then on to past
        the element that did not fit, as often as needed.
    size : int
        The file's size in bytes.

    Returns
    -------
    Header or None
        None when the file is not a little-endian Part 10 file with file meta, or anything in
        it could make pydicom read it differently (odd VRs or lengths, character sets with
        code extensions, truncation inside the header, non-default pydicom settings).

    Examples
    --------
    >>> import os
    >>> from pydicom.data import get_testdata_file
    >>> path = get_testdata_file("CT_small.dcm")
    >>> with open(path, "rb") as fp:
    ...     h = read_header(fp, os.path.getsize(path))
    >>> h.dataset["Modality"], h.dataset["Rows"], h.dataset["PixelSpacing"], h.has_pixels
    ('CT', 128, [0.661468, 0.661468], True)
    """
    if not _pydicom_defaults():
        return None
    try:
        buf = fp.read(min(size, CHUNK))
        while True:
            try:
                return _parse(buf, size)
            except _Short as short:
                if short.need > size or len(buf) >= size:
                    return None  # truncated inside the header: pydicom decides what that means
                more = fp.read(min(size, max(short.need + CHUNK, 2 * len(buf))) - len(buf))
                if not more:
                    return None
                buf += more
    except Exception:  # _Decline, and anything unforeseen: pydicom's path is never worse
        return None


def pixel_element_at(head: bytes, pos: int, size: int, implicit: bool, little: bool = True) -> PixelElement:
    """The :class:`PixelElement` facts of the element whose first (up to 12) bytes are ``head``,
    at byte ``pos`` of a file of ``size`` bytes: whether it is pixel data; if so, whether its
    declared length fits in the file, its length and the byte offset of native (not
    encapsulated) little-endian PixelData's value (big endian: None, pydicom decodes it)."""
    if len(head) < 8:
        return PixelElement(False)
    order = "<" if little else ">"  # tags and lengths follow the transfer syntax's byte order
    group, elem = struct.unpack(order + "HH", head[:4])
    if (group << 16 | elem) not in PIXEL_TAGS:
        return PixelElement(False)
    floats = (group, elem) != (0x7FE0, 0x0010)
    if implicit:
        length, header_len = struct.unpack(order + "I", head[4:8])[0], 8
    elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"UN"):
        length, header_len = struct.unpack(order + "I", head[8:12])[0], 12
    else:
        length, header_len = struct.unpack(order + "H", head[6:8])[0], 8
    available = max(size - pos - header_len, 0)
    if length == UNDEFINED:  # encapsulated (compressed): at least the item tags must follow
        problem = None if size > pos + header_len + 8 else "truncated: encapsulated pixel data is empty"
        return PixelElement(True, problem, None, available, True, floats)
    if available < length:
        return PixelElement(True, f"truncated: pixel data declares {length} bytes, file holds {available}",
                            floats=floats)
    if length == 0:
        return PixelElement(True, "pixel data is empty", floats=floats)
    native_le = little and not floats
    return PixelElement(True, None, pos + header_len if native_le else None, length, False, floats)


def _pydicom_defaults() -> bool:
    """The conversions below copy pydicom's default settings; other settings -> pydicom."""
    s = _config.settings
    return (s.reading_validation_mode != _config.RAISE and s.infer_sq_for_un_vr
            and _config.assume_implicit_vr_switch and _config.replace_un_with_known_vr
            and not (_config.use_none_as_empty_text_VR_value or _config.use_DS_numpy
                     or _config.use_IS_numpy or _config.use_DS_decimal or _config.data_element_callback
                     or _uid.PrivateTransferSyntaxes))


def _need(buf: bytes, end: int) -> None:
    if end > len(buf):
        raise _Short(end)


def _parse(buf: bytes, size: int) -> Header:
    if size < 132 or buf[128:132] != b"DICM":
        raise _Decline  # no preamble: pydicom guesses the encoding
    # File meta: explicit VR little endian, up to the first element of another group (as pydicom).
    pos, raw_meta = 132, {}
    while pos < size:
        _need(buf, pos + 2)
        if _U16(buf, pos)[0] != 2:
            break
        tag, vr, length, vpos = _element(buf, pos, False)
        if length == UNDEFINED:
            raise _Decline
        if tag in META:
            if vr != b"UI":
                raise _Decline
            _need(buf, vpos + length)
            raw_meta[META[tag]] = buf[vpos : vpos + length]
        pos = vpos + length
    meta = {k: _convert("UI", v, "") for k, v in raw_meta.items()}
    syntax = meta.get("TransferSyntaxUID")
    if not syntax or not isinstance(syntax, str) or syntax in DECLINED_SYNTAXES:
        raise _Decline
    implicit = syntax == IMPLICIT_LE  # every other syntax pydicom reads as explicit VR LE
    dataset: dict[str, Any] = {}
    if pos >= size:
        if pos > size:
            raise _Decline
        return Header(dataset, meta, False, None, None)  # file meta only
    _need(buf, pos + 8)
    if _U16(buf, pos)[0] == 0:
        raise _Decline  # command set group: pydicom reads it apart
    # pydicom checks the first element's VR against the transfer syntax and follows the data
    if implicit != _looks_implicit(buf, pos):
        raise _Decline
    pixel_pos, raw = _top_level(buf, pos, implicit, size, dataset)
    encoding = "latin_1"
    for tag, (vr, value) in sorted(raw.items()):  # SpecificCharacterSet first: LO needs it
        keyword, want = WANTED[tag]
        if vr is not None and vr != want.encode():
            raise _Decline  # unexpected VR (UN, SS...): pydicom converts by other rules
        dataset[keyword] = converted = _convert(want, value, encoding)
        if isinstance(converted, list) and keyword in _SINGLE:
            raise _Decline
        if keyword == "SpecificCharacterSet":
            encoding = _CHARSETS.get(converted)  # type: ignore[assignment]
            if encoding is None:
                raise _Decline  # code extensions, other character sets: pydicom's decoding
    if pixel_pos is None:
        return Header(dataset, meta, False, None, None)
    _need(buf, min(pixel_pos + 12, size))
    return Header(dataset, meta, *pixel_element_at(buf[pixel_pos : pixel_pos + 12], pixel_pos, size, implicit))


def _element(buf: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, explicit VR or None, value length, position of the value) of the element at ``pos``."""
    _need(buf, pos + 8)
    if implicit:
        group, elem, length = _IMPLICIT_HEAD(buf, pos)
        return group << 16 | elem, None, length, pos + 8
    group, elem, vr, length = _EXPLICIT_HEAD(buf, pos)
    if vr in _SHORT_VRS:
        return group << 16 | elem, vr, length, pos + 8
    if vr in _LONG_VRS:
        _need(buf, pos + 12)
        return group << 16 | elem, vr, _U32(buf, pos + 8)[0], pos + 12
    if group == 0xFFFE and not b"AA" <= vr <= b"ZZ":
        # items and delimiters carry no VR; pydicom reads them as implicit VR, so do we
        return group << 16 | elem, None, _U32(buf, pos + 4)[0], pos + 8
    raise _Decline  # unknown VR: pydicom guesses


def _looks_implicit(buf: bytes, pos: int) -> bool:
    """pydicom's test of a dataset's first element: a VR is two upper-case letters."""
    _need(buf, pos + 6)
    return not (0x40 < buf[pos + 4] < 0x5B and 0x40 < buf[pos + 5] < 0x5B)


def _top_level(buf: bytes, pos: int, implicit: bool, size: int, dataset: dict[str, Any]
               ) -> tuple[int | None, dict[int, tuple[bytes | None, bytes]]]:
    """Walk the top-level dataset up to the pixel data (its position) or the end of the file
    (None); collect the raw values of WANTED and mark PRESENCE keywords in ``dataset``."""
    raw: dict[int, tuple[bytes | None, bytes]] = {}
    n, special = len(buf), _SPECIAL
    while pos < size:
        # the hot loop (~50 elements a file): _element's work inlined where the buffer allows
        if pos + 12 > n:
            tag, vr, length, vpos = _element(buf, pos, implicit)
        elif implicit:
            group, elem, length = _IMPLICIT_HEAD(buf, pos)
            tag, vr, vpos = group << 16 | elem, None, pos + 8
        else:
            group, elem, vr, length = _EXPLICIT_HEAD(buf, pos)
            tag = group << 16 | elem
            if vr in _SHORT_VRS:
                vpos = pos + 8
            elif vr in _LONG_VRS:
                length, vpos = _U32(buf, pos + 8)[0], pos + 12
            else:
                tag, vr, length, vpos = _element(buf, pos, implicit)
        if tag not in special and length != UNDEFINED and tag < 0xFFFE0000:
            pos = vpos + length  # not needed: skip
            if pos > size:
                raise _Decline  # truncated inside the header
            continue
        if tag in PIXEL_TAGS:
            return pos, raw
        if tag >> 16 == 0xFFFE:
            raise _Decline  # an item delimiter ends pydicom's dataset; others confuse it
        if tag in PRESENCE:
            dataset[PRESENCE[tag]] = True
        if length == UNDEFINED:
            if tag in WANTED:
                raise _Decline
            pos = _undefined(buf, tag, vr, vpos, implicit)
            continue
        end = vpos + length
        if end > size:
            raise _Decline  # truncated inside the header
        if tag in WANTED:
            _need(buf, end)
            raw[tag] = (vr, buf[vpos:end])
        pos = end
    if pos != size:
        raise _Decline
    return None, raw


def _undefined(buf: bytes, tag: int, vr: bytes | None, vpos: int, implicit: bool) -> int:
    """Skip a value of undefined length; pydicom parses those that are sequences (by VR, by the
    dictionary in implicit VR, or by an item tag following a private tag) and so do we."""
    if implicit:
        try:
            is_sequence = dictionary_VR(tag) == "SQ"
        except KeyError:
            _need(buf, vpos + 4)
            is_sequence = _U32(buf, vpos)[0] == 0xE000FFFE  # item tag (FFFE,E000) as a LE uint32
    else:
        is_sequence = vr in (b"SQ", b"UN")  # pydicom reads UN of undefined length as SQ
    if not is_sequence:
        raise _Decline  # pydicom searches for the delimiter bytes; rare outside pixel data
    return _skip_sequence(buf, vpos, implicit)


def _skip_sequence(buf: bytes, pos: int, implicit: bool) -> int:
    """Position after the sequence delimiter of an undefined-length sequence starting at ``pos``."""
    while True:
        _need(buf, pos + 8)
        group, elem, length = _IMPLICIT_HEAD(buf, pos)
        tag, pos = group << 16 | elem, pos + 8
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM:
            raise _Decline
        if length == 0:
            continue
        # an item of an explicit-VR sequence may be implicit VR (pydicom tests its first element)
        item_implicit = implicit or _looks_implicit(buf, pos)
        if length == UNDEFINED:
            pos = _skip_item(buf, pos, item_implicit, None)
        else:
            end = pos + length
            if _skip_item(buf, pos, item_implicit, end) != end:
                raise _Decline  # elements overrun the item: pydicom would go astray differently
            pos = end


def _skip_item(buf: bytes, pos: int, implicit: bool, end: int | None) -> int:
    """Walk an item's elements up to ``end``, or past its item delimiter when ``end`` is None."""
    while end is None or pos < end:
        tag, vr, length, vpos = _element(buf, pos, implicit)
        if tag == ITEM_END and end is None:
            return vpos
        if tag >> 16 == 0xFFFE:
            raise _Decline
        pos = _undefined(buf, tag, vr, vpos, implicit) if length == UNDEFINED else vpos + length
    return pos


def _convert(vr: str, value: bytes, encoding: str) -> Any:
    """``value`` as pydicom 3 converts it for ``vr`` (default settings): one value or a list."""
    if not value:  # pydicom's empty values
        return "" if vr in ("CS", "UI", "LO") else None
    if vr == "US":
        if len(value) != 2:
            raise _Decline
        return _U16(value)[0]
    if vr == "LO":
        if b"\x1b" in value:
            raise _Decline  # escape sequences: pydicom switches character sets
        items = [v.rstrip("\0 ") for v in value.decode(encoding).split("\\")]
    else:
        text = value.decode("latin_1")  # pydicom's default_encoding for these VRs
        if vr == "UI":
            items = [v.strip() for v in text.rstrip("\0 ").split("\\")]
        elif vr == "DS":
            items = [_ds(v) for v in text.strip().rstrip(" \0").split("\\")]
        elif vr == "IS":
            items = [_is(v) for v in text.rstrip(" \0").split("\\")]
        else:  # CS
            items = text.rstrip(" \0").split("\\")
    return items[0] if len(items) == 1 else items


def _ds(text: str) -> float | str:
    """pydicom's DSfloat: blank stays a string, else float (ValueError: decline). Non-finite
    values (``1e400``, ``nan``) decline too: pydicom's DSfloat keeps the text, which the checks
    then name as written."""
    if not text.strip():
        return text
    value = float(text)
    if not math.isfinite(value):
        raise _Decline
    return value


def _is(text: str) -> int | float | str:
    """pydicom's IS: blank stays a string; int, or float when the string is not integral."""
    if not text.strip():
        return text
    try:
        value = int(text)
    except ValueError:
        value = int(float(text))
    exact = float(text)
    return value if value == exact else exact
