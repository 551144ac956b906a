"""Which identity a DICOM object medpipe makes carries, and the UIDs that make it so.

Two identities, one object. The objects sent to a PACS (SEG, SR, the report's secondary
capture) carry the source's patient and study modules and UIDs, so they file into the source
study. Their own Series and SOP Instance UIDs (and the tracking and dimension UIDs inside them)
are derived from the study's input fingerprint and the object's kind, so a rerun of unchanged
inputs makes the same objects and a resend never makes a duplicate in the PACS.

The copies under ``OUT/`` are de-identified: the patient and study modules are replaced
(:func:`medpipe.report.dicom.anonymize`) and every instance UID (study, series, SOP instance,
frame of reference, and each reference to them) is remapped by a keyed one-way hash into
``2.25.<decimal>`` form. The key is ``OUT/private/uid-key`` (0600, made on first use), so only
its holder can link an output file to the source study or to the object in the PACS.

>>> a = derived_uid("fp-1", "seg/instance")
>>> a == derived_uid("fp-1", "seg/instance") != derived_uid("fp-1", "sr/instance")
True
>>> a.startswith("2.25.") and len(a) <= 64
True
>>> remap_uid("1.2.3", b"k" * 32) == remap_uid("1.2.3", b"k" * 32) != remap_uid("1.2.3", b"j" * 32)
True
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Literal

import pydicom

from ..privacy import private_key

UID_KEY_FILE = "uid-key"
Identity = Literal["source", "deidentified"]
# Instance UIDs: they name the patient's study, its series, images and frames of reference, or
# objects made from them. SOP Class, Transfer Syntax, coding scheme and other standard UIDs name
# no patient and stay as they are.
INSTANCE_UID_KEYWORDS = frozenset({
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "MediaStorageSOPInstanceUID",
    "FrameOfReferenceUID", "ReferencedSOPInstanceUID", "ReferencedFrameOfReferenceUID",
    "ReferencedSeriesInstanceUID", "ReferencedStudyInstanceUID", "RelatedFrameOfReferenceUID",
    "SynchronizationFrameOfReferenceUID", "DimensionOrganizationUID", "TrackingUID", "UID",
    "ObserverUID", "DeviceUID", "SpecimenUID", "ConcatenationUID", "IrradiationEventUID",
    "InstanceCreatorUID", "PyramidUID", "StorageMediaFileSetUID", "ReferencedSOPInstanceUIDInFile",
})


def uid_from_digest(digest: bytes) -> str:
    """``2.25.`` and the decimal of the first 128 bits of ``digest`` (PS3.5 B.2: a UUID-derived UID).

    >>> uid_from_digest(bytes(16))
    '2.25.0'
    """
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def derived_uid(fingerprint: str, kind: str) -> str:
    """The UID of ``kind`` (e.g. ``seg/series``, ``sr/instance``, ``seg/tracking/3``) made from
    a study's input ``fingerprint``: SHA-256 of both, in ``2.25.`` form.

    pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the sources and returns a
    random UID, so it cannot serve here.
    """
    if not fingerprint:
        raise ValueError(f"no input fingerprint to derive the {kind} UID from")
    return uid_from_digest(hashlib.sha256(f"medpipe\x00{fingerprint}\x00{kind}".encode()).digest())


def remap_uid(uid: str, key: bytes) -> str:
    """The keyed one-way image of ``uid``: HMAC-SHA256 with ``key``, in ``2.25.`` form."""
    return uid_from_digest(hmac.new(key, str(uid).strip().rstrip("\0").encode(), hashlib.sha256).digest())


def load_uid_key(out: str | Path) -> bytes:
    """The output folder's UID key ``OUT/private/uid-key``, made (random, 32 bytes, 0600) on first use."""
    return private_key(out, UID_KEY_FILE)


def remap_uids(ds: pydicom.Dataset, key: bytes) -> pydicom.Dataset:
    """``ds`` with every instance UID (nested sequences and file meta included) replaced by
    :func:`remap_uid`, in place. References stay consistent: the same UID maps to the same image.
    An item that appears in several places (highdicom shares them between frames) is remapped once.
    """
    seen: dict[int, pydicom.DataElement] = {}  # holds the elements, so that their ids stay unique

    def visit(dataset: pydicom.Dataset, elem: pydicom.DataElement) -> None:
        if id(elem) in seen:
            return
        seen[id(elem)] = elem
        if elem.VR == "UI" and elem.keyword in INSTANCE_UID_KEYWORDS and elem.value:
            values = elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue) else [elem.value]
            mapped = [remap_uid(v, key) for v in values]
            elem.value = mapped if len(mapped) > 1 else mapped[0]

    ds.walk(visit)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds
