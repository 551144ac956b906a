"""DICOM Segmentation and Comprehensive 3D SR (TID 1500) of a study, made with highdicom.

The SEG holds the label image ``image.zarr/labels/segmentation`` as one binary segment per
label, frame by frame on the source images (matched by position along the slice normal, never
by InstanceNumber or file order); the SR holds each label's volume and references its segment.
Both reference the source series, so a PACS can store them beside the study.

highdicom copies the patient and study modules from the source images. Unless
``cfg.report.include_patient_identity`` is on, they are first replaced with anonymous values
(patient name, ID, birth date, sex, age, accession number, physicians, institution, dates);
the UIDs stay, because the references need them.
"""

from __future__ import annotations

import copy
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from .. import __version__, atomic, omezarr

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
    out = copy.deepcopy(ds)
    for keyword, value in IDENTITY.items():
        if value is not None:
            setattr(out, keyword, value)
        elif keyword in out:
            delattr(out, keyword)
    out.PatientID = study_key
    out.PatientIdentityRemoved = "YES"
    out.remove_private_tags()
    return out


def _read_sources(files: list[str]) -> list[pydicom.Dataset]:
    out = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            out.append(ds)
    return out


def match_slices(sources: list[pydicom.Dataset], affine: np.ndarray, shape: tuple[int, int, int]
                 ) -> tuple[list[pydicom.Dataset], tuple[bool, bool]]:
    """The source image of each Zarr slice (index order) and whether rows/columns are flipped.

    Positions are projected on the volume's slice axis; every slice needs exactly one image.
    """
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for ds in sources):
        raise ValueError("multi-frame source images are not supported for SEG yet")
    ds0 = sources[0]
    row_cos, col_cos = np.asarray(ds0.ImageOrientationPatient[:3], float), np.asarray(ds0.ImageOrientationPatient[3:], float)
    ax = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    ay = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    dx, dy = float(row_cos @ ax), float(col_cos @ ay)
    if abs(abs(dx) - 1) > 1e-3 or abs(abs(dy) - 1) > 1e-3:
        raise ValueError("source image orientation differs from the image volume's")
    if (int(ds0.Rows), int(ds0.Columns)) != tuple(shape[1:]):
        raise ValueError(f"source images of {ds0.Rows}x{ds0.Columns} do not match the volume's {shape[1:]}")
    zcol, origin = affine[:3, 2], affine[:3, 3]
    by_slice: dict[int, pydicom.Dataset] = {}
    for ds in sources:
        k = float((np.asarray(ds.ImagePositionPatient, float) - origin) @ zcol / (zcol @ zcol))
        kr = round(k)
        if abs(k - kr) < 0.25 and 0 <= kr < shape[0]:
            by_slice.setdefault(kr, ds)
    missing = [k for k in range(shape[0]) if k not in by_slice]
    if missing:
        raise ValueError(f"no source image at {len(missing)} of {shape[0]} slice positions (first: {missing[0]})")
    return [by_slice[k] for k in range(shape[0])], (dy < 0, dx < 0)


def _encode(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def build_seg(sources: list[pydicom.Dataset], labels: np.ndarray, names: dict[int, str], flips: tuple[bool, bool],
              method: str | None, series_number: int = 900) -> tuple[Any, dict[int, int]]:
    """The Segmentation dataset and the map label value -> segment number."""
    import highdicom as hd

    values = sorted(v for v in names if v != 0)
    seg_number = {v: i + 1 for i, v in enumerate(values)}
    lut = np.zeros(max(int(labels.max()), max(values)) + 1, np.uint16)
    for v, s in seg_number.items():
        lut[v] = s
    frames = lut[labels]
    if flips[0]:
        frames = frames[:, ::-1, :]
    if flips[1]:
        frames = frames[:, :, ::-1]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medpipe {method or 'segmentation'}", version=__version__,
        family=codes.cid7162.ArtificialIntelligence if any(w in (method or "").lower() for w in ("model", "net", "cnn"))
        else codes.cid7162.HistogramAnalysis,  # medpipe's classical methods: thresholds and morphology
    )
    descriptions = []
    for v in values:
        category, kind = property_codes(names[v])
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=seg_number[v], segment_label=names[v][:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=generate_uid(), tracking_id=f"label {v}: {names[v]}"[:64],
        ))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.ascontiguousarray(frames),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=generate_uid(), series_number=series_number, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="medpipe", manufacturer_model_name="medpipe", software_versions=__version__,
        device_serial_number="0", content_label="MEDPIPE", content_description=f"medpipe {method or ''}".strip()[:64],
    )
    return seg, seg_number


def build_sr(sources: list[pydicom.Dataset], seg: Any | None, seg_number: dict[int, int],
             record: dict[str, Any], series_number: int = 901) -> Any:
    """Comprehensive 3D SR (TID 1500) with the volume of each measured label."""
    import highdicom as hd

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="medpipe", manufacturer_name="medpipe", model_name=__version__),
    )
    groups = []
    algorithm = hd.sr.AlgorithmIdentification(name="medpipe", version=__version__)
    for m in record["segmentation"]["measurements"]:
        v = int(m["label"])
        category, kind = property_codes(m["name"])
        measurement = hd.sr.Measurement(name=codes.SCT.Volume, value=float(m["volume_ml"]), unit=UCUM_ML,
                                        algorithm_id=algorithm)
        tracking = hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"label {v}: {m['name']}"[:64])
        if seg is not None and v in seg_number:
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, referenced_segment=hd.sr.ReferencedSegment.from_segmentation(
                    seg, segment_number=seg_number[v]),
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
        evidence=evidence, content=report[0], series_instance_uid=generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="medpipe", is_complete=True,
    )


def write_dicom_outputs(study_dir: Path, record: dict[str, Any], cfg: Any,
                        source_files: list[str]) -> tuple[dict[str, str], list[str]]:
    """Write ``seg.dcm`` and ``sr.dcm`` as configured; return the files written and the problems met."""
    rc = cfg.report
    written: dict[str, str] = {}
    problems: list[str] = []
    image = Path(study_dir) / "image.zarr"
    try:
        sources = _read_sources(source_files)
        if not sources:
            raise ValueError("no source image with a position")
        meta = omezarr.read_meta(image)
        labels = np.asarray(omezarr.read_labels(image).compute())
        names = {int(k): v for k, v in record["segmentation"]["labels"].items()} or omezarr.label_names(image)
        ordered, flips = match_slices(sources, meta.affine, meta.shape)
        if not rc.include_patient_identity:
            ordered = [anonymize(ds, record["study_key"]) for ds in ordered]
        ordered = [with_type2(ds) for ds in ordered]
    except Exception as exc:
        return written, [f"DICOM SEG/SR not written: {exc}"]

    seg, seg_number = None, {}
    if rc.dicom_seg:
        try:
            seg, seg_number = build_seg(ordered, labels, names, flips, record["segmentation"].get("method"))
            atomic.write_bytes(Path(study_dir) / "seg.dcm", _encode(seg))
            written["seg"] = "seg.dcm"
        except Exception as exc:  # a derived object's failure is a warning, never the study's
            log.exception("SEG of study %s failed", record["study_key"])
            problems.append(f"DICOM SEG not written: {exc}")
            seg = None
    if rc.dicom_sr:
        try:
            sr = build_sr(ordered, seg, seg_number, record)
            atomic.write_bytes(Path(study_dir) / "sr.dcm", _encode(sr))
            written["sr"] = "sr.dcm"
        except Exception as exc:
            log.exception("SR of study %s failed", record["study_key"])
            problems.append(f"DICOM SR not written: {exc}")
    return written, problems
