"""Volumes that are right: sorting, rescale, affine, multi-frame, RGB, 2-D, inconsistencies."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from ingest_helpers import enhanced_mr, load, oblique_orientation, ramp_volume, run_ingest
from pydicom.data import get_testdata_file

from medpipe.config import IngestConfig
from medpipe.errors import StudyError
from medpipe.ingest import ingest_study, plan_studies, scan_archive
from medpipe.omezarr import chunk_bytes
from medpipe.sample import write_series


def _only(results):
    assert len(results) == 1
    return next(iter(results.items()))


def test_shuffled_names_sorted_along_normal_not_by_name_or_instance_number(tmp_path):
    vol = ramp_volume()
    files = write_series(vol, (3.0, 1.0, 1.0), tmp_path / "a", shuffle=True, seed=3)
    for k, f in enumerate(files):  # InstanceNumber reversed: must be ignored too
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = len(files) - k
        ds.save_as(f)
    _, results, _ = run_ingest(tmp_path / "a", tmp_path / "out")
    key, res = _only(results)
    data, meta = load(tmp_path / "out", key)
    np.testing.assert_array_equal(data, vol)
    assert res["shape"] == [6, 10, 12] and res["spacing"] == [3.0, 1.0, 1.0]


def test_oblique_affine_exact(tmp_path):
    row, col = oblique_orientation()
    origin = (-12.5, 30.25, 7.0)
    write_series(ramp_volume(), (2.5, 0.8, 0.6), tmp_path / "a", orientation=(row, col), origin_lps=origin)
    _, results, _ = run_ingest(tmp_path / "a", tmp_path / "out")
    _, res = _only(results)
    aff = np.asarray(res["affine_lps"])
    normal = np.cross(row, col)
    np.testing.assert_allclose(aff[:3, 0], np.multiply(row, 0.6), atol=1e-6)
    np.testing.assert_allclose(aff[:3, 1], np.multiply(col, 0.8), atol=1e-6)
    np.testing.assert_allclose(aff[:3, 2], normal * 2.5, atol=1e-5)
    np.testing.assert_allclose(aff[:3, 3], origin, atol=1e-6)
    # the last voxel lands where the last slice's ImagePositionPatient + row/col steps say
    corner = aff @ [11, 9, 5, 1]
    expected = np.add(origin, normal * 2.5 * 5) + np.multiply(row, 0.6 * 11) + np.multiply(col, 0.8 * 9)
    np.testing.assert_allclose(corner[:3], expected, atol=1e-4)


def test_rescale_applied_per_slice(tmp_path):
    vol = ramp_volume().astype(np.float64)
    slopes = [1.0, 0.5, 2.0, 1.0, 0.25, 1.0]
    intercepts = [-1024.0, 0.0, 10.0, -3.0, 100.0, -1024.0]
    write_series(vol, (1.0, 1.0, 1.0), tmp_path / "a", slope=slopes, intercept=intercepts)
    _, results, _ = run_ingest(tmp_path / "a", tmp_path / "out")
    key, _ = _only(results)
    data, meta = load(tmp_path / "out", key)
    assert meta.dtype == "float32"
    for k, slope in enumerate(slopes):  # stored integers round to half a slope
        np.testing.assert_allclose(data[k], vol[k], atol=slope / 2 + 1e-6)
    np.testing.assert_array_equal(data[0], vol[0])


def _enhanced_mr(path, frames_zyx, positions, slopes, intercepts):
    """An enhanced MR object with per-frame positions and rescale in functional groups."""
    stored = np.rint((frames_zyx - np.asarray(intercepts)[:, None, None]) / np.asarray(slopes)[:, None, None])
    enhanced_mr(stored, positions, slopes, intercepts).save_as(path)


def test_enhanced_multiframe_per_frame_rescale_and_positions(tmp_path):
    vol = ramp_volume((5, 8, 6)).astype(np.float64) + 600
    order = [3, 0, 4, 1, 2]  # frames stored out of order
    positions = [(0.0, 0.0, 1.5 * k) for k in order]
    slopes = [1.0, 2.0, 0.5, 1.0, 4.0]
    intercepts = [0.0, -100.0, 3.0, 7.0, -200.0]
    (tmp_path / "a").mkdir()
    _enhanced_mr(tmp_path / "a" / "emr", vol[order], positions, slopes, intercepts)
    _, results, _ = run_ingest(tmp_path / "a", tmp_path / "out")
    key, res = _only(results)
    data, _ = load(tmp_path / "out", key)
    np.testing.assert_allclose(data, vol, atol=2.01)  # slope 4 stores to 2 HU precision
    assert res["spacing"] == pytest.approx([1.5, 0.9, 0.7])


def test_single_slice_2d_radiograph_and_rgb(tmp_path):
    for name in ("RG3_J2KR.dcm", "US1_J2KR.dcm"):
        shutil.copy(get_testdata_file(name, download=False), tmp_path / name)
    _, results, _ = run_ingest(tmp_path, tmp_path / "out")
    by_modality = {r["modality"]: (k, r) for k, r in results.items()}
    cr_key, cr = by_modality["CR"]
    assert cr["shape"] == [1, 1760, 1760]
    ref = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm", download=False)).pixel_array
    np.testing.assert_array_equal(load(tmp_path / "out", cr_key)[0][0], ref)
    us_key, us = by_modality["US"]
    assert us["shape"] == [1, 480, 640] and any("RGB" in w for w in us["warnings"])
    rgb = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm", download=False)).pixel_array.astype(np.float32)
    np.testing.assert_allclose(load(tmp_path / "out", us_key)[0][0], rgb @ [0.299, 0.587, 0.114], atol=1e-3)


# Compressed transfer syntaxes against the same image uncompressed, both shipped by pydicom.
COMPRESSED = [
    ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE lossless
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 lossless
    ("JPEG-LL.dcm", None),  # JPEG lossless (process 14)
    ("JPEG2000.dcm", None),  # JPEG 2000
    ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb.dcm"),  # JPEG baseline (lossy, RGB)
    ("image_dfl.dcm", None),  # deflated explicit VR little endian
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),  # multi-frame J2K
]


@pytest.mark.parametrize("name,reference", COMPRESSED)
def test_compressed_transfer_syntaxes_decode(tmp_path, name, reference):
    shutil.copy(get_testdata_file(name, download=False), tmp_path / name)
    _, results, scan = run_ingest(tmp_path, tmp_path / "out")
    assert not scan.issues
    key, res = _only(results)
    data, _ = load(tmp_path / "out", key)
    ref_ds = pydicom.dcmread(get_testdata_file(reference or name, download=False))
    ref = ref_ds.pixel_array.astype(np.float32)
    if ref.ndim == 3 and ref.shape[-1] == 3:
        ref = ref @ np.float32([0.299, 0.587, 0.114])
    ref = ref.reshape(data.shape) * float(ref_ds.get("RescaleSlope", 1)) + float(ref_ds.get("RescaleIntercept", 0))
    tol = 8.0 if "jpeg_dcmtk" in name else 1e-3  # baseline JPEG is lossy
    assert np.abs(data - ref).mean() <= tol


def _positions(zs):
    return [(0.0, 0.0, float(z)) for z in zs]


@pytest.mark.parametrize(
    "zs,expected",
    [
        ([0, 2, 4, 8, 10, 12], "missing slice"),  # gap
        ([0, 2, 4, 4, 6, 8], "duplicate positions"),
    ],
)
def test_inconsistent_series_warn_or_refuse(tmp_path, zs, expected):
    write_series(ramp_volume(), (2.0, 1.0, 1.0), tmp_path / "a", positions_lps=_positions(zs))
    plans, results, _ = run_ingest(tmp_path / "a", tmp_path / "warn")
    _, res = _only(results)
    assert any(expected in w for w in res["warnings"]), res["warnings"]
    refuse = IngestConfig(on_inconsistency="refuse")
    with pytest.raises(StudyError, match=expected):
        ingest_study(plans[0], tmp_path / "refuse", refuse)


def test_gantry_tilt_detected_and_affine_sheared(tmp_path):
    shear = np.tan(np.radians(15.0))
    positions = [(0.0, 2.0 * k * shear, 2.0 * k) for k in range(6)]
    write_series(ramp_volume(), (2.0, 1.0, 1.0), tmp_path / "a", positions_lps=positions)
    plans, results, _ = run_ingest(tmp_path / "a", tmp_path / "out")
    _, res = _only(results)
    assert any("gantry tilt of 15.00 degrees" in w for w in res["warnings"])
    np.testing.assert_allclose(np.asarray(res["affine_lps"])[:3, 2], [0, 2 * shear, 2.0], atol=1e-6)
    with pytest.raises(StudyError, match="tilt"):
        ingest_study(plans[0], tmp_path / "r", IngestConfig(on_inconsistency="refuse"))


def test_mixed_shapes_and_localizers(tmp_path):
    vol = ramp_volume()
    uids = dict(study_uid="1.2.3.4", series_uid="1.2.3.4.5")
    write_series(vol, (2.0, 1.0, 1.0), tmp_path / "a", **uids)
    # a localizer and an odd-sized slice slipped into the same series
    write_series(np.zeros((1, 10, 12)), (2.0, 1.0, 1.0), tmp_path / "a", file_names=["loc.dcm"],
                 orientation=((0, 1, 0), (0, 0, -1)), ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
                 seed=9, **uids)
    write_series(np.zeros((1, 4, 4)), (2.0, 1.0, 1.0), tmp_path / "a", file_names=["odd.dcm"],
                 origin_lps=(0, 0, 50), seed=8, **uids)
    plans, results, _ = run_ingest(tmp_path / "a", tmp_path / "out")
    key, res = _only(results)
    assert any("localizer" in w for w in res["warnings"])
    assert any("mixed image shapes" in w for w in res["warnings"])
    np.testing.assert_array_equal(load(tmp_path / "out", key)[0], vol)
    with pytest.raises(StudyError, match="mixed image shapes"):
        ingest_study(plans[0], tmp_path / "r", IngestConfig(on_inconsistency="refuse"))


def test_mixed_orientations_refused(tmp_path):
    uids = dict(study_uid="1.2.3.4", series_uid="1.2.3.4.6")
    write_series(ramp_volume(), (2.0, 1.0, 1.0), tmp_path / "a", **uids)
    write_series(ramp_volume((2, 10, 12)), (2.0, 1.0, 1.0), tmp_path / "a", file_names=["c1", "c2"],
                 orientation=oblique_orientation(), seed=5, **uids)
    plans = plan_studies(scan_archive(tmp_path / "a"))
    with pytest.raises(StudyError, match="mixed orientations"):
        ingest_study(plans[0], tmp_path / "r", IngestConfig(on_inconsistency="refuse"))
    res = ingest_study(plans[0], tmp_path / "w", IngestConfig())
    assert res["shape"][0] == 6


def test_chunks_at_least_1mb_and_pyramid(tmp_path):
    write_series(np.zeros((8, 512, 512), np.int16), (1.0, 0.7, 0.7), tmp_path / "a")
    _, results, _ = run_ingest(tmp_path / "a", tmp_path / "out")
    key, _ = _only(results)
    path = tmp_path / "out" / key / "image.zarr"
    assert chunk_bytes(path) >= 2**20
    from medpipe.omezarr import read_meta

    assert read_meta(path).levels == 3
