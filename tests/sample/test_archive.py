"""The sample archive: deterministic, complete, and ingested to the right voxels."""

from __future__ import annotations

import hashlib

import numpy as np

from medpipe.config import IngestConfig
from medpipe.ingest import ingest_study, plan_studies, scan_archive
from medpipe.omezarr import read_image
from medpipe.sample import brain_reference, phantom, write_sample_archive


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_sample_archive_contents_and_ingest(tmp_path):
    summary = write_sample_archive(tmp_path / "a")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "a") and len(summary["studies"]) == 5
    write_sample_archive(tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # deterministic
    names = {s["name"]: s for s in summary["studies"]}
    assert {s["modality"] for s in summary["studies"]} == {"MR", "CT", "CR"}
    assert len(names["phantom_ct"]["truth_lesion_volumes_ml"]) == 3
    assert any(not p.suffix for p in (tmp_path / "a").rglob("*") if p.is_file())  # files without .dcm

    cfg = IngestConfig()
    scan = scan_archive(tmp_path / "a", cfg)
    assert not scan.issues
    plans = {p.study_key: p for p in plan_studies(scan, cfg)}
    assert set(plans) == {s["study_key"] for s in summary["studies"]} and all(p.files for p in plans.values())

    brain = names["brain_mr"]["study_key"]
    ingest_study(plans[brain], tmp_path / "out" / brain, cfg)
    ref = brain_reference()
    got = read_image(tmp_path / "out" / brain / "image.zarr").compute()
    assert got.shape == ref["gm"].shape == ref["wm"].shape
    np.testing.assert_allclose(got, ref["t1"], atol=1.3e-4)

    ct = names["phantom_ct"]["study_key"]
    ingest_study(plans[ct], tmp_path / "out" / ct, cfg)
    np.testing.assert_array_equal(read_image(tmp_path / "out" / ct / "image.zarr").compute(), phantom().hu)
