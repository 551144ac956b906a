"""Quirks of real scanner files found by running the pipeline on files other packages ship
(tests/e2e/test_real_files.py), reproduced here on small files pydicom ships."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
from ingest_helpers import load, run_ingest
from pydicom.data import get_testdata_file

from medpipe.ingest.scan import FileIssue, Instance, read_instance


def _copy(name: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(get_testdata_file(name), dest / name))


def test_big_endian_pixel_data_is_found_and_its_length_checked(tmp_path):
    """Explicit VR Big Endian (retired, still sent by old scanners): the pixel data tag's bytes
    are big endian too; read as little endian they looked like no pixel data at all."""
    path = _copy("MR_small_bigendian.dcm", tmp_path / "archive")
    inst = read_instance(path)
    assert isinstance(inst, Instance) and inst.has_pixels, inst
    assert inst.raw_pixels is None  # pydicom decodes it (byte swap), not the native NumPy path

    data = path.read_bytes()
    path.write_bytes(data[:-100])
    issue = read_instance(path)
    assert isinstance(issue, FileIssue) and "truncated" in issue.reason, issue


def test_big_endian_volume_equals_little_endian_one(tmp_path):
    _copy("MR_small_bigendian.dcm", tmp_path / "archive")
    plans, results, scan = run_ingest(tmp_path / "archive", tmp_path / "out")
    assert not scan.issues and len(results) == 1
    volume, _ = load(tmp_path / "out", plans[0].study_key)
    expected = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    np.testing.assert_array_equal(volume[0], expected)


def test_zero_pixel_spacing_falls_back_to_1mm_with_a_warning(tmp_path):
    """Real radiographs (pydicom-data's RG1_*) carry PixelSpacing 0\\0."""
    path = _copy("CT_small.dcm", tmp_path / "archive")
    ds = pydicom.dcmread(path)
    ds.PixelSpacing = [0, 0]
    ds.save_as(path)
    plans, results, _ = run_ingest(tmp_path / "archive", tmp_path / "out")
    result = results[plans[0].study_key]
    assert result["spacing"][1:] == [1.0, 1.0]
    assert "PixelSpacing 0\\0 is not positive; 1 mm assumed" in result["warnings"]
    assert np.linalg.matrix_rank(np.asarray(result["affine_lps"])) == 4
    assert plans[0].field_of_view_mm is None


def test_siemens_mosaic_is_named_as_a_montage(tmp_path):
    """A Siemens MOSAIC frame tiles a volume's slices; medpipe keeps it 2-D and says so."""
    path = _copy("MR_small.dcm", tmp_path / "archive")
    ds = pydicom.dcmread(path)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.save_as(path)
    plans, results, _ = run_ingest(tmp_path / "archive", tmp_path / "out")
    warnings = results[plans[0].study_key]["warnings"]
    assert any("Siemens MOSAIC" in w and "2-D montage" in w for w in warnings), warnings


def test_palette_color_pixels_go_through_the_colour_table(tmp_path):
    """PALETTE COLOR values are indices into the file's colour table (pydicom-data's 8-bit face,
    a 16-bit ultrasound with a segmented table): their luminance is the image, not the index."""
    from pydicom.pixels import apply_color_lut

    name = "gdcm-US-ALOKA-16.dcm"
    _copy(name, tmp_path / "archive")
    plans, results, _ = run_ingest(tmp_path / "archive", tmp_path / "out")
    volume, _ = load(tmp_path / "out", plans[0].study_key)
    ds = pydicom.dcmread(get_testdata_file(name))
    expected = apply_color_lut(ds.pixel_array, ds).astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(volume[0], expected, rtol=1e-6)
    assert volume.dtype == np.float32
    assert any(w.startswith("PALETTE COLOR image") for w in results[plans[0].study_key]["warnings"])
