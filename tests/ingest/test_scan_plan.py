"""Discovery and planning: bad files, grouping, duplicates, selection, skip reasons, fingerprints."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from ingest_helpers import oblique_orientation, ramp_volume, run_ingest
from pydicom.data import get_testdata_file

from medpipe.config import IngestConfig
from medpipe.errors import StudyError
from medpipe.ingest import StudyPlan, format_plan, ingest_study, plan_studies, scan_archive
from medpipe.keys import study_key
from medpipe.sample import write_series


def test_bad_files_reported_with_path_and_reason_rest_processed(tmp_path):
    root = tmp_path / "arch"
    write_series(ramp_volume(), (2.0, 1.0, 1.0), root / "good", study_uid="1.2.3.9")
    (root / "junk").mkdir()
    (root / "junk" / "empty.dcm").write_bytes(b"")
    (root / "junk" / "notes.txt").write_text("not a dicom file at all\n" * 20)
    bad = write_series(ramp_volume((2, 10, 12)), (2.0, 1.0, 1.0), root / "bad", study_uid="1.2.3.10")
    data = bad[0].read_bytes()
    bad[0].write_bytes(data[: len(data) - 100])  # truncated pixel data
    import pydicom

    ds = pydicom.dcmread(bad[1])
    del ds.PixelData
    ds.save_as(bad[1])  # image header without pixel data
    shutil.copy(get_testdata_file("DICOMDIR", download=False), root / "DICOMDIR")
    plans, results, scan = run_ingest(root, tmp_path / "out")
    reasons = {os.path.basename(i.path): i.reason for i in scan.issues}
    assert reasons["empty.dcm"] == "empty file (0 bytes)"
    assert reasons["notes.txt"].startswith("not a DICOM file")
    assert reasons[bad[0].name].startswith("truncated")
    assert reasons[bad[1].name] == "image object without pixel data"
    assert "DICOMDIR" not in reasons
    good = study_key("1.2.3.9")
    assert list(results) == [good]
    by_key = {p.study_key: p for p in plans}
    broken = by_key[study_key("1.2.3.10")]
    assert broken.files == [] and "no readable image" in broken.skip_reason
    assert {i["path"] for i in broken.issues} == {str(bad[0]), str(bad[1])}
    text = format_plan(plans, scan.issues)
    assert "notes.txt" in text and "SKIP" in text and "INGEST" in text


def test_undecodable_pixel_data_fails_only_its_study(tmp_path):
    # pydicom ships this 12-bit lossy JPEG; no installed plugin decodes it
    shutil.copy(get_testdata_file("JPEG-lossy.dcm", download=False), tmp_path / "lossy")
    write_series(ramp_volume(), (2.0, 1.0, 1.0), tmp_path / "ok", study_uid="1.2.3.11")
    plans = plan_studies(scan_archive(tmp_path))
    outcomes = {}
    for p in plans:
        try:
            outcomes[p.study_key] = ingest_study(p, tmp_path / "out" / p.study_key)["shape"]
        except StudyError as exc:
            outcomes[p.study_key] = str(exc)
    assert outcomes[study_key("1.2.3.11")] == [6, 10, 12]
    failed = [v for v in outcomes.values() if isinstance(v, str)]
    assert len(failed) == 1 and "lossy: cannot decode pixel data" in failed[0]


def test_series_across_folders_series_sharing_folder_and_duplicates(tmp_path):
    root = tmp_path / "arch"
    vol = ramp_volume((8, 10, 12))
    uids = dict(study_uid="1.2.3.20", series_uid="1.2.3.20.1")
    names = [f"part{k % 2}/deeper/s{k}" for k in range(8)]  # one series spread over two folders
    files = write_series(vol, (2.0, 1.0, 1.0), root, file_names=names, **uids)
    shutil.copy(files[3], root / "part0" / "copy-of-s3")  # exact duplicate instance
    # a second, thinner series of the same study in the same folder
    write_series(ramp_volume((4, 10, 12)), (1.0, 1.0, 1.0), root / "part0", study_uid="1.2.3.20",
                 series_uid="1.2.3.20.2", file_names=[f"t{k}.dcm" for k in range(4)], series_number=2,
                 SliceThickness=1.0)
    scan = scan_archive(root)
    (plan,) = plan_studies(scan)
    assert len(plan.files) == 8 and plan.n_slices == 8
    assert any("duplicate instance" in w for w in plan.warnings)
    assert plan.skipped[0]["reason"].startswith("not preferred")
    (thin,) = plan_studies(scan, IngestConfig(prefer="thinnest_slices"))
    assert thin.n_slices == 4 and "thinnest" in thin.selected_because
    (none,) = plan_studies(scan, IngestConfig(min_slices=20))
    assert none.files == [] and "fewer than ingest.min_slices" in none.skip_reason


def test_selection_by_orientation_description_and_modality(tmp_path):
    root = tmp_path / "arch"
    study = dict(study_uid="1.2.3.30")
    write_series(ramp_volume(), (2.0, 1.0, 1.0), root / "ax", series_uid="1.2.3.30.1",
                 series_description="AX T1", series_number=1, **study)
    write_series(ramp_volume((3, 10, 12)), (2.0, 1.0, 1.0), root / "sag", series_uid="1.2.3.30.2",
                 orientation=((0, 1, 0), (0, 0, -1)), series_description="SAG T2", series_number=2, **study)
    scan = scan_archive(root)
    (p,) = plan_studies(scan, IngestConfig(orientation="sagittal"))
    assert p.n_slices == 3 and "axial orientation" in p.skipped[0]["reason"]
    (p,) = plan_studies(scan, IngestConfig(series_description="t2"))
    assert p.series_description == "SAG T2"
    (p,) = plan_studies(scan, IngestConfig(modalities=["MR"]))
    assert p.files == [] and "modality CT not in ingest.modalities" in p.skip_reason


def test_non_image_study_skipped_with_reason(tmp_path):
    shutil.copy(get_testdata_file("test-SR.dcm", download=False), tmp_path / "report")
    shutil.copy(get_testdata_file("rtplan.dcm", download=False), tmp_path / "plan.dcm")
    plans = plan_studies(scan_archive(tmp_path))
    assert all(p.files == [] for p in plans)
    reasons = " ".join(p.skip_reason for p in plans)
    assert "structured report (SR)" in reasons and "RT plan (RTPLAN)" in reasons
    with pytest.raises(StudyError):
        ingest_study(plans[0], tmp_path / "out")


def test_plan_json_round_trip_and_fingerprint_changes(tmp_path):
    files = write_series(ramp_volume(), (2.0, 1.0, 1.0), tmp_path / "a", orientation=oblique_orientation())
    (plan,) = plan_studies(scan_archive(tmp_path / "a"))
    d = json.loads(json.dumps(plan.to_dict()))
    assert StudyPlan.from_dict(d) == plan
    assert plan.fingerprint == plan_studies(scan_archive(tmp_path / "a"))[0].fingerprint
    st = files[2].stat()
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert plan_studies(scan_archive(tmp_path / "a"))[0].fingerprint != plan.fingerprint


def test_scan_runs_on_a_distributed_client(tmp_path):
    distributed = pytest.importorskip("distributed")
    write_series(ramp_volume(), (2.0, 1.0, 1.0), tmp_path / "a")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None):
        scan = scan_archive(tmp_path / "a")
    assert len(scan.instances) == 6 and not scan.issues


def test_files_without_file_meta(tmp_path):
    vol = ramp_volume()
    write_series(vol, (2.0, 1.0, 1.0), tmp_path / "a", file_meta=False)
    _, results, scan = run_ingest(tmp_path / "a", tmp_path / "out")
    assert not scan.issues and len(results) == 1
    from medpipe.omezarr import read_image

    key = next(iter(results))
    np.testing.assert_array_equal(read_image(tmp_path / "out" / key / "image.zarr").compute(), vol)


def test_plan_carries_domain_facts_and_format_plan_lists_models(tmp_path):
    """Body part, photometric, plane and field of view reach the plan; `medpipe plan` says which
    model runs on which study, and why not."""
    from medpipe.config import Config
    from medpipe.inference.domain import Facts
    from medpipe.inference.model import resolve_model

    root = tmp_path / "arch"
    write_series(ramp_volume((20, 64, 64)), (2.5, 4.0, 4.0), root / "chest", study_uid="1.2.3.1",
                 BodyPartExamined="THORAX")
    write_series(ramp_volume((20, 64, 64)), (2.5, 4.0, 4.0), root / "head", study_uid="1.2.3.2",
                 BodyPartExamined="HEAD")
    write_series(ramp_volume((20, 64, 64)), (2.5, 4.0, 4.0), root / "unknown", study_uid="1.2.3.3")
    plans = {p.study_key: p for p in plan_studies(scan_archive(root))}
    chest = plans[study_key("1.2.3.1")]
    assert (chest.body_part, chest.photometric, chest.plane) == ("THORAX", "MONOCHROME2", "axial")
    assert chest.field_of_view_mm == [256.0, 256.0] and plans[study_key("1.2.3.3")].body_part == ""
    assert Facts.from_plan(StudyPlan.from_dict(json.loads(json.dumps(chest.to_dict())))) == Facts.from_plan(chest)

    text = format_plan(list(plans.values()), [], [resolve_model(Config().model)])
    assert "models: medpipe-lesion-slice-cnn (CT, body part CHEST, axial, >= 16 slices" in text
    lines = text.splitlines()
    after = {k: lines[next(i for i, line in enumerate(lines) if line.startswith(f"study {k}")) + 1] for k in plans}
    assert "RUN (CT, body part THORAX (CHEST), axial, 20 slices)" in after[study_key("1.2.3.1")]
    assert "NOT APPLICABLE (body part HEAD, the model needs CHEST)" in after[study_key("1.2.3.2")]
    assert "NOT APPLICABLE (no BodyPartExamined (body part unknown" in after[study_key("1.2.3.3")]
    assert "model " not in format_plan(list(plans.values()))  # no models given: the plan as before
