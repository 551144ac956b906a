"""Every DICOM object medpipe writes passes the reference validator, for every kind of input.

Each kind of source (axial, oblique with rounded direction cosines, gantry tilt, one multi-frame
image, a single slice, and 2-D projection images without patient geometry: CR, DX, US, OT) is
written with pydicom, run through the library (scan, plan, ingest, filter, segment, report) and
its SEG and SR are checked three ways: ``dciodvfy -new`` reports no ``Error`` line, highdicom
reads them back, and what they hold agrees with ``report.json`` and the Zarr labels.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from medpipe import omezarr
from medpipe.config import Config
from medpipe.ingest import ingest_study, plan_studies, scan_archive
from medpipe.ops.stage import filter_study, segment_study
from medpipe.pacs.identity import derived_uid, load_uid_key, remap_uid
from medpipe.report.dicom import output_root, write_send_objects
from medpipe.phantom import ct_phantom
from medpipe.report import assemble_record, validate_report, write_study_report
from medpipe.sample.series import write_series

DCIODVFY = shutil.which("dciodvfy")
SPACING = (2.5, 2.0, 2.0)
# Cosines as a real oblique CT wrote them: rounded, so not quite unit length.
OBLIQUE = ((1.0, 0.0, 0.0), (0.0, 0.98796, -0.151524))
PROJECTION = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
              "US": "1.2.840.10008.5.1.4.1.1.6.1", "OT": "1.2.840.10008.5.1.4.1.1.7"}
KINDS = ["axial", "oblique", "tilted", "multiframe", "single", *PROJECTION]
# The model's result of each kind: positive, negative, or no model at all (not applicable).
MODEL = {"name": "lesion-slice-cnn", "version": "1.2", "sha256": "ab" * 32}
RESULTS = {"axial": "lesion", "oblique": "no_lesion", "multiframe": "lesion", "single": "no_lesion"}
VALUES = {"lesion": codes.SCT.Present, "no_lesion": codes.SCT.Absent, None: "385432009"}


def _phantom(slices: int) -> np.ndarray:
    return ct_phantom(shape=(slices, 48, 48), spacing=SPACING, n_lesions=1, seed=4).hu


def _projection(kind: str, folder: Path) -> None:
    """One 2-D image of ``kind`` without ImagePositionPatient, ImageOrientationPatient or FoR."""
    (path,) = write_series(_phantom(1) + 1024, (1.0, 0.5, 0.5), folder, modality="OT", patient_id=kind)
    ds = pydicom.dcmread(path)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID", "SliceLocation",
                    "SliceThickness", "PixelSpacing", "RescaleSlope", "RescaleIntercept", "RescaleType"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PROJECTION[kind]
    ds.Modality = kind
    ds.save_as(path, enforce_file_format=True)


def _multiframe(folder: Path, scratch: Path) -> None:
    """An enhanced (legacy converted) CT: one file, positions in its functional groups."""
    files = write_series(_phantom(8), SPACING, scratch, modality="CT", patient_id="multiframe",
                         orientation=OBLIQUE)
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(f) for f in files], series_instance_uid=generate_uid(), series_number=5,
        sop_instance_uid=generate_uid(), instance_number=1)
    folder.mkdir(parents=True)
    image.save_as(folder / "MF")


def write_source(kind: str, root: Path) -> Path:
    """The DICOM files of one ``kind`` of study under ``root/archive``."""
    folder = root / "archive" / kind
    if kind == "axial":
        write_series(_phantom(8), SPACING, folder, modality="CT", patient_id=kind, shuffle=True)
    elif kind == "oblique":
        write_series(_phantom(8), SPACING, folder, modality="CT", patient_id=kind, orientation=OBLIQUE)
    elif kind == "tilted":  # gantry tilt: positions step along y as well as z
        positions = [(0.0, 0.45 * k, 2.5 * k) for k in range(8)]
        write_series(_phantom(8), SPACING, folder, modality="CT", patient_id=kind, positions_lps=positions)
    elif kind == "single":
        write_series(_phantom(1), SPACING, folder, modality="CT", patient_id=kind)
    elif kind == "multiframe":
        _multiframe(folder, root / "scratch")
    else:
        _projection(kind, folder)
    return folder


def process(kind: str, root: Path, cfg: Config | None = None) -> tuple[Path, list[str]]:
    """Run the library's stages on the study of ``kind``; return its folder and source files."""
    write_source(kind, root)
    return run_library(kind, root, cfg or Config())


def run_library(kind: str, root: Path, cfg: Config) -> tuple[Path, list[str]]:
    """Scan, plan, ingest, filter, segment and report the one study under ``root/archive``."""
    (plan,) = [p for p in plan_studies(scan_archive(root / "archive", cfg.ingest), cfg.ingest) if p.files]
    study_dir = root / "out" / plan.study_key
    stages = {"plan": plan.to_dict(), "ingest": ingest_study(plan, study_dir, cfg.ingest),
              "filter": filter_study(study_dir, plan.modality, cfg),
              "segment": segment_study(study_dir, plan.modality, cfg)}
    if kind in RESULTS:
        stages["infer"] = {"model": MODEL, "output_kind": "slice_classification", "labels": ["no_lesion", "lesion"],
                           "study_label": RESULTS[kind], "study_score": 0.9 if RESULTS[kind] == "lesion" else 0.1,
                           "rule": "max", "slice_scores": [], "flags": [], "saliency": []}
    record = assemble_record(plan.study_key, stages, {}, {"run_id": "conformance"})
    write_study_report(study_dir, record, cfg, plan.files)
    return study_dir, plan.files


@pytest.fixture(scope="module", params=KINDS)
def made(request, tmp_path_factory) -> tuple[str, Path, list[str], dict]:
    kind = request.param
    study_dir, files = process(kind, tmp_path_factory.mktemp(kind))
    report = json.loads((study_dir / "report.json").read_text())
    validate_report(report)
    return kind, study_dir, files, report


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines of ``dciodvfy -new`` on ``path`` (it writes its findings to stderr)."""
    run = subprocess.run([DCIODVFY, "-new", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_seg_and_sr_are_made(made):
    kind, study_dir, _, report = made
    assert report["objects"] == [{"object": "seg", "file": "seg.dcm", "made": True, "reason": None},
                                 {"object": "sr", "file": "sr.dcm", "made": True, "reason": None}], kind
    assert report["outputs"]["seg"] == "seg.dcm" and report["outputs"]["sr"] == "sr.dcm"
    assert not [w for w in report["warnings"] if "DICOM" in w]


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) is not installed: "
                                             "run `make system-packages` as root")
@pytest.mark.parametrize("name", ["seg.dcm", "sr.dcm"])
def test_dciodvfy_finds_no_error(made, name):
    kind, study_dir, _, _ = made
    assert dciodvfy_errors(study_dir / name) == [], f"{kind} {name}"


def _source_frames(files: list[str]) -> list[tuple[str, int | None]]:
    """(SOPInstanceUID, frame number or None) of each source frame, in slice order along the normal."""
    frames = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if "PerFrameFunctionalGroupsSequence" in ds:
            iop = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
            normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
            for n, group in enumerate(ds.PerFrameFunctionalGroupsSequence, 1):
                pos = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, float)
                frames.append((float(pos @ normal), ds.SOPInstanceUID, n))
        elif "ImagePositionPatient" in ds:
            iop = ds.ImageOrientationPatient
            normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
            frames.append((float(np.asarray(ds.ImagePositionPatient, float) @ normal), ds.SOPInstanceUID, None))
        else:
            frames.append((0.0, ds.SOPInstanceUID, None))
    return [(uid, n) for _, uid, n in sorted(frames)]


def test_seg_reads_back_as_the_zarr_labels(made):
    kind, study_dir, files, report = made
    seg = hd.seg.segread(study_dir / "seg.dcm")
    labels = np.asarray(omezarr.read_labels(study_dir / "image.zarr").compute())
    key = load_uid_key(output_root(study_dir))  # the de-identified SEG references remapped UIDs
    frames = [(remap_uid(uid, key), n) for uid, n in _source_frames(files)]
    assert len(frames) == labels.shape[0]
    names = report["segmentation"]["labels"]
    assert {d.SegmentLabel for d in seg.SegmentSequence} == {n for v, n in names.items() if v != "0"}
    for desc in seg.SegmentSequence:
        value = int(desc.TrackingID.split(":")[0].split()[1])
        if frames[0][1] is None:
            mask = seg.get_pixels_by_source_instance([uid for uid, _ in frames], segment_numbers=[desc.SegmentNumber],
                                                     skip_overlap_checks=True)[..., 0]
        else:
            mask = seg.get_pixels_by_source_frame(frames[0][0], [n for _, n in frames],
                                                  segment_numbers=[desc.SegmentNumber],
                                                  skip_overlap_checks=True)[..., 0]
        np.testing.assert_array_equal(mask.astype(bool), labels == value, err_msg=f"{kind} {desc.SegmentLabel}")


def _unit(values) -> bool:
    v = np.asarray(values, float).reshape(2, 3)
    return np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-9)


def test_seg_orientation_is_unit_and_identity_method_recorded(made):
    kind, study_dir, _, _ = made
    for name in ("seg.dcm", "sr.dcm"):
        ds = pydicom.dcmread(study_dir / name)
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
        # Basic profile; not "Retain UIDs" (113110): the UIDs are remapped by a keyed hash.
        assert {c.CodeValue for c in ds.DeidentificationMethodCodeSequence} == {"113100"}
    seg = pydicom.dcmread(study_dir / "seg.dcm")
    shared = seg.SharedFunctionalGroupsSequence[0]
    if kind in PROJECTION:
        assert "PlaneOrientationSequence" not in shared and "PatientOrientation" in seg
    else:
        assert _unit(shared.PlaneOrientationSequence[0].ImageOrientationPatient), kind


def test_sr_holds_the_model_result_and_the_measurements(made):
    kind, study_dir, _, report = made
    sr = hd.sr.srread(study_dir / "sr.dcm")
    assert not sr.content.get_planar_roi_measurement_groups()
    volumes = {}
    for g in sr.content.get_volumetric_roi_measurement_groups():
        (m,) = g.get_measurements()
        volumes[int(g.tracking_identifier.split(":")[0].split()[1])] = m.value
    expected = {m["label"]: m["volume_ml"] for m in report["segmentation"]["measurements"]}
    assert volumes.keys() == expected.keys()
    for k, v in expected.items():
        assert volumes[k] == pytest.approx(v, rel=1e-6)
    # The model's result: one group of its own, a qualitative evaluation (also when negative or absent).
    (model_group,) = [g for g in sr.content.get_image_measurement_groups() if g.get_qualitative_evaluations()]
    assert not model_group.get_measurements()
    (evaluation,) = model_group.get_qualitative_evaluations()
    expected_value = VALUES[RESULTS.get(kind)]
    assert evaluation.value.value == getattr(expected_value, "value", expected_value), kind
    assert evaluation.name == codes.SCT.Lesion


def test_study_without_measurements_gets_an_sr(study):
    """A negative result is a result: no measurement at all, the SR still says 'lesion absent'."""
    study.stages["segment"]["measurements"] = []
    study.stages["infer"]["study_label"] = "no_lesion"
    doc = assemble_record(study.study_dir.name, study.stages, study.timings, study.provenance)
    written = write_study_report(study.study_dir, doc, Config(), study.files)
    assert written["sr"] == "sr.dcm"
    sr = hd.sr.srread(study.study_dir / "sr.dcm")
    (group,) = sr.content.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.value == codes.SCT.Absent and evaluation.name == codes.SCT.Lesion
    if DCIODVFY:
        assert dciodvfy_errors(study.study_dir / "sr.dcm") == []


def test_objects_say_why_not_made(study):
    """A failed study and a study without source files: report.json and report.html say why."""
    doc = assemble_record(study.study_dir.name, study.stages, study.timings, study.provenance, error="infer: boom")
    write_study_report(study.study_dir, doc, Config(), study.files)
    saved = json.loads((study.study_dir / "report.json").read_text())
    assert [(o["object"], o["made"]) for o in saved["objects"]] == [("seg", False), ("sr", False)]
    assert all(o["reason"] == "the study failed: infer: boom" for o in saved["objects"])
    doc = assemble_record(study.study_dir.name, study.stages, study.timings, study.provenance)
    write_study_report(study.study_dir, doc, Config(), None)
    saved = json.loads((study.study_dir / "report.json").read_text())
    assert {o["reason"] for o in saved["objects"]} == {"no source DICOM files"}
    html = (study.study_dir / "report.html").read_text()
    assert "DICOM objects" in html and "no source DICOM files" in html


def test_ome_zarr_clients_read_the_image(made):
    """The study's image.zarr of every kind of source: OME-Zarr 0.5 valid, and ome-zarr reads it."""
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    kind, study_dir, _, report = made
    path = study_dir / "image.zarr"
    image = Image.from_zarr(zarr.open_group(str(path), mode="r"))
    ImageLabel.from_zarr(zarr.open_group(str(path / "labels" / omezarr.LABELS_NAME), mode="r"))
    assert list(image.labels.attributes.ome.labels) == [omezarr.LABELS_NAME]
    nodes = list(Reader(parse_url(str(path)))())
    assert nodes[0].data[0].shape == tuple(report["shape"]), kind
    assert any(isinstance(s, Label) for n in nodes for s in n.specs), kind


def test_identity_kept_from_a_source_deidentified_elsewhere(tmp_path):
    """With identity kept, a source marked PatientIdentityRemoved without a method still gives
    SEG and SR that state one (type 1C), and nothing else changes."""
    write_series(_phantom(4), SPACING, tmp_path / "archive" / "deid", modality="CT", patient_id="DEID-7",
                 PatientIdentityRemoved="YES")
    study_dir, _ = run_library("deid", tmp_path, Config.model_validate({"report": {"include_patient_identity": True}}))
    for name in ("seg.dcm", "sr.dcm"):
        ds = pydicom.dcmread(study_dir / name)
        assert ds.PatientID == "DEID-7" and ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
        if DCIODVFY:
            assert dciodvfy_errors(study_dir / name) == [], name


def test_objects_for_a_pacs_carry_the_source_identity_and_pass_dciodvfy(made, tmp_path):
    """The identified copies for destinations (SEG, SR, report as Secondary Capture): the source's
    patient and study, UIDs derived from the input fingerprint, and no dciodvfy error."""
    kind, study_dir, files, report = made
    sent = write_send_objects(study_dir, report, Config(), files, tmp_path / "send")
    assert [f.name for f in sent.files] == ["seg.dcm", "sr.dcm", "report.dcm"], (kind, sent)
    assert not sent.problems and not sent.reasons
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    base = f"{report['study_key']}:{report['provenance']['input_fingerprint']}"
    for f in sent.files:
        ds = pydicom.dcmread(f)
        assert ds.PatientID == source.PatientID == kind and ds.StudyInstanceUID == source.StudyInstanceUID
        assert "PatientIdentityRemoved" not in ds or ds.PatientIdentityRemoved != "YES"
        assert ds.SOPInstanceUID == derived_uid(base, f"{f.stem}/instance"), (kind, f.name)
        assert ds.SeriesInstanceUID == derived_uid(base, f"{f.stem}/series")
        if DCIODVFY:
            assert dciodvfy_errors(f) == [], f"{kind} {f.name}"
    seg = hd.seg.segread(sent.files[0])
    assert {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence} \
        <= {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
