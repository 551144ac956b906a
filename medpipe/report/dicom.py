"""DICOM Segmentation and Comprehensive 3D SR (TID 1500) of a study, made with highdicom.

The SEG holds the label image ``image.zarr/labels/segmentation`` as one binary segment per
label, frame by frame on the source images (matched by position along the slice normal, never
by InstanceNumber or file order); the SR holds each label's volume and references its segment.
Both reference the source series, so a PACS can store them beside the study.

Every processed study gets an SR: each model's result (positive, negative or not applicable) is a
qualitative evaluation in a measurement group of its own, so a study without any measurement still
has the one measurement group TID 1500 requires. Sources may be single-frame series (axial,
oblique, tilted), one multi-frame image (frames matched through its functional groups) or one
2-D image without patient geometry (CR, DX, US, secondary capture); direction cosines are
normalised before highdicom copies them.

Each object is built once, with the source's identity: highdicom copies the patient and study
modules and UIDs from the source images, so the objects sent to a PACS file into the source
study. Their own Series, SOP Instance, tracking and dimension UIDs are derived from the study's
input fingerprint and the object's kind (:func:`medpipe.pacs.identity.derived_uid`): a rerun of
unchanged inputs makes the same objects, and a resend makes no duplicate in the PACS.

The copies under ``OUT/`` are de-identified unless ``cfg.report.include_patient_identity`` is
on: the patient and study attributes are replaced with anonymous values (patient name, ID,
birth date, sex, age, accession number, physicians, institution, dates), every instance UID
(the study's, the series', the images', the frame of reference, the objects' own and every
reference to them) is remapped by a keyed one-way hash into ``2.25.`` form with the key in
``OUT/private/uid-key``, and the method is recorded as PatientIdentityRemoved requires (PS3.15
basic profile; the UIDs are remapped consistently, so references between SEG and SR hold).

For destinations (``cfg.send``), :func:`write_send_objects` writes the identified objects (SEG,
SR and the report as a Secondary Capture image) into a folder outside the study folder, for the
caller to enqueue into the outbox of each destination.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import logging
import os
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds

from .. import __version__, omezarr
from ..pacs import identity as ident

log = logging.getLogger(__name__)

ANONYMOUS_NAME = "ANONYMOUS^"
# Patient and study attributes replaced in research outputs (PS3.15 Annex E basic profile, the
# part that highdicom copies into derived objects). Value: the replacement ('' = empty).
IDENTITY = {
    "PatientName": ANONYMOUS_NAME, "PatientBirthDate": "", "PatientSex": "", "PatientAge": None,
    "PatientWeight": None, "PatientSize": None, "PatientAddress": None, "OtherPatientIDs": None,
    "OtherPatientIDsSequence": None, "OtherPatientNames": None, "PatientBirthTime": None,
    "PatientComments": None, "EthnicGroup": None, "PatientTelephoneNumbers": None, "MilitaryRank": None,
    "AccessionNumber": "", "ReferringPhysicianName": "", "StudyDate": "", "StudyTime": "", "StudyID": "",
    "StudyDescription": None, "InstitutionName": None, "InstitutionAddress": None,
    "InstitutionalDepartmentName": None, "PerformingPhysicianName": None, "OperatorsName": None,
    "NameOfPhysiciansReadingStudy": None, "PhysiciansOfRecord": None, "StationName": None,
    "DeviceSerialNumber": None, "RequestingPhysician": None, "IssuerOfPatientID": None,
}
UCUM_ML = pydicom.sr.coding.Code("ml", "UCUM", "milliliter")
NOT_APPLICABLE = pydicom.sr.coding.Code("385432009", "SCT", "Not applicable")
# What anonymize() does, in PS3.16 CID 7050 terms: the basic profile for the attributes the
# derived objects carry, with the UIDs kept so that SEG and SR still reference their sources.
DEID_CODES = (codes.cid7050.BasicApplicationConfidentialityProfile, codes.cid7050.RetainUidsOption)
DEID_METHOD = "medpipe: PS3.15 Basic Profile, Retain UIDs Option"  # LO: at most 64 characters
# "Retain UIDs" no longer: the UIDs are remapped (keyed hash) in the de-identified copies.
DEID_CODES_REMAPPED = (codes.cid7050.BasicApplicationConfidentialityProfile,)
DEID_METHOD_REMAPPED = "medpipe: PS3.15 Basic Profile, UIDs remapped by keyed hash"
# Attributes of IDENTITY that a made object holds about medpipe itself (SEG: type 1).
OWN_EQUIPMENT = ("DeviceSerialNumber",)
# Series numbers of the objects medpipe makes (SEG, SR, report image).
SERIES_NUMBERS = {"seg": 900, "sr": 901, "report": 902}
KINDS = ("seg", "sr", "report")
# Random UIDs: the default where a caller gives no fingerprint (tests of the builders).
UidFor = Callable[[str], str]
# Words that mark a model label as the negative result ("no_lesion", "normal", ...).
_NEGATIVE = ("no_", "no ", "non_", "non-", "not_", "normal", "negative", "absent", "healthy", "background")
_TYPES = {
    "lung": codes.SCT.Lung, "fat": codes.SCT.AdiposeTissue, "adipose": codes.SCT.AdiposeTissue,
    "soft_tissue": codes.SCT.SoftTissue, "bone": codes.SCT.Bone, "brain": codes.SCT.Brain,
    "liver": codes.SCT.Liver, "gray_matter": codes.SCT.GrayMatter, "grey_matter": codes.SCT.GrayMatter,
    "white_matter": codes.SCT.WhiteMatter, "csf": codes.SCT.CerebrospinalFluid,
    "lesion": codes.SCT.Lesion, "nodule": codes.SCT.Nodule, "mass": codes.SCT.Mass,
}
_ABNORMAL = {"lesion", "nodule", "mass", "tumor", "tumour"}


def property_codes(name: str) -> tuple[Any, Any]:
    """(category, type) codes of a label name; unknown names are 'Tissue'."""
    key = name.lower().replace(" ", "_").replace("-", "_")
    if key in _ABNORMAL or any(w in key for w in _ABNORMAL):
        return codes.SCT.MorphologicallyAbnormalStructure, _TYPES.get(key, codes.SCT.Lesion)
    return codes.SCT.Tissue, _TYPES.get(key, codes.SCT.Tissue)


# Type 2 attributes of the patient and study modules that highdicom copies: they must be present
# (possibly empty) in a source, or building SEG/SR fails on an AttributeError.
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
         "ReferringPhysicianName", "StudyID", "StudyDate", "StudyTime")


def with_type2(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` with every missing type 2 patient/study attribute present and empty."""
    for keyword in TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def anonymize(ds: pydicom.Dataset, study_key: str) -> pydicom.Dataset:
    """A copy of ``ds`` without patient identity: PatientID becomes the study key."""
    return _anonymize_in_place(copy.deepcopy(ds), study_key)


def _anonymize_in_place(out: pydicom.Dataset, study_key: str) -> pydicom.Dataset:
    for keyword, value in IDENTITY.items():
        if value is not None:
            setattr(out, keyword, value)
        elif keyword in out:
            delattr(out, keyword)
    out.PatientID = study_key
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = DEID_METHOD
    out.DeidentificationMethodCodeSequence = [_code_item(c) for c in DEID_CODES]
    out.remove_private_tags()
    return out


def deidentify(ds: pydicom.Dataset, study_key: str, key: bytes) -> pydicom.Dataset:
    """A de-identified copy of a made object: :func:`anonymize`, and every instance UID remapped
    with ``key`` (:func:`medpipe.pacs.identity.remap_uids`), the method recorded as such.

    The files are written by :func:`deidentified_bytes` (the same bytes, without this copy);
    this is the plain form, done by pydicom on a copy read back, that tests compare it with.
    """
    # The copy through the encoded bytes: a deepcopy of highdicom's SR objects is several times slower.
    out = pydicom.dcmread(io.BytesIO(_encode(ds)))
    out = ident.remap_uids(_anonymize_in_place(out, study_key), key)
    _anonymize_items(out)
    for keyword in OWN_EQUIPMENT:  # medpipe's own (the made object's equipment), not the source's
        if keyword in ds:
            setattr(out, keyword, ds[keyword].value)
    out.DeidentificationMethod = DEID_METHOD_REMAPPED
    out.DeidentificationMethodCodeSequence = [_code_item(c) for c in DEID_CODES_REMAPPED]
    return out


def deidentified_bytes(ds: pydicom.Dataset, study_key: str, key: bytes) -> bytes:
    """The file of :func:`deidentify` ``(ds, study_key, key)``, encoded from ``ds`` itself
    (:func:`deidentified_parts` joined)."""
    from .encoding import part_bytes

    return b"".join(map(part_bytes, deidentified_parts(ds, study_key, key)))


def deidentified_parts(ds: pydicom.Dataset, study_key: str, key: bytes) -> list[Any]:
    """The file of :func:`deidentify` ``(ds, study_key, key)``, encoded from ``ds`` itself, in
    parts (:func:`medpipe.report.encoding.encode_parts`: the pixel data is not copied).

    No copy of ``ds`` is made or read back: the top level is a new dataset holding the
    elements of ``ds`` with the identity replaced, and the rest (UIDs remapped, identity in
    sequence items replaced, private elements left out) is changed on the way into the file
    (:func:`medpipe.report.encoding.encode_dataset`). ``ds`` stays as it is. Tests compare the
    bytes with those of :func:`deidentify`.
    """
    from .encoding import encode_parts

    top = pydicom.Dataset()
    top.update(ds)  # the same elements: those changed below are replaced, never edited
    for attr in ("file_meta", "preamble"):
        if hasattr(ds, attr):
            setattr(top, attr, getattr(ds, attr))
    replacements: dict[str, Any] = {**IDENTITY, "PatientID": study_key, "PatientIdentityRemoved": "YES",
                                    "DeidentificationMethod": DEID_METHOD_REMAPPED,
                                    "DeidentificationMethodCodeSequence": [_code_item(c) for c in DEID_CODES_REMAPPED]}
    for keyword in OWN_EQUIPMENT:  # medpipe's own (the made object's equipment), not the source's
        replacements[keyword] = ds[keyword].value if keyword in ds else None
    for keyword, value in replacements.items():
        tag = pydicom.datadict.tag_for_keyword(keyword)
        vr = ds[tag].VR if tag in ds else pydicom.datadict.dictionary_VR(tag)
        if tag in top:
            del top[tag]
        if value is not None:
            top[tag] = pydicom.DataElement(tag, vr, value)
    return encode_parts(top, edit=_DeidentifyingEdit(key))


class _DeidentifyingEdit:
    """The element edit of :func:`deidentified_bytes`: private elements left out, instance
    UIDs remapped (:func:`medpipe.pacs.identity.remap_uid`), and the identity attributes
    inside sequence items replaced as :func:`_anonymize_items` does."""

    def __init__(self, key: bytes):
        self.key = key

    def __call__(self, elem: pydicom.DataElement, nested: bool) -> pydicom.DataElement | None:
        tag = elem.tag
        if tag.is_private:
            return None
        if nested and tag in _IDENTITY_TAGS:
            value = IDENTITY[_IDENTITY_TAGS[tag]]
            return None if value is None else pydicom.DataElement(tag, elem.VR, value)
        if elem.VR == "UI" and tag in _INSTANCE_UID_TAGS and elem.value:
            values = elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue) else [elem.value]
            mapped = [ident.remap_uid(v, self.key) for v in values]
            return pydicom.DataElement(tag, "UI", mapped if len(mapped) > 1 else mapped[0])
        return elem


def _anonymize_items(ds: pydicom.Dataset) -> None:
    """The identity attributes inside sequence items (highdicom copies the source's institution
    into ContributingEquipmentSequence) replaced as :func:`anonymize` does at the top level."""
    for elem in ds:
        if elem.VR != "SQ":
            continue
        for item in elem.value:
            for tag in [t for t in item.keys() if t in _IDENTITY_TAGS]:
                value = IDENTITY[_IDENTITY_TAGS[tag]]
                if value is None:
                    del item[tag]
                else:
                    item[tag].value = value
            _anonymize_items(item)


_IDENTITY_TAGS = {pydicom.datadict.tag_for_keyword(k): k for k in IDENTITY}
_INSTANCE_UID_TAGS = frozenset(pydicom.datadict.tag_for_keyword(k) for k in ident.INSTANCE_UID_KEYWORDS)


def random_uids(kind: str) -> str:
    """A fresh random UID whatever the kind (for callers without a fingerprint)."""
    return generate_uid()


def uids_for(record: dict[str, Any], sources: list[pydicom.Dataset]) -> UidFor:
    """The UID of each kind of part of the study's objects (``seg/instance``, ``sr/series``...),
    derived from the study key and input fingerprint of ``record``; without a fingerprint (a
    record made outside the flow), from the source instances' UIDs."""
    fingerprint = (record.get("provenance") or {}).get("input_fingerprint")
    if not fingerprint:
        digest = hashlib.sha256()
        for uid in sorted(str(ds.get("SOPInstanceUID", "")) for ds in sources):
            digest.update(uid.encode() + b"\0")
        fingerprint = "sources:" + digest.hexdigest()
    base = f"{record.get('study_key')}:{fingerprint}"
    return lambda kind: ident.derived_uid(base, kind)


def _derive_dimension_uids(ds: pydicom.Dataset, uid_for: UidFor, kind: str) -> None:
    """Replace the DimensionOrganizationUIDs highdicom makes at random by derived ones.

    They live in the dimension sequences; the per-frame functional groups (thousands of items,
    none of them with one) are not walked.
    """
    mapping: dict[str, str] = {}

    def visit(_: pydicom.Dataset, elem: pydicom.DataElement) -> None:
        if elem.tag == _DIMENSION_ORGANIZATION_UID and elem.value:
            elem.value = mapping.setdefault(str(elem.value), uid_for(f"{kind}/dimension/{len(mapping)}"))

    for elem in ds:  # in tag order, as Dataset.walk
        if elem.tag == _PER_FRAME_GROUPS:
            continue
        if elem.VR == "SQ":
            for item in elem.value:
                item.walk(visit)
        else:
            visit(ds, elem)


_DIMENSION_ORGANIZATION_UID = pydicom.datadict.tag_for_keyword("DimensionOrganizationUID")
_PER_FRAME_GROUPS = pydicom.datadict.tag_for_keyword("PerFrameFunctionalGroupsSequence")


def _code_item(code: Any) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return item


def with_deid_method(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` with a DeidentificationMethod wherever PatientIdentityRemoved is YES (type 1C).

    A source de-identified elsewhere may lack it; highdicom would copy the gap into SEG and SR.
    """
    if str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and not (
            ds.get("DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence")):
        ds.DeidentificationMethod = "de-identified before medpipe; method not recorded in the source"
    return ds


def _unit(values: Any) -> list[str]:
    """Row and column direction cosines scaled to unit length, as DS strings."""
    v = np.asarray([float(x) for x in values], float).reshape(2, 3)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return _ds(v.ravel())


def _ds(values: Any) -> list[str]:
    """Decimal strings of at most 16 characters (some writers emit ``2.6516699999999997``)."""
    return [format_number_as_ds(float(x)) for x in values]


def normalise_geometry(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` with unit direction cosines and valid DS positions, at the top level and in the
    functional groups, the places highdicom copies them from into a SEG.

    Scanners write cosines rounded to a few digits (``0\\0.98796\\-0.151524``); highdicom copies them
    as they are and validators require unit vectors.
    """
    items = [ds] + [item for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")
                    for group in ds.get(keyword) or []
                    for seq in ("PlaneOrientationSequence", "PlanePositionSequence")
                    for item in group.get(seq) or []]
    for item in items:
        if "ImageOrientationPatient" in item:
            item.ImageOrientationPatient = _unit(item.ImageOrientationPatient)
        if "ImagePositionPatient" in item:
            item.ImagePositionPatient = _ds(item.ImagePositionPatient)
    return ds


def _read_sources(files: list[str]) -> list[pydicom.Dataset]:
    """The image headers among ``files`` (unreadable files and non-images are left out)."""
    out = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - ingest already reported unreadable files
            continue
        if "SOPClassUID" in ds and "Rows" in ds:
            out.append(ds)
    return out


@dataclass
class SourceFrames:
    """Source images for highdicom and the Zarr slice of each of their frames.

    ``slices[i]`` is the Zarr slice shown by frame ``i`` (frames of all images in order; for
    single-frame images one per image), ``None`` where a frame matches no slice. ``flips`` says
    whether the Zarr's rows / columns run opposite to the source's.
    """

    images: list[pydicom.Dataset]
    slices: list[int | None]
    flips: tuple[bool, bool]


def _n_frames(ds: pydicom.Dataset) -> int:
    return int(getattr(ds, "NumberOfFrames", 1) or 1)


def _group_value(ds: pydicom.Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """A functional group attribute of one frame (per-frame first, then shared)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq and index < len(seq) and seq[index].get(sequence):
            value = seq[index].get(sequence)[0].get(keyword)
            if value is not None:
                return value
    return None


def frame_geometry(ds: pydicom.Dataset) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
    """(ImagePositionPatient, ImageOrientationPatient) of each frame of ``ds``; ``None`` where absent."""
    def arr(v: Any) -> np.ndarray | None:
        return None if v is None else np.asarray([float(x) for x in v], float)

    if _n_frames(ds) == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        return [(arr(ds.get("ImagePositionPatient")), arr(ds.get("ImageOrientationPatient")))]
    return [(arr(_group_value(ds, i, "PlanePositionSequence", "ImagePositionPatient")),
             arr(_group_value(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient")))
            for i in range(_n_frames(ds))]


def _check_size(ds: pydicom.Dataset, shape: tuple[int, int, int]) -> None:
    if (int(ds.Rows), int(ds.Columns)) != tuple(shape[1:]):
        raise ValueError(f"source images of {ds.Rows}x{ds.Columns} do not match the volume's {tuple(shape[1:])}")


def match_sources(sources: list[pydicom.Dataset], affine: np.ndarray, shape: tuple[int, int, int]) -> SourceFrames:
    """Match the source images (or the frames of one multi-frame image) with the Zarr slices.

    Frame positions are projected on the volume's slice axis, never ordered by InstanceNumber. A
    single 2-D image without patient geometry (CR, DX, US, OT) is the volume's only slice.

    Raises
    ------
    ValueError
        When the sources do not cover every slice or their geometry differs from the volume's.
    """
    if not sources:
        raise ValueError("no source image")
    multi = [ds for ds in sources if _n_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds]
    if multi and len(sources) > 1:
        raise ValueError(f"{len(sources)} source images of which {len(multi)} multi-frame: one multi-frame "
                         "image or single-frame images expected")
    geometry = [g for ds in sources for g in frame_geometry(ds)]
    if all(pos is None or iop is None for pos, iop in geometry):
        if len(geometry) != 1 or shape[0] != 1:
            raise ValueError(f"{len(geometry)} source frames without ImagePositionPatient/ImageOrientationPatient "
                             f"for {shape[0]} slices: only a single 2-D image can be matched without them")
        _check_size(sources[0], shape)
        return SourceFrames([sources[0]], [0], (False, False))
    _check_size(sources[0], shape)
    ax = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    ay = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    zcol, origin = affine[:3, 2], affine[:3, 3]
    slices: list[int | None] = []
    flips = None
    for pos, iop in geometry:
        k = None
        if pos is not None and iop is not None:
            row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
            dx, dy = float(row @ ax), float(col @ ay)
            if abs(abs(dx) - 1) <= 1e-3 and abs(abs(dy) - 1) <= 1e-3:
                flips = flips or (dy < 0, dx < 0)
                kf = float((pos - origin) @ zcol / (zcol @ zcol))
                if abs(kf - round(kf)) < 0.25 and 0 <= round(kf) < shape[0]:
                    k = round(kf)
        slices.append(k)
    if flips is None:
        raise ValueError("source image orientation differs from the image volume's")
    if multi:
        images = sources
    else:  # single-frame images: one per slice (the first at a position), in slice order
        by_slice: dict[int, pydicom.Dataset] = {}
        for ds, k in zip(sources, slices):
            if k is not None:
                by_slice.setdefault(k, ds)
        images = [by_slice[k] for k in sorted(by_slice)]
        slices = sorted(by_slice)
    missing = sorted(set(range(shape[0])) - set(k for k in slices if k is not None))
    if missing:
        raise ValueError(f"no source image at {len(missing)} of {shape[0]} slice positions (first: {missing[0]})")
    return SourceFrames(images, slices, flips)


def _encode(ds: pydicom.Dataset) -> bytes:
    """The file's bytes, as pydicom writes them (:mod:`.encoding` repeats items' elements once)."""
    from .encoding import encode_dataset

    return encode_dataset(ds)


def _encode_parts(ds: pydicom.Dataset) -> list[Any]:
    """:func:`_encode` in parts whose concatenation is the file (the pixel data not copied)."""
    from .encoding import encode_parts

    return encode_parts(ds)


def read_label_image(image: Path) -> np.ndarray:
    """The label image of ``image`` (an OME-Zarr folder) as one NumPy array, read slab by slab
    in this thread (never as tasks of the run's cluster, whose result would be sent back).

    Each slab of chunks is decoded into its place in the result: the whole volume is held once,
    not once as chunks and again as their concatenation.
    """
    lazy = omezarr.read_labels(image)
    out = np.empty(lazy.shape, lazy.dtype)
    z0 = 0
    for depth in lazy.chunks[0]:
        out[z0:z0 + depth] = lazy[z0:z0 + depth].compute(scheduler="sync")
        z0 += depth
    return out


def _segment_numbers(labels: np.ndarray, lut: np.ndarray, overwrite: bool) -> np.ndarray:
    """``lut[labels]``: ``labels`` itself where the map is the identity, mapped in place slice
    by slice when ``overwrite`` allows it and the numbers fit, else a mapped copy."""
    if labels.dtype == lut.dtype and np.array_equal(lut, np.arange(len(lut))):
        return labels
    if overwrite and labels.dtype == lut.dtype:
        for k in range(labels.shape[0]):  # a slice's temporary, not a volume's
            labels[k] = lut[labels[k]]
        return labels
    return lut[labels]


def seg_frames(labels: np.ndarray, match: SourceFrames, overwrite: bool = False) -> np.ndarray:
    """The label image as one frame per source frame, in the source's row and column order
    (``labels`` itself where those are the volume's slices in order, unflipped; flipped in place
    when ``overwrite`` allows it)."""
    in_order = list(match.slices) == list(range(labels.shape[0]))
    if in_order and overwrite and any(match.flips):
        for k in range(labels.shape[0]):  # numpy copies an overlapping right-hand side
            labels[k] = labels[k][::-1 if match.flips[0] else 1, ::-1 if match.flips[1] else 1]
        return labels
    if in_order:
        frames = labels
    else:
        empty = np.zeros(labels.shape[1:], labels.dtype)
        frames = np.stack([labels[k] if k is not None else empty for k in match.slices])
    if match.flips[0]:
        frames = frames[:, ::-1, :]
    if match.flips[1]:
        frames = frames[:, :, ::-1]
    return np.ascontiguousarray(frames)


def build_seg(match: SourceFrames, labels: np.ndarray, names: dict[int, str], method: str | None,
              series_number: int = 900, slice_spacing: float | None = None,
              uid_for: UidFor = random_uids, overwrite: bool = False) -> tuple[Any, dict[int, int]]:
    """The Segmentation dataset and the map label value -> segment number.

    Parameters
    ----------
    match : SourceFrames
        From :func:`match_sources`.
    labels : ndarray, shape (Z, Y, X)
        The Zarr label image.
    names : dict
        Label value to name (value 0, background, is no segment).
    method : str or None
        The segmentation method (named in the algorithm identification).
    slice_spacing : float, optional
        The volume's slice spacing (mm): the SEG's SliceThickness where the source has none.
    uid_for : callable
        The UID of each kind of part (``seg/series``, ``seg/instance``, ``seg/tracking/<v>``):
        :func:`uids_for` makes them reproducible; the default is random.
    overwrite : bool
        ``labels`` may be overwritten with the SEG's frames (segment numbers, in the source's
        order): the volume is then not copied.
    """
    import highdicom as hd

    seg_number, lut = _segment_lut(names, int(labels.max()))
    frames = seg_frames(_segment_numbers(labels, lut, overwrite), match, overwrite)
    seg = hd.seg.Segmentation(**_seg_arguments(match, names, seg_number, method, series_number, uid_for),
                              pixel_array=frames, omit_empty_frames=bool(frames.any()))
    return _mend_seg(seg, match, slice_spacing, uid_for), seg_number


def build_seg_from_image(match: SourceFrames, image: Path, names: dict[int, str], method: str | None,
                         series_number: int = 900, slice_spacing: float | None = None,
                         uid_for: UidFor = random_uids) -> tuple[Any, dict[int, int]]:
    """:func:`build_seg` of the label image of ``image`` (an OME-Zarr folder), read slab by slab.

    The volume is never held whole: each slab's frames are packed as it is read, and highdicom
    builds the rest from a stand-in (:mod:`medpipe.report.seg_pixels`); the SEG is that of
    :func:`build_seg`. Where that cannot be done (a frame's pixels not a whole number of bytes,
    frames not derived from single source frames), the label image is read whole for
    :func:`build_seg`.
    """
    from . import seg_pixels

    n_slices, rows, columns = omezarr.read_labels(image).shape
    seg_number, lut = _segment_lut(names, 0)
    if rows * columns % 8:
        return _seg_from_whole_image(match, image, names, method, series_number, slice_spacing, uid_for)
    # the packed frames wait on disk beside the study (unnamed files, gone when closed); the
    # SEG's pixel data stays there, as pydicom's buffered value, until the SEG is dropped
    with tempfile.TemporaryFile(dir=Path(image).parent) as file:
        packed = seg_pixels.pack_label_frames(seg_pixels.label_slabs(image), lut, n_slices, match.flips, file)
        stand_in = seg_pixels.presence_stand_in(packed.present, list(match.slices), (rows, columns))
        if stand_in is None:
            return _seg_from_whole_image(match, image, names, method, series_number, slice_spacing, uid_for)
        seg = seg_pixels.metadata_only_segmentation(
            **_seg_arguments(match, names, seg_number, method, series_number, uid_for),
            pixel_array=stand_in, omit_empty_frames=any(packed.present))
        order = seg_pixels.frame_order(seg, match.images, list(match.slices))
        if order is None:
            del seg
            return _seg_from_whole_image(match, image, names, method, series_number, slice_spacing, uid_for)
        seg.PixelData = seg_pixels.join_frames(packed, order, tempfile.TemporaryFile(dir=Path(image).parent))
    return _mend_seg(seg, match, slice_spacing, uid_for), seg_number


def _seg_from_whole_image(match: SourceFrames, image: Path, names: dict[int, str], method: str | None,
                          series_number: int, slice_spacing: float | None, uid_for: UidFor) -> tuple[Any, dict[int, int]]:
    log.debug("SEG of %s built from the whole label image", image)
    return build_seg(match, read_label_image(image), names, method, series_number, slice_spacing, uid_for,
                     overwrite=True)


def _segment_lut(names: dict[int, str], top: int) -> tuple[dict[int, int], np.ndarray]:
    """The map label value -> segment number (consecutive from 1, in order of value) and as a
    lookup table of at least ``top + 1`` entries (0: no segment)."""
    values = sorted(v for v in names if v != 0)
    if not values:
        raise ValueError("the segmentation has no labels besides background")
    seg_number = {v: i + 1 for i, v in enumerate(values)}
    lut = np.zeros(max(top, max(values)) + 1, np.uint8 if len(values) < 256 else np.uint16)
    for v, s in seg_number.items():
        lut[v] = s
    return seg_number, lut


def _seg_arguments(match: SourceFrames, names: dict[int, str], seg_number: dict[int, int], method: str | None,
                   series_number: int, uid_for: UidFor) -> dict[str, Any]:
    """highdicom's Segmentation arguments besides the pixel array and ``omit_empty_frames``."""
    import highdicom as hd

    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medpipe {method or 'segmentation'}", version=__version__,
        family=codes.cid7162.ArtificialIntelligence if any(w in (method or "").lower() for w in ("model", "net", "cnn"))
        else codes.cid7162.HistogramAnalysis,  # medpipe's classical methods: thresholds and morphology
    )
    descriptions = []
    for v in sorted(seg_number):
        category, kind = property_codes(names[v])
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=seg_number[v], segment_label=names[v][:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=uid_for(f"seg/tracking/{v}"),
            tracking_id=f"label {v}: {names[v]}"[:64],
        ))
    return dict(
        source_images=[share_frame_geometry(ds) for ds in match.images],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=uid_for("seg/series"), series_number=series_number,
        sop_instance_uid=uid_for("seg/instance"), instance_number=1, manufacturer="medpipe",
        manufacturer_model_name="medpipe", software_versions=__version__,
        device_serial_number="0", content_label="MEDPIPE", content_description=f"medpipe {method or ''}".strip()[:64],
    )  # omit_empty_frames: an empty segmentation (a negative result) keeps its frames


def _mend_seg(seg: Any, match: SourceFrames, slice_spacing: float | None, uid_for: UidFor) -> Any:
    """What highdicom leaves out or copies flawed, set right in ``seg`` (returned)."""
    _mend_pixel_measures(seg, slice_spacing)
    _derive_dimension_uids(seg, uid_for, "seg")
    if "PatientOrientation" not in seg and "ImageOrientationPatient" not in match.images[0]:
        # Type 2C without patient geometry (CR, DX, US, OT); highdicom does not copy it.
        seg.PatientOrientation = match.images[0].get("PatientOrientation") or ""
    return seg


def _mend_pixel_measures(seg: pydicom.Dataset, slice_spacing: float | None) -> None:
    """Pixel measures as the SEG IOD requires them, where highdicom copied a source's flaws: a
    missing SliceThickness (Type 1C with a patient frame of reference) becomes the volume's slice
    spacing, and a zero PixelSpacing (seen on real radiographs) is dropped with its sequence."""
    shared = (seg.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()])[0]
    if not shared.get("PixelMeasuresSequence"):
        return
    measures = shared.PixelMeasuresSequence[0]
    spacing = [float(v) for v in measures.get("PixelSpacing") or []]
    if len(spacing) != 2 or min(spacing) <= 0:
        del shared.PixelMeasuresSequence
        return
    if "FrameOfReferenceUID" in seg and not measures.get("SliceThickness") and slice_spacing:
        measures.SliceThickness = format_number_as_ds(float(slice_spacing))


def share_frame_geometry(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` with PixelMeasures and PlaneOrientation in its shared functional groups when a
    multi-frame image keeps them per frame only (Philips and Siemens XA enhanced MR) and every
    frame has the same: highdicom reads them from the shared groups alone. Changed in place.

    Raises
    ------
    ValueError
        When the frames' pixel spacing or orientation differ (one SEG plane geometry cannot hold them).
    """
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return ds
    if not ds.get("SharedFunctionalGroupsSequence"):
        ds.SharedFunctionalGroupsSequence = [pydicom.Dataset()]
    shared = ds.SharedFunctionalGroupsSequence[0]
    for sequence in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
        if sequence in shared:
            continue
        items = [(frame.get(sequence) or [None])[0] for frame in ds.PerFrameFunctionalGroupsSequence]
        if any(item is None for item in items) or any(item != items[0] for item in items):
            raise ValueError(f"the source's frames differ in {sequence[:-8]} or lack it")
        shared[sequence] = pydicom.DataElement(sequence, "SQ", [copy.deepcopy(items[0])])
    return ds


def referenced_segments(seg: Any, numbers: list[int]) -> dict[int, Any]:
    """The SR's reference to segments ``numbers`` of ``seg`` (segment number to
    ``highdicom.sr.ReferencedSegment``), as :func:`referenced_segment` makes them one by one.

    One pass over the per-frame groups finds the source images of every segment, and each
    source image's content item is made once and shared by the segments that show it (a SEG
    has a frame per segment and slice: the references of all segments are several times the
    source images). Segments whose frames name no source image are left to
    :func:`referenced_segment`. Tests compare the result with highdicom's
    ``ReferencedSegment.from_segmentation``.
    """
    import highdicom as hd

    images: dict[int, dict[str, Any]] = {n: {} for n in numbers}
    made: dict[tuple[Any, ...], Any] = {}
    for frame in seg.get("PerFrameFunctionalGroupsSequence") or []:
        ident_seq = frame.get("SegmentIdentificationSequence")
        if not ident_seq:
            break  # one segment, identified in the shared groups: referenced_segment's way
        refs = images.get(int(ident_seq[0].ReferencedSegmentNumber))
        if refs is None:
            continue
        for derivation in frame.get("DerivationImageSequence") or []:
            for src in derivation.get("SourceImageSequence") or []:
                uid = src.ReferencedSOPInstanceUID
                if uid in refs:
                    continue
                frames = src.get("ReferencedFrameNumber")
                if frames is not None and src["ReferencedFrameNumber"].VM == 1:
                    frames = [frames]
                key = (src.ReferencedSOPClassUID, uid, tuple(frames) if frames is not None else None)
                if key not in made:
                    made[key] = hd.sr.SourceImageForSegmentation(
                        referenced_sop_class_uid=key[0], referenced_sop_instance_uid=uid,
                        referenced_frame_numbers=frames)
                refs[uid] = made[key]
    return {n: hd.sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                       segment_number=n, source_images=list(images[n].values()))
            if images.get(n) else referenced_segment(seg, n) for n in numbers}


def referenced_segment(seg: Any, number: int) -> Any:
    """The SR's reference to one segment of ``seg``.

    highdicom 0.28's ``ReferencedSegment.from_segmentation`` reads the segment number of each
    frame from the per-frame groups only; a SEG of one segment keeps it in the shared groups, so
    every frame (and every source image) belongs to that segment.
    """
    import highdicom as hd

    try:
        return hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=number)
    except AttributeError:
        sources = [hd.sr.SourceImageForSegmentation(ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID)
                   for series in seg.ReferencedSeriesSequence for ref in series.ReferencedInstanceSequence]
        return hd.sr.ReferencedSegment(seg.SOPClassUID, seg.SOPInstanceUID, number, source_images=sources)


def _is_negative(label: str, labels: list[str]) -> bool:
    key = label.lower()
    return key.startswith(_NEGATIVE) or (len(labels) == 2 and label == labels[0])


def model_evaluation(model: dict[str, Any] | None) -> tuple[Any, Any, str]:
    """(finding, value, tracking text) of the model's study-level result.

    The finding is the model's positive class (e.g. Lesion; Lesion where unknown); the value is
    Present, Absent, or Not applicable where no model ran, it was skipped, or it gave no label.

    >>> [c.meaning for c in model_evaluation(None)[:2]]
    ['Lesion', 'Not applicable']
    >>> model = {"labels": ["no_lesion", "lesion"], "outputs": {"study_label": "no_lesion"}, "name": "cnn"}
    >>> model_evaluation(model)[1].meaning, model_evaluation(model)[2]
    ('Absent', 'cnn: no_lesion')
    """
    labels = [str(x) for x in (model or {}).get("labels") or []]
    outputs = (model or {}).get("outputs") or {}
    label = outputs.get("study_label")
    # The question medpipe's models answer is 'lesion?': the default where the model names none
    # (DCM 'Finding' would read back as the group's finding type, not as an evaluation).
    positive = next((x for x in reversed(labels) if not _is_negative(x, labels)), None) or (
        label if label is not None and not _is_negative(str(label), labels) else "lesion")
    finding = property_codes(positive)[1]
    name = (model or {}).get("name") or "model"
    if model is None or model.get("skipped") or model.get("applicable") is False or label is None:
        skipped = model.get("skipped") or model.get("reason") if model else None
        why = "no model" if model is None else (f"skipped: {skipped}" if skipped else "no result")
        return finding, NOT_APPLICABLE, f"{name}: not applicable ({why})"
    value = codes.SCT.Absent if _is_negative(str(label), labels) else codes.SCT.Present
    score = outputs.get("study_score")
    return finding, value, f"{name}: {label}" + (f" (score {score:.3f})" if isinstance(score, (int, float)) else "")


def build_sr(sources: list[pydicom.Dataset], seg: Any | None, seg_number: dict[int, int],
             record: dict[str, Any], series_number: int = 901, uid_for: UidFor = random_uids) -> Any:
    """Comprehensive 3D SR (TID 1500): each model's result and the volume of each measured label.

    Each model's result is one measurement group holding one qualitative evaluation (Present,
    Absent or Not applicable), identified by the model's name and version, so that every study,
    also one without measurements, has an SR. The models are the record's ``models`` (one per
    configured model), else its single ``model``.
    """
    import highdicom as hd

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid_for("sr/device"), name="medpipe", manufacturer_name="medpipe", model_name=__version__),
    )
    groups = []
    for n, model in enumerate(record.get("models") or [record.get("model")]):
        finding, value, text = model_evaluation(model)
        model_id = hd.sr.AlgorithmIdentification(name=str((model or {}).get("name") or "medpipe")[:64],
                                                 version=str((model or {}).get("version") or __version__)[:64])
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=uid_for(f"sr/tracking/model/{n}"), identifier=text[:64]),
            finding_type=finding, algorithm_id=model_id,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=finding, value=value)]))
    algorithm = hd.sr.AlgorithmIdentification(name="medpipe", version=__version__)
    measured = [seg_number[int(m["label"])] for m in (record.get("segmentation") or {}).get("measurements") or []
                if int(m["label"]) in seg_number]
    segments = referenced_segments(seg, measured) if seg is not None else {}
    for m in (record.get("segmentation") or {}).get("measurements") or []:
        v = int(m["label"])
        category, kind = property_codes(m["name"])
        measurement = hd.sr.Measurement(name=codes.SCT.Volume, value=float(m["volume_ml"]), unit=UCUM_ML,
                                        algorithm_id=algorithm)
        tracking = hd.sr.TrackingIdentifier(uid=uid_for(f"sr/tracking/label/{v}"),
                                            identifier=f"label {v}: {m['name']}"[:64])
        if seg is not None and v in seg_number:
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, referenced_segment=segments[seg_number[v]],
                finding_type=kind, finding_category=category, measurements=[measurement]))
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, finding_type=kind, finding_category=category,
                measurements=[measurement]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported={"CT": codes.cid100.CTUnspecifiedBodyRegion, "MR": codes.cid100.MRIUnspecifiedBodyRegion}.get(
            record.get("modality"), codes.cid100.ImagingProcedure),
        imaging_measurements=groups,
    )
    evidence = ([seg] if seg is not None else []) + list(sources)
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=uid_for("sr/series"), series_number=series_number,
        sop_instance_uid=uid_for("sr/instance"), instance_number=1, manufacturer="medpipe", is_complete=True,
    )


def _prepare(sources: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The source headers made fit for highdicom to copy into SEG, SR and the report image, in
    place (they are read for this alone).

    Type 2 attributes present; unit direction cosines and valid positions; a de-identification
    method wherever identity is marked removed. The identity stays (de-identification is done
    on the made objects, so that one build serves the PACS and OUT).
    """
    return [with_deid_method(normalise_geometry(with_type2(ds))) for ds in sources]


def _object(kind: str, file: str | None, reason: str | None) -> dict[str, Any]:
    return {"object": kind, "file": file, "made": file is not None, "reason": reason}


def _not_attempted(record: dict[str, Any], disabled: str | None, sources: list[pydicom.Dataset],
                   source_files: list[str]) -> str | None:
    """Why an object is not made before trying, or None; ``disabled`` is the reason when off."""
    if disabled:
        return disabled
    if record.get("status") != "ok":
        return "the study failed: " + str(record.get("error") or "see error")
    if not source_files:
        return "no source DICOM files"
    if not sources:
        return f"none of the {len(source_files)} source files is a readable DICOM image"
    return None


@dataclass
class MadeObjects:
    """The identified objects of a study (``seg``, ``sr``, ``report``), why others were not made,
    and the warnings of those whose making failed."""

    datasets: dict[str, pydicom.Dataset] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def make_objects(study_dir: Path, record: dict[str, Any], source_files: list[str] | None,
                 disabled: dict[str, str]) -> MadeObjects:
    """Build the study's objects with the source's identity and derived UIDs.

    Parameters
    ----------
    study_dir : Path
        The study folder (``image.zarr`` with ``labels/``).
    record : dict
        The study's report record.
    source_files : list of str or None
        The DICOM files of the series used.
    disabled : dict
        Kind (``seg``, ``sr``, ``report``) to the reason it is not wanted; the others are made.
    """
    study_dir = Path(study_dir)
    source_files = list(source_files or [])
    made = MadeObjects()
    wanted = record.get("status") == "ok" and any(k not in disabled for k in KINDS)
    sources = _read_sources(source_files) if wanted else []
    ordered = _prepare(sources)
    uid_for = uids_for(record, sources)
    key = record.get("study_key")

    seg, seg_number = None, {}
    reason = _not_attempted(record, disabled.get("seg"), sources, source_files)
    segmentation = record.get("segmentation") or {}
    image = study_dir / "image.zarr"
    if reason is None and not (segmentation.get("labels") and (image / "labels").is_dir()):
        reason = "no segmentation"
    if reason is None:
        try:
            meta = omezarr.read_meta(image)
            names = {int(k): v for k, v in segmentation["labels"].items()} or omezarr.label_names(image)
            match = match_sources(ordered, meta.affine, meta.shape)
            seg, seg_number = build_seg_from_image(match, image, names, segmentation.get("method"),
                                                   slice_spacing=float(meta.spacing[0]), uid_for=uid_for)
            made.datasets["seg"] = seg
        except OSError:  # the disk or file system (full, gone): the study fails and a rerun retries it
            raise
        except Exception as exc:  # a derived object's failure is a warning, never the study's
            log.warning("SEG of study %s not made: %s", key, exc, exc_info=True)
            reason, seg = f"{type(exc).__name__}: {exc}", None
            made.problems.append(f"DICOM SEG not written: {exc}")
    if reason is not None:
        made.reasons["seg"] = reason

    _make_one(made, "sr", "SR", key, _not_attempted(record, disabled.get("sr"), sources, source_files),
              lambda: build_sr(ordered, seg, seg_number, record, uid_for=uid_for))
    _make_one(made, "report", "report image", key,
              _not_attempted(record, disabled.get("report"), sources, source_files),
              lambda: build_report_image(study_dir, record, ordered[0], uid_for=uid_for))
    return made


def _make_one(made: "MadeObjects", kind: str, label: str, key: str, reason: str | None,
              build: Callable[[], pydicom.Dataset]) -> None:
    """Build one derived object into ``made`` unless ``reason`` says why not; a failure is a
    warning and the object's reason, never the study's failure."""
    if reason is None:
        try:
            made.datasets[kind] = build()
        except Exception as exc:
            log.warning("%s of study %s not made: %s", label, key, exc, exc_info=True)
            reason = f"{type(exc).__name__}: {exc}"
            made.problems.append(f"DICOM {label} not written: {exc}")
    if reason is not None:
        made.reasons[kind] = reason


def output_root(study_dir: Path) -> Path:
    """The output folder OUT of a study folder: ``OUT/.work/<run>/<key>`` (staging) or
    ``OUT/studies/<key>``; any other folder's parent (a study folder made outside the flow)."""
    study_dir = Path(study_dir).resolve()
    for parent in study_dir.parents:
        if parent.name in (".work", "studies"):
            return parent.parent
    return study_dir.parent


def write_dicom_outputs(study_dir: Path, record: dict[str, Any], cfg: Any,
                        source_files: list[str] | None, *, send_dir: Path | None = None,
                        uid_key: bytes | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Write ``seg.dcm`` and ``sr.dcm`` as configured.

    Parameters
    ----------
    study_dir : Path
        The study folder (``image.zarr`` with ``labels/`` inside); the objects are written here.
    record : dict
        The study's report record (status, segmentation, measurements, model result).
    cfg : Config
        ``cfg.report``: which objects, and whether they carry patient identity (off: the copies
        are de-identified and their UIDs remapped with the UID key).
    source_files : list of str or None
        The DICOM files of the series used.
    send_dir : Path, optional
        Also write the objects for destinations (``cfg.send``) into this folder, from the same
        build where the same objects are wanted (see :func:`write_send_objects`). Never a
        folder under the study folder: the sent objects carry the patient's identity.
    uid_key : bytes, optional
        The key of the UID remap; default ``OUT/private/uid-key`` of :func:`output_root`.

    Returns
    -------
    objects : list of dict
        One per object (``seg``, ``sr``): ``object``, ``file`` (or None), ``made`` and the
        ``reason`` it was not made (None when made).
    problems : list of str
        Warnings for objects whose making failed (not for those off by configuration).
    """
    rc = cfg.report
    study_dir = Path(study_dir)
    disabled = {}
    for kind, flag in (("seg", "dicom_seg"), ("sr", "dicom_sr")):
        if not getattr(rc, flag):
            disabled[kind] = f"disabled by configuration (report.{flag} is false)"
    send_wanted = set(_send_cfg(cfg).objects) if send_dir is not None else set()
    # One build serves both when the destinations want the same SEG and SR as OUT.
    one_pass = send_dir is not None and all((k in send_wanted) == (k not in disabled) for k in ("seg", "sr"))
    if not (one_pass and "report" in send_wanted):
        disabled["report"] = "not an output file"
    made = make_objects(study_dir, record, source_files, disabled)
    identified = rc.include_patient_identity
    key = None if identified else (uid_key or ident.load_uid_key(output_root(study_dir)))
    objects = []
    for kind in ("seg", "sr"):
        ds, file = made.datasets.get(kind), None
        if ds is not None:
            data = _encode_parts(ds) if identified else deidentified_parts(ds, record["study_key"], key)
            _write_parts(study_dir / f"{kind}.dcm", data)
            file = f"{kind}.dcm"
        objects.append(_object(kind, file, made.reasons.get(kind)))
    if one_pass:
        _write_send(Path(send_dir), made, send_wanted, record, cfg, uid_key or key, study_dir)
    elif send_dir is not None:
        made.problems += write_send_objects(study_dir, record, cfg, source_files, send_dir, uid_key=uid_key).problems
    return objects, made.problems


def _send_cfg(cfg: Any) -> Any:
    """``cfg.send``, or its defaults where a configuration has no send section."""
    send = getattr(cfg, "send", None)
    if send is None:
        from ..config import SendConfig

        send = SendConfig()
    return send


def _write_send(send_dir: Path, made: MadeObjects, wanted: set[str], record: dict[str, Any], cfg: Any,
                uid_key: bytes | None, study_dir: Path) -> list[Path]:
    send_dir = Path(send_dir)
    send_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(send_dir, 0o700)  # the objects carry the patient's identity
    deidentified = _send_cfg(cfg).identity == "deidentified"
    files = []
    for kind in KINDS:
        ds = made.datasets.get(kind)
        if ds is None or kind not in wanted:
            continue
        if deidentified:
            uid_key = uid_key or ident.load_uid_key(output_root(study_dir))
            data = deidentified_parts(ds, record["study_key"], uid_key)
        else:
            data = _encode_parts(ds)
        files.append(_write_parts(send_dir / f"{kind}.dcm", data, private=True))
    return files


def _write_parts(path: Path, parts: list[Any], private: bool = False) -> Path:
    """Write the concatenation of ``parts`` to ``path`` through a temporary file in the same
    folder, flushed to disk, and a rename (as :func:`medpipe.atomic.write_bytes`, without
    joining the parts into one copy of the file; :func:`medpipe.report.encoding.encode_parts`).
    ``private``: owner-only (0600), else as the
    umask lets people read it."""
    from .encoding import write_part

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                write_part(f, part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@dataclass
class SendObjects:
    """What :func:`write_send_objects` wrote: the files, why the others were not made, warnings."""

    files: list[Path]
    reasons: dict[str, str]
    problems: list[str]


def write_send_objects(study_dir: Path, record: dict[str, Any], cfg: Any, source_files: list[str] | None,
                       send_dir: Path, *, uid_key: bytes | None = None) -> SendObjects:
    """Write the objects for destinations into ``send_dir``: ``seg.dcm``, ``sr.dcm`` and
    ``report.dcm`` (a Secondary Capture of the report's key slices and findings), as
    ``cfg.send.objects`` lists them.

    They carry the source's patient and study modules and UIDs (``cfg.send.identity`` "source",
    the default: they file into the source study), or the de-identified form of the files under
    OUT ("deidentified"). Their Series and SOP Instance UIDs are derived from the study's input
    fingerprint, so a rerun of unchanged inputs writes the same objects.

    ``send_dir`` must lie outside the published study folder (the objects are identifying); the
    caller enqueues its files into each destination's outbox (:class:`medpipe.pacs.outbox.Outbox`).

    Example::

        made = write_send_objects(staging, record, cfg, plan.files, out / ".work" / run_id / "send" / key)
        enqueue_study(out, cfg, key, record["provenance"]["input_fingerprint"], made.files)  # medpipe.pacs.send
    """
    wanted = set(_send_cfg(cfg).objects)
    disabled = {k: "not in send.objects" for k in KINDS if k not in wanted}
    made = make_objects(Path(study_dir), record, source_files, disabled)
    files = _write_send(send_dir, made, wanted, record, cfg, uid_key, Path(study_dir))
    return SendObjects(files, made.reasons, made.problems)


def report_lines(record: dict[str, Any]) -> list[str]:
    """The text of the report image: each model's result and each measured label's volume."""
    lines = [f"medpipe {__version__}: automatic results (check before clinical use)"]
    for model in record.get("models") or [record.get("model")]:
        lines.append(model_evaluation(model)[2])
    for m in (record.get("segmentation") or {}).get("measurements") or []:
        lines.append(f"{m['name']}: {float(m['volume_ml']):.1f} ml")
    candidates = (record.get("segmentation") or {}).get("lesion_candidates") or []
    if candidates:
        lines.append(f"lesion candidates: {len(candidates)}")
    return [line.encode("ascii", "replace").decode("ascii") for line in lines]


def report_pixels(study_dir: Path, record: dict[str, Any]) -> np.ndarray:
    """The report as one RGB picture: the key slices (from report.html's figures) side by side
    and the findings' text under them."""
    from PIL import Image, ImageDraw, ImageFont

    from .figures import study_figures

    figs = study_figures(study_dir, record, max_px=512)
    keys = figs.key_slices[:3]
    panels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(f.png))).convert("RGB")) for f in keys]
    lines = report_lines(record)
    font = ImageFont.load_default(size=16)
    line_h, pad = 22, 12
    width = max(640, sum(p.shape[1] for p in panels) + pad * (len(panels) + 1))
    top = max((p.shape[0] for p in panels), default=0) + (2 * pad + line_h if panels else pad)
    canvas = Image.new("RGB", (width, top + line_h * len(lines) + pad), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    x = pad
    for f, p in zip(keys, panels):
        canvas.paste(Image.fromarray(p), (x, pad))
        caption = f"{f.title}: {f.caption}" if f.caption else f.title
        draw.text((x, pad + p.shape[0] + 4), caption.encode("ascii", "replace").decode("ascii"),
                  fill=(200, 200, 200), font=ImageFont.load_default(size=13))
        x += p.shape[1] + pad
    for n, line in enumerate(lines):
        draw.text((pad, top + n * line_h), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def build_report_image(study_dir: Path, record: dict[str, Any], source: pydicom.Dataset,
                       series_number: int = SERIES_NUMBERS["report"], uid_for: UidFor = random_uids) -> Any:
    """The report as a Secondary Capture image in the source's study (patient and study modules
    copied from ``source``), for viewers that cannot show SEG or SR."""
    import highdicom as hd

    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=report_pixels(study_dir, record), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", patient_orientation=("L", "P"),
        series_instance_uid=uid_for("report/series"), series_number=series_number,
        sop_instance_uid=uid_for("report/instance"), instance_number=1, manufacturer="medpipe")
    # A page of several pictures and text has no one orientation: PatientOrientation is type 2,
    # present and empty (highdicom insists on a value for the patient coordinate system).
    sc.PatientOrientation = ""
    sc.Laterality = source.get("Laterality") or ""  # type 2C: the source's, or empty (unknown)
    sc.BurnedInAnnotation = "YES"  # the findings are written into the pixels
    sc.SeriesDescription = "medpipe report"
    sc.ConversionType = "WSD"  # workstation: made by software, not digitised
    return sc
