import json

import highdicom as hd
import numpy as np
import pydicom
import pytest

from medpipe.config import Config
from medpipe.pacs.identity import load_uid_key, remap_uid
from medpipe.report import assemble_record, validate_report, write_study_report

from_conftest_patient = {"PatientName": "Doe^Jane", "PatientID": "PID-12345", "PatientBirthDate": "19600101",
                         "AccessionNumber": "ACC-999", "InstitutionName": "St Example Hospital"}


def _write(study, **report):
    doc = assemble_record(study.study_dir.name, study.stages, study.timings, study.provenance)
    written = write_study_report(study.study_dir, doc, Config.model_validate({"report": report}), study.files)
    saved = json.loads((study.study_dir / "report.json").read_text())
    validate_report(saved)
    return written, saved


def _identity_text(ds: pydicom.Dataset) -> str:
    """Every text value of the dataset, nested sequences included."""
    values = []
    ds.walk(lambda _, elem: values.append(str(elem.value)) if elem.VR in ("PN", "LO", "SH", "DA", "ST", "LT", "UT") else None)
    return " ".join(values)


def test_seg_matches_zarr_labels_voxel_for_voxel(study):
    written, saved = _write(study)
    assert written == {"html": "report.html", "json": "report.json", "seg": "seg.dcm", "sr": "sr.dcm"}
    assert saved["outputs"] == written and not any("SEG" in w for w in saved["warnings"])
    seg = hd.seg.segread(study.study_dir / "seg.dcm")
    # De-identified: the study's and sources' UIDs remapped with OUT/private/uid-key.
    key = load_uid_key(study.study_dir.parent.parent)
    assert seg.SeriesInstanceUID != study.series_uid and seg.StudyInstanceUID == remap_uid(study.study_uid, key)
    referenced = {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence}
    assert referenced == {remap_uid(study.series_uid, key)}
    # Source images in the order of their position along the slice normal (what the Zarr holds).
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in study.files]
    sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    uids = [remap_uid(ds.SOPInstanceUID, key) for ds in sources]
    by_number = {d.SegmentNumber: d for d in seg.SegmentSequence}
    for number, desc in by_number.items():
        value = int(desc.TrackingID.split(":")[0].split()[1])
        assert study.names[value] == desc.SegmentLabel
        mask = seg.get_pixels_by_source_instance(uids, segment_numbers=[number], skip_overlap_checks=True)[..., 0]
        np.testing.assert_array_equal(mask.astype(bool), study.labels == value)
    assert len(by_number) == len(study.names)


def test_sr_volumes_match_report_json(study):
    _, saved = _write(study)
    sr = hd.sr.srread(study.study_dir / "sr.dcm")
    groups = sr.content.get_volumetric_roi_measurement_groups()
    volumes = {}
    for g in groups:
        (m,) = g.get_measurements()
        assert m.unit.value == "ml" and m.name == pydicom.sr.codedict.codes.SCT.Volume
        volumes[int(g.tracking_identifier.split(":")[0].split()[1])] = m.value
        assert g.referenced_segment is not None
    expected = {m["label"]: m["volume_ml"] for m in saved["segmentation"]["measurements"]}
    assert volumes.keys() == expected.keys()
    for k, v in expected.items():
        assert volumes[k] == pytest.approx(v, rel=1e-6)


def test_no_patient_identity_by_default(study):
    _write(study)
    for name in ("seg.dcm", "sr.dcm"):
        ds = pydicom.dcmread(study.study_dir / name)
        text = _identity_text(ds)
        for value in from_conftest_patient.values():
            assert value not in text, (name, value)
        assert str(ds.PatientName) == "ANONYMOUS^" and ds.PatientID == study.study_dir.name
        assert ds.get("PatientBirthDate", "") == "" and ds.get("PatientIdentityRemoved") == "YES"


def test_patient_identity_when_configured(study):
    _write(study, include_patient_identity=True)
    for name in ("seg.dcm", "sr.dcm"):
        ds = pydicom.dcmread(study.study_dir / name)
        assert str(ds.PatientName) == "Doe^Jane" and ds.PatientID == "PID-12345"
        assert ds.PatientBirthDate == "19600101" and ds.StudyInstanceUID == study.study_uid


def _uids(ds: pydicom.Dataset) -> set[str]:
    found = set()
    ds.walk(lambda _, e: found.update(map(str, e.value if e.VM > 1 else [e.value])) if e.VR == "UI" else None)
    return found


def test_out_files_hold_no_source_uid_and_reference_each_other(study):
    """Every instance UID of the de-identified SEG and SR is a keyed remap: none of the source's
    UIDs is left, and the SR still references the SEG (the same remap on both sides)."""
    _write(study)
    source = set()
    for f in study.files:
        source |= _uids(pydicom.dcmread(f, stop_before_pixels=True)) - {pydicom.uid.CTImageStorage}
    seg, sr = (pydicom.dcmread(study.study_dir / n) for n in ("seg.dcm", "sr.dcm"))
    for ds in (seg, sr):
        assert not (_uids(ds) & source)
        assert ds.StudyInstanceUID.startswith("2.25.") and ds.SOPInstanceUID.startswith("2.25.")
        assert ds.DeidentificationMethod.endswith("UIDs remapped by keyed hash")
    assert seg.SOPInstanceUID in _uids(sr) and seg.FrameOfReferenceUID == sr.get("FrameOfReferenceUID",
                                                                                 seg.FrameOfReferenceUID)
    assert (study.study_dir.parent.parent / "private" / "uid-key").stat().st_mode & 0o777 == 0o600


def test_rerun_makes_the_same_uids(study):
    """Unchanged inputs: the same SOP, series, tracking and dimension UIDs (only dates differ)."""
    _write(study)
    first = {n: pydicom.dcmread(study.study_dir / n) for n in ("seg.dcm", "sr.dcm")}
    _write(study)
    for name, ds in first.items():
        again = pydicom.dcmread(study.study_dir / name)
        assert _uids(again) == _uids(ds), name


def test_sr_without_seg_and_failures_are_warnings(study):
    written, saved = _write(study, dicom_seg=False)
    assert "seg" not in written and written["sr"] == "sr.dcm"
    assert saved["objects"][0] == {"object": "seg", "file": None, "made": False,
                                   "reason": "disabled by configuration (report.dicom_seg is false)"}
    sr = hd.sr.srread(study.study_dir / "sr.dcm")
    assert not sr.content.get_volumetric_roi_measurement_groups()
    # Source files from another geometry cannot be matched: the SEG is not made (a warning and
    # the reason in report.json), the SR still is.
    doc = assemble_record(study.study_dir.name, study.stages, study.timings, study.provenance)
    written = write_study_report(study.study_dir, doc, Config(), study.files[:5])
    saved = json.loads((study.study_dir / "report.json").read_text())
    assert set(written) == {"html", "json", "sr"}
    assert any(w.startswith("DICOM SEG not written: no source image") for w in saved["warnings"])
    seg, sr = saved["objects"]
    assert not seg["made"] and seg["file"] is None and seg["reason"].startswith("ValueError: no source image at")
    assert sr == {"object": "sr", "file": "sr.dcm", "made": True, "reason": None}


def test_objects_for_destinations_in_one_pass(study, tmp_path):
    """write_dicom_outputs(send_dir=...): the identified SEG, SR and report image for a PACS, from
    the same build as the OUT files (the same objects, told apart only by identity and UIDs)."""
    from medpipe.report.dicom import write_dicom_outputs

    doc = assemble_record(study.study_dir.name, study.stages, study.timings, study.provenance)
    objects, problems = write_dicom_outputs(study.study_dir, doc, Config(), study.files, send_dir=tmp_path / "send")
    assert [o["file"] for o in objects] == ["seg.dcm", "sr.dcm"] and not problems
    assert sorted(p.name for p in (tmp_path / "send").iterdir()) == ["report.dcm", "seg.dcm", "sr.dcm"]
    # Identifying: owner-only until the outbox has them.
    assert (tmp_path / "send").stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "send").iterdir()} == {0o600}
    key = load_uid_key(study.study_dir.parent.parent)
    for name in ("seg.dcm", "sr.dcm"):
        sent, kept = pydicom.dcmread(tmp_path / "send" / name), pydicom.dcmread(study.study_dir / name)
        assert str(sent.PatientName) == "Doe^Jane" and sent.StudyInstanceUID == study.study_uid
        assert kept.SOPInstanceUID == remap_uid(sent.SOPInstanceUID, key)
    report = pydicom.dcmread(tmp_path / "send" / "report.dcm")
    assert report.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and report.BurnedInAnnotation == "YES"
    assert report.pixel_array.ndim == 3 and report.pixel_array.shape[2] == 3
    assert report.StudyInstanceUID == study.study_uid and report.PatientID == "PID-12345"


def test_destinations_may_get_the_deidentified_form(study, tmp_path):
    from medpipe.report.dicom import write_send_objects

    doc = assemble_record(study.study_dir.name, study.stages, study.timings, study.provenance)
    cfg = Config.model_validate({"send": {"identity": "deidentified", "objects": ["sr"]}})
    sent = write_send_objects(study.study_dir, doc, cfg, study.files, tmp_path / "send")
    (path,) = sent.files
    ds = pydicom.dcmread(path)
    key = load_uid_key(study.study_dir.parent.parent)
    assert path.name == "sr.dcm" and ds.PatientIdentityRemoved == "YES" and "Doe" not in _identity_text(ds)
    assert ds.StudyInstanceUID == remap_uid(study.study_uid, key)
    assert sent.reasons == {"seg": "not in send.objects", "report": "not in send.objects"}


def test_referenced_segments_equal_highdicom_s(study):
    """The SR's segment references made in one pass (source image items shared between
    segments) are highdicom's from_segmentation ones, segment by segment."""
    from medpipe.report import dicom
    from medpipe.report.record import jsonable

    record = jsonable(assemble_record(study.study_dir.name, study.stages, study.timings, study.provenance))
    seg = dicom.make_objects(study.study_dir, record, study.files, {"sr": "off", "report": "off"}).datasets["seg"]
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    mine = dicom.referenced_segments(seg, numbers)
    assert sorted(mine) == numbers and len(mine) > 1
    for number, ref in mine.items():
        theirs = hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=number)
        assert ref == theirs, number
        assert len(ref) == len(theirs) > 2  # the segment, its SEG and its source images
